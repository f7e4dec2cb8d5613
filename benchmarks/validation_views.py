"""Validation only: trained bundles' grouped accuracy with more test-time views, and their mean.

    .venv/bin/python benchmarks/train_cpu.py --validation-only --lake /tmp/zb --experiments fashion_cnn
    .venv/bin/python benchmarks/validation_views.py --lake /tmp/zb fashion_cnn [other_experiment ...]

Reads the bundles that ``train_cpu.py --validation-only`` saved in ``--lake`` (each experiment's newest
version), rebuilds the same validation split (the 60,000 training images, 20% stratified by
``--seed``) and prints, per bundle, the grouped accuracy through its temperature and operating point
with 1, 2 (the flip), 6 (flip and four 1 px shifts) and 10 (flip at five positions) views; then the
mean of the bundles' two-view probabilities (an ensemble). The test files are never opened. A
shifted view fills the pixels it uncovers with the background (0). 0.05 points is 6 images of 12,000.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_cpu import load_full  # noqa: E402

from zalando.data.split import stratified_split  # noqa: E402
from zalando.labels import GROUP_LABELS, LABEL_TO_GROUP  # noqa: E402
from zalando.lake import Lake  # noqa: E402
from zalando.models import load_bundle  # noqa: E402

SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))
VIEW_SETS = {
    "1 view": ("id",),
    "2 views: the flip": ("id", "flip"),
    "6 views: flip + four 1 px shifts": ("id", "flip", *(f"shift{dx}{dy}" for dx, dy in SHIFTS)),
    "10 views: flip at five positions": (
        "id", "flip", *(f"{f}shift{dx}{dy}" for f in ("", "flip") for dx, dy in SHIFTS),
    ),
}  # fmt: skip


def _shift(x, dx: int, dy: int, fill: float):
    """``x`` (N, 1, H, W) moved by dx, dy pixels; the uncovered border is ``fill``."""
    import torch

    out = torch.full_like(x, fill)
    h, w = x.shape[-2:]
    src_y, dst_y = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    src_x, dst_x = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def view_probs(bundle, x_u8: np.ndarray) -> dict[str, np.ndarray]:
    """Label probabilities (temperature applied) of every view of the uint8 images."""
    import torch
    import torch.nn.functional as F

    model = bundle.model.eval()
    x = torch.as_tensor(x_u8)[:, None].float().div(255.0)
    x = ((x - bundle.mean) / bundle.std).contiguous(memory_format=torch.channels_last)
    background = (0.0 - bundle.mean) / bundle.std
    views = {"id": x, "flip": x.flip(-1)}
    for dx, dy in SHIFTS:
        views[f"shift{dx}{dy}"] = _shift(x, dx, dy, background)
        views[f"flipshift{dx}{dy}"] = _shift(x.flip(-1), dx, dy, background)
    out = {}
    with torch.no_grad():
        for name, v in views.items():
            out[name] = torch.cat(
                [F.softmax(model(v[i : i + 1024]) / bundle.temperature, 1) for i in range(0, len(v), 1024)]
            ).numpy()
    return out


def group_probs(label_probs: np.ndarray, weights: list[float] | None) -> np.ndarray:
    """Summed per group, times the operating point's weights (as the scoring graph does)."""
    groups = np.stack([label_probs[:, list(ix)].sum(1) for ix in GROUP_LABELS], 1)
    return groups * np.asarray(weights or [1.0] * len(GROUP_LABELS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="+", help="experiment names whose newest bundle in --lake is read")
    ap.add_argument("--lake", type=Path, required=True, help="the --lake of train_cpu.py --validation-only")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "fashion-mnist")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if not (args.lake / "models").is_dir():  # Lake.local would make the folder
        sys.exit(
            f"error: --lake {args.lake}: no models/ folder (the --lake of train_cpu.py --validation-only)"
        )
    lake = Lake.local(args.lake)
    full = load_full(args.data, test=False)
    is_val = stratified_split(full["y"], 0.2, args.seed)
    x_val, y_val = full["x"][is_val], full["y"][is_val]
    y_group = np.asarray(LABEL_TO_GROUP)[y_val]
    print(f"# {len(y_val)} validation images (seed {args.seed}); the test files are not read")

    two_view = []
    for name in args.experiments:
        folder = args.lake / "models" / name
        versions = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not versions:
            sys.exit(
                f"error: no bundle of {name!r} in {folder} (train it with train_cpu.py --lake {args.lake})"
            )
        bundle = load_bundle(lake, name, versions[-1])
        probs = view_probs(bundle, x_val)
        print(f"\n{name} {versions[-1]} (chosen TTA: {bundle.spec.tta})")
        for label, keys in VIEW_SETS.items():
            p = group_probs(np.mean([probs[k] for k in keys], 0), bundle.group_weights)
            print(f"  {label:36s} grouped {float((p.argmax(1) == y_group).mean()):.4f}")
        two_view.append(group_probs(np.mean([probs["id"], probs["flip"]], 0), bundle.group_weights))
    if len(two_view) > 1:
        mean = np.mean(two_view, 0)
        acc = float((mean.argmax(1) == y_group).mean())
        print(f"\nthe mean of the {len(two_view)} bundles (2 views each): grouped {acc:.4f}")


if __name__ == "__main__":
    main()
