"""Photo-like inputs made from the Fashion-MNIST TEST split, scored through ``decode_image``: grouped
accuracy per kind of input for the Fashion-MNIST conversion (the default), the legacy path, and the
28x28 arrays themselves.

    nice -n 10 .venv/bin/python benchmarks/photo_inputs.py --bundle /path/to/file-lake --n 1000
    nice -n 10 .venv/bin/python benchmarks/photo_inputs.py --train-quick --n 1000

``--bundle`` is a file lake (its champion, else its newest bundle) or one bundle folder in it
(``.../models/<experiment>/<version>``). ``--train-quick`` trains ``fashion_cnn_small`` for a few
epochs on a subset of the TRAIN split (a couple of minutes on 2 cores), saves it under
``.zalando/bench/photo-inputs-lake`` (pass that as ``--bundle`` next time) and scores with it: a
weak model, but the differences between the paths are what is measured.

Kinds (each from the same test images; sizes, margins, colours, rotations, qualities drawn per image):

- ``original``: the 28x28 image as a PNG;
- ``upscaled``: bicubic 4x-10x, light article on black as in the data set;
- ``light_background``: upscaled and negated: a dark article on white, as a product photo;
- ``margins``: light_background on a larger white canvas, 10-60% of the size on each side, off-centre;
- ``colour``: light_background in RGB: the article tinted a dark colour, the background a light one;
- ``exif``: light_background as JPEG (quality 95), the pixels rotated 90/180/270 and the EXIF
  orientation tag (6/3/8) saying how to turn them upright;
- ``jpeg``: light_background as JPEG, quality 70-95;
- ``all_together``: colour, margins, EXIF rotation and JPEG quality 70-95 at once.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as train_cpu.py: no OpenMP spinning on shared cores

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zalando.data.idx import read_idx_images, read_idx_labels  # noqa: E402
from zalando.images import ImagePrepConfig, ImageRejected, decode_image  # noqa: E402
from zalando.labels import LABEL_TO_GROUP  # noqa: E402
from zalando.lake import Lake  # noqa: E402

FULL_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
QUICK_LAKE = REPO / ".zalando" / "bench" / "photo-inputs-lake"
KINDS = ("original", "upscaled", "light_background", "margins", "colour", "exif", "jpeg", "all_together")
PATHS = {
    "fashion_mnist (default)": ImagePrepConfig(),
    "legacy (before)": ImagePrepConfig(mode="legacy", exif_transpose=False),
    "the paper's six steps only (no black_background)": ImagePrepConfig(black_background=False),
    "fashion_mnist, no sharpening": ImagePrepConfig(sharpen_percent=0),
}
# the pixels are stored turned by the inverse of what the tag tells a viewer (and exif_transpose) to do
ORIENTATIONS = {3: "ROTATE_180", 6: "ROTATE_90", 8: "ROTATE_270"}
log = logging.getLogger("bench.photo_inputs")


# ----------------------------------------------------------------------------- making the inputs


def _encode(im: object, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)  # type: ignore[attr-defined]
    return buf.getvalue()


def _upscale(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    k = int(rng.integers(4, 11))
    return np.asarray(Image.fromarray(a, "L").resize((28 * k, 28 * k), Image.Resampling.BICUBIC))


def _with_margins(a: np.ndarray, rng: np.random.Generator, fill: int | tuple[int, ...]) -> np.ndarray:
    h, w = a.shape[:2]
    top, bottom, left, right = (int(rng.integers(h // 10, 6 * h // 10 + 1)) for _ in range(4))
    out = np.empty((top + h + bottom, left + w + right, *a.shape[2:]), np.uint8)
    out[...] = fill
    out[top : top + h, left : left + w] = a
    return out


def _tinted(ink: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
    """ink (light article on black, 0..255) -> RGB: a dark-coloured article on a light-coloured ground."""
    bg = rng.integers(190, 256, 3).astype(np.float32)
    fg = rng.integers(0, 111, 3).astype(np.float32)
    t = ink.astype(np.float32)[..., None] / 255.0
    rgb = np.clip(bg * (1 - t) + fg * t, 0, 255).round().astype(np.uint8)
    return rgb, tuple(int(v) for v in bg.round())


def _exif_jpeg(rgb_or_gray: np.ndarray, rng: np.random.Generator, quality: int) -> bytes:
    from PIL import Image

    orientation = int(rng.choice(list(ORIENTATIONS)))
    im = Image.fromarray(rgb_or_gray).transpose(getattr(Image.Transpose, ORIENTATIONS[orientation]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(im, "JPEG", quality=quality, exif=exif.tobytes())


def make_inputs(a: np.ndarray, kind: str, rng: np.random.Generator) -> bytes:
    """One encoded file of ``kind`` made from the 28x28 test image ``a``."""
    from PIL import Image

    if kind == "original":
        return _encode(Image.fromarray(a, "L"), "PNG")
    up = _upscale(a, rng)
    if kind == "upscaled":
        return _encode(Image.fromarray(up, "L"), "PNG")
    light = 255 - up
    if kind == "light_background":
        return _encode(Image.fromarray(light, "L"), "PNG")
    if kind == "margins":
        return _encode(Image.fromarray(_with_margins(light, rng, 255), "L"), "PNG")
    if kind == "colour":
        return _encode(Image.fromarray(_tinted(up, rng)[0], "RGB"), "PNG")
    if kind == "exif":
        return _exif_jpeg(light, rng, 95)
    if kind == "jpeg":
        return _encode(Image.fromarray(light, "L"), "JPEG", quality=int(rng.integers(70, 96)))
    if kind == "all_together":
        rgb, bg = _tinted(up, rng)
        return _exif_jpeg(_with_margins(rgb, rng, bg), rng, int(rng.integers(70, 96)))
    raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")


# ----------------------------------------------------------------------------- the model


def load_predictor(path: Path, threads: int):  # noqa: ANN201 - a zalando Predictor
    """The champion (else the newest bundle) of the file lake at ``path``, or the bundle folder ``path``."""
    from zalando import registry
    from zalando.models import load_bundle, make_predictor

    path = path.resolve()
    if (path / "bundle.json").is_file() and path.parents[1].name == "models":
        lake, experiment, version = Lake.local(path.parents[2]), path.parent.name, path.name
    else:
        if not (path / "models").is_dir():
            raise SystemExit(f"error: --bundle {path}: neither a file lake (no models/) nor a bundle folder")
        lake = Lake.local(path)
        champion = registry.get_champion(lake)
        if champion:
            experiment, version = champion["experiment"], champion["model_version"]
        else:
            keys = [k for k in lake.list_partitions("models") if k.count("/") == 2]
            if not keys:
                raise SystemExit(f"error: --bundle {path}: no committed model bundle under models/")
            _, experiment, version = max(keys, key=lambda k: k.rsplit("/", 1)[1]).split("/")
    bundle = load_bundle(lake, experiment, version)
    log.info("scoring with %s/%s", experiment, version)
    return make_predictor(bundle, runtime="torch", threads=threads), f"{experiment}/{version}"


def train_quick(data_dir: Path, n_train: int, epochs: int, threads: int, seed: int) -> Path:
    """fashion_cnn_small for ``epochs`` on ``n_train`` training images; saved in QUICK_LAKE."""
    from zalando.data.split import pixel_stats
    from zalando.models import build_bundle, get_experiment, save_bundle
    from zalando.models.experiments import ProfileParams
    from zalando.train import train_experiment

    x = read_idx_images(str(data_dir / "train-images-idx3-ubyte.gz"))
    y = read_idx_labels(str(data_dir / "train-labels-idx1-ubyte.gz")).astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    tr, va = order[:n_train], order[n_train : n_train + 2000]
    data = {"x_train": x[tr], "y_train": y[tr], "x_val": x[va], "y_val": y[va]}
    mean, std = pixel_stats(data["x_train"])
    profile = ProfileParams(
        name="photo-quick",
        description="benchmarks/photo_inputs.py --train-quick",
        experiments=("fashion_cnn_small",),
        max_epochs=epochs,
        max_train_images=n_train,
        max_val_images=2000,
        pretrained=False,
    )
    t = time.perf_counter()
    result = train_experiment(
        get_experiment("fashion_cnn_small"), profile, data, mean, std, seed=seed, threads=threads
    )
    log.info(
        "trained fashion_cnn_small in %.0f s (%d images, %d epochs)", time.perf_counter() - t, n_train, epochs
    )
    bundle = build_bundle(result, mean=mean, std=std, dataset_version="bench-photo-inputs")
    lake = Lake.local(QUICK_LAKE)
    key = save_bundle(lake, bundle)
    print(f"# quick model saved: {QUICK_LAKE / key} (reuse it with --bundle {QUICK_LAKE})", flush=True)
    return QUICK_LAKE / key


# ----------------------------------------------------------------------------- measuring


def decode_all(blobs: list[bytes], cfg: ImagePrepConfig) -> tuple[np.ndarray, int, float]:
    """(images, rejected count, mean ms per decode); a rejected file scores as a black image."""
    out = np.zeros((len(blobs), 28, 28), np.uint8)
    rejected = 0
    t = time.perf_counter()
    for i, blob in enumerate(blobs):
        try:
            out[i] = decode_image(blob, cfg, name=f"#{i}")
        except ImageRejected:
            rejected += 1
    return out, rejected, (time.perf_counter() - t) * 1000 / max(1, len(blobs))


def group_accuracy(predictor, images: np.ndarray, groups: np.ndarray) -> float:  # noqa: ANN001
    probs, _ = predictor.predict(images)
    return float((probs.argmax(1) == groups).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FULL_DATA)
    ap.add_argument("--bundle", type=Path, default=None, help="a file lake or a bundle folder in one")
    ap.add_argument("--train-quick", action="store_true", help="train a small quick model first")
    ap.add_argument("--quick-images", type=int, default=8_000, help="--train-quick: training images")
    ap.add_argument("--quick-epochs", type=int, default=3, help="--train-quick: epochs")
    ap.add_argument("--n", type=int, default=10_000, help="test images per kind (the first n)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of the kinds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    log.setLevel(logging.INFO)
    if (args.bundle is None) == (not args.train_quick):
        raise SystemExit("error: give exactly one of --bundle PATH or --train-quick")

    import torch

    torch.set_num_threads(args.threads)
    bundle_path = args.bundle
    if args.train_quick:
        bundle_path = train_quick(args.data, args.quick_images, args.quick_epochs, args.threads, args.seed)
    predictor, model_name = load_predictor(bundle_path, args.threads)

    x = read_idx_images(str(args.data / "t10k-images-idx3-ubyte.gz"))[: args.n]
    groups = np.asarray(LABEL_TO_GROUP)[
        read_idx_labels(str(args.data / "t10k-labels-idx1-ubyte.gz"))[: args.n]
    ]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    reference = group_accuracy(predictor, x, groups)
    print(f"# model {model_name}; {len(x)} test images per kind; seed {args.seed}", flush=True)
    print("| kind | " + " | ".join(PATHS) + " | rejected | ms/decode (default) |")
    print("|---|" + "---|" * (len(PATHS) + 2))
    print(f"| 28x28 arrays, no file | {' | '.join(f'{reference:.4f}' for _ in PATHS)} | - | - |", flush=True)
    for kind in kinds:
        rng = np.random.default_rng([args.seed, KINDS.index(kind)])
        blobs = [make_inputs(a, kind, rng) for a in x]
        cells, rejected, ms = [], 0, 0.0
        for i, cfg in enumerate(PATHS.values()):
            images, bad, per = decode_all(blobs, cfg)
            cells.append(f"{group_accuracy(predictor, images, groups):.4f}")
            if i == 0:
                rejected, ms = bad, per
        print(f"| {kind} | {' | '.join(cells)} | {rejected} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
