"""How should a retrain weigh reviewers' labels? Chosen on the TRAINING file only (never the test split).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/feedback_weight_study.py [--epochs 20]

The Fashion-MNIST training file is split as the pipeline splits it (48k train / 12k validation,
stratified, seed 42). 1,000 validation images, inverted (255 - pixels), stand in for reviewed
feedback: 800 of them are trained on, the rest of the validation split is the measure, both as it is
(the originals) and inverted (unseen inverted images). Each candidate weighting trains fashion_cnn
(the cpu profile's experiment, fewer epochs to keep the study cheap) and prints group accuracy on
both. Relative numbers only: the study's epochs are fewer than the nightly's 60.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zalando.data.idx import read_idx_images, read_idx_labels  # noqa: E402
from zalando.data.split import pixel_stats, stratified_split  # noqa: E402
from zalando.labels import LABEL_TO_GROUP  # noqa: E402
from zalando.models.experiments import load_catalog  # noqa: E402
from zalando.train import train_experiment  # noqa: E402
from zalando.validation import predict_logits  # noqa: E402


def group_acc(result, x: np.ndarray, groups: np.ndarray, mean: float, std: float) -> float:
    import torch

    logits = predict_logits(result.model, x, mean, std, hflip=result.spec.tta == "hflip")
    p = torch.softmax(logits, 1).numpy()
    g = np.zeros((len(p), 5))
    np.add.at(g.T, LABEL_TO_GROUP, p.T)
    return float((g.argmax(1) == groups).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent.parent / "shared/data/fashion-mnist"))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--feedback", type=int, default=1000)
    ap.add_argument("--configs", default="w2,w6,rep6", help="wK: weight K; repK: K copies of weight 1")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    x = read_idx_images(f"{args.data}/train-images-idx3-ubyte.gz")
    y = read_idx_labels(f"{args.data}/train-labels-idx1-ubyte.gz")
    is_val = stratified_split(y, 0.2, 42)
    xtr, ytr, xva, yva = x[~is_val], y[~is_val], x[is_val], y[is_val]
    mean, std = pixel_stats(xtr)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(xva))
    fb, rest = order[: args.feedback], order[args.feedback :]
    n_tr = int(round(0.8 * len(fb)))
    fb_train = fb[:n_tr]
    gva = LABEL_TO_GROUP[yva]
    cat = load_catalog()
    profile = cat.profile("cpu").model_copy(update={"max_epochs": args.epochs})
    spec = cat.resolved("fashion_cnn", "cpu").model_copy(update={"profile": None})
    print(f"train {len(xtr)} originals + {n_tr} inverted feedback; measured on {len(rest)} val images")
    for cfg in args.configs.split(","):
        kind, k = (cfg[:3], float(cfg[3:])) if cfg.startswith("rep") else (cfg[:1], float(cfg[1:]))
        xf, gf = 255 - xva[fb_train], gva[fb_train]
        wf = np.full(len(xf), k if kind == "w" else 1.0, np.float32)
        if kind == "rep":
            xf, gf, wf = (np.repeat(a, int(k), axis=0) for a in (xf, gf, wf))
        data = {
            "x_train": xtr, "y_train": ytr, "x_val": xva[rest], "y_val": yva[rest],
            "x_feedback": np.ascontiguousarray(xf), "g_feedback": gf, "w_feedback": wf,
        }  # fmt: skip
        t0 = time.perf_counter()
        res = train_experiment(spec, profile, data, mean, std, seed=42, threads=args.threads, device="cpu")
        orig = group_acc(res, xva[rest], gva[rest], mean, std)
        inv = group_acc(res, 255 - xva[rest], gva[rest], mean, std)
        print(
            f"{cfg:>6}: val group acc originals {orig:.4f}  inverted {inv:.4f}  "
            f"({res.epochs_run} epochs, {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
