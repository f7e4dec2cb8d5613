"""Drift statistics against batch size on the real Fashion-MNIST test split (issue 15): the false-alarm
rate of each statistic at each batch size, and how often drifted batches are caught.

    .venv/bin/python benchmarks/drift_sample_size.py [--data DIR] [--draws 200] [--power-draws 20]
                                                     [--onnx models/<experiment>/<version>/model.onnx]

The reference profile is built as training builds it: a stratified 80/20 split of the 60,000 training
images (pixel statistics and group prior from the training part, confidence and embeddings from the
validation part). Clean batches are drawn without replacement from the 10,000 test images; drifted
ones are the unit tests' cases (``tests/monitoring_support.DRIFT_CASES``: inverted, rotated, one group,
more bags, brighter, washed out, blended...).

The model: with ``--onnx``, a trained bundle's scoring graph (``model.onnx`` of a bundle in the lake:
pixels -> group probabilities and embedding); without, the deterministic stand-in of the unit tests
(``tests/monitoring_support.DiscriminantModel``: shrinkage LDA on pooled pixels, temperature and
operating point set on validation, about 94% grouped test accuracy), because a champion bundle may
not exist. The statistics only need realistic distributions of probabilities and embeddings.

"Old rule" is the rule before issue 15, recomputed from the same rows (the values and thresholds did
not change): the fixed thresholds alone on the PSI, pixel and MMD rows, and nothing below 50 images.
Sizes under a statistic's ``min_n`` are marked: there it never alarms, and the table says how often
it would have.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.monitoring_support import (  # noqa: E402
    DRIFT_CASES,
    DiscriminantModel,
    drift_batch,
    read_fashion,
)
from zalando.data.split import stratified_split  # noqa: E402
from zalando.drift import DriftThresholds, drift_report, reference_profile  # noqa: E402
from zalando.labels import LABEL_TO_GROUP  # noqa: E402
from zalando.report import markdown_table  # noqa: E402

SIZES = (20, 30, 50, 100, 200, 500, 1000, 2000)
POWER_SIZES = (50, 200, 500)
THRESHOLD_ONLY = {
    "group_mix_psi",
    "confidence_psi",
    "pixel_mean",
    "pixel_std",
    "dark_fraction",
    "embedding_mmd2",
}
RELAXED = DriftThresholds(min_batch_size=1, min_expected_count=1e-9)  # the rule without min_n


def build_world(data: Path, onnx: Path | None) -> dict[str, Any]:
    """Model, reference profile (as training writes it) and the scored test split."""
    x, y = read_fashion(data, "train")
    is_val = stratified_split(y, 0.2, seed=0)
    x_tr, y_tr, x_val, y_val = x[~is_val], y[~is_val], x[is_val], y[is_val]
    if onnx is None:
        model, name = (
            DiscriminantModel(x_tr, y_tr, x_val, y_val),
            "stand-in: shrinkage LDA (tests/monitoring_support)",
        )
    else:
        from zalando.runtime import OnnxPredictor

        model, name = OnnxPredictor(onnx.read_bytes(), threads=2).predict, f"ONNX scoring graph {onnx}"
    p_val, e_val = model(x_val)
    prior = np.bincount(LABEL_TO_GROUP[y_tr], minlength=5)
    ref = reference_profile(x_tr, p_val, e_val, prior, seed=0)
    x_test, y_test = read_fashion(data, "t10k")
    p_test, e_test = model(x_test)
    return {
        "name": name, "model": model, "ref": ref, "x": x_test, "y": y_test, "p": p_test, "e": e_test,
    }  # fmt: skip


def classify(world: dict[str, Any], x: np.ndarray, p: np.ndarray, e: np.ndarray, min_n: pd.Series) -> dict:
    """Per statistic: alarm under the new rule, and under the old rule, for one batch."""
    df = drift_report(x, p, e, world["ref"], RELAXED).set_index("statistic")
    n = len(x)
    new = df["alarm"] & (n >= min_n)
    old_fixed = df.index.isin(list(THRESHOLD_ONLY)) & (df["value"] > df["threshold"])
    old = (n >= 50) & (old_fixed | (~df.index.isin(list(THRESHOLD_ONLY)) & df["alarm"]))
    would = df["alarm"] & (n < min_n)  # what an untrusted statistic would have raised
    return {"new": new, "old": old, "would": would}


def clean_rates(world: dict[str, Any], draws: int, min_n: pd.Series) -> pd.DataFrame:
    """False-alarm rates on clean test-split batches: per statistic (new rule), any (new, old)."""
    rng = np.random.default_rng(12345)
    rows = []
    for n in SIZES:
        new = pd.Series(0.0, index=min_n.index)
        would = new.copy()
        any_new = any_old = 0
        for _ in range(draws):
            idx = rng.choice(len(world["x"]), n, replace=False)
            r = classify(world, world["x"][idx], world["p"][idx], world["e"][idx], min_n)
            new += r["new"]
            would += r["would"]
            any_new += bool(r["new"].any())
            any_old += bool(r["old"].any())
        row = {"n": n, "any alarm": any_new / draws, "any (old rule)": any_old / draws}
        for stat in min_n.index:
            row[stat] = f"({would[stat] / draws:.3f})" if n < min_n[stat] else f"{new[stat] / draws:.3f}"
        rows.append(row)
        logging.info("clean n=%d: %d draws", n, draws)
    return pd.DataFrame(rows)


def power(world: dict[str, Any], draws: int, min_n: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How often each drift case alarms (new / old rule) per size, and per statistic at 500 images."""
    rows, per_stat = [], []
    for case in DRIFT_CASES:
        row: dict[str, Any] = {"case": case}
        for n in POWER_SIZES:
            hit_new = hit_old = 0
            stat_new = pd.Series(0.0, index=min_n.index)
            stat_old = stat_new.copy()
            for seed in range(draws):
                x = drift_batch(case, world["x"], world["y"], n, 7000 + seed)
                p, e = world["model"](x)
                r = classify(world, x, p, e, min_n)
                hit_new += bool(r["new"].any())
                hit_old += bool(r["old"].any())
                stat_new += r["new"]
                stat_old += r["old"]
            row[f"n={n}"] = f"{hit_new / draws:.2f} ({hit_old / draws:.2f})"
            if n == 500:
                per_stat.append(
                    {
                        "case": case,
                        **{s: f"{stat_new[s] / draws:.2f} ({stat_old[s] / draws:.2f})" for s in min_n.index},
                    }
                )
        rows.append(row)
        logging.info("power: %s", case)
    return pd.DataFrame(rows), pd.DataFrame(per_stat)


def detectable_sizes(th: DriftThresholds, ref_n: int) -> pd.DataFrame:
    """Smallest n at which a shift exactly at each threshold is caught half the time (at alpha).

    Asymptotic: a z-test for the pixel SMD; noncentral chi-square for Cohen's w and for PSI (PSI is
    about chi2 / n for small shifts, so lambda is about n x PSI); Kolmogorov's limit for KS D.
    """
    z = stats.norm.isf(th.alpha / 2)

    def chi2_n(effect2: float, df: int) -> float:
        crit = stats.chi2.isf(th.alpha, df)
        return optimize.brentq(lambda n: stats.ncx2.sf(crit, df, n * effect2) - 0.5, 1.0, 1e7)

    en = (stats.kstwobign.isf(th.alpha) / th.confidence_min_ks) ** 2  # n m / (n + m)
    return pd.DataFrame(
        [
            ("group_mix_psi", f"PSI {th.group_mix_psi:g}", chi2_n(th.group_mix_psi, 4)),
            ("group_mix_chi2", f"w {th.group_mix_min_effect:g}", chi2_n(th.group_mix_min_effect**2, 4)),
            ("confidence_psi", f"PSI {th.confidence_psi:g}", chi2_n(th.confidence_psi, 8)),
            ("confidence_ks", f"D {th.confidence_min_ks:g}", en * ref_n / (ref_n - en)),
            ("pixel_*", f"SMD {th.pixel_smd:g}", (z / th.pixel_smd) ** 2),
        ],
        columns=["statistic", "shift at the threshold", "caught half the time from n"],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "fashion-mnist")
    ap.add_argument("--draws", type=int, default=200, help="clean batches per size")
    ap.add_argument("--power-draws", type=int, default=20, help="drifted batches per case and size")
    ap.add_argument("--onnx", type=Path, default=None, help="a bundle's model.onnx (default: the stand-in)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("zalando", "zalando.drift"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.perf_counter()
    world = build_world(args.data, args.onnx)
    ref = world["ref"]
    min_n = drift_report(world["x"][:50], world["p"][:50], world["e"][:50], ref).set_index("statistic")[
        "min_n"
    ]
    pred = world["p"].argmax(1)
    mix = np.bincount(pred, minlength=5) / len(pred)
    prior = np.asarray(ref["group_prior"])
    print(f"model: {world['name']}")
    print(
        f"test split: {len(pred)} images, grouped accuracy {(pred == LABEL_TO_GROUP[world['y']]).mean():.4f}, "
        f"predicted group mix vs training prior: Cohen's w {np.sqrt(((mix - prior) ** 2 / prior).sum()):.3f}"
    )
    print(
        f"reference: {ref['confidence_n']} validation rows (confidence), {ref['pixel_n']} training images (pixels)"
    )
    print("min_n (smallest trusted batch) per statistic: " + ", ".join(f"{k} {v}" for k, v in min_n.items()))
    print(
        f"\n## False alarms on clean test-split batches ({args.draws} per size; (x): under min_n, would-be rate)\n"
    )
    print(markdown_table(clean_rates(world, args.draws, min_n)))
    by_size, by_stat = power(world, args.power_draws, min_n)
    print(f"\n## Drifted batches caught: new rule (old rule), {args.power_draws} batches per case and size\n")
    print(markdown_table(by_size))
    print("\n## Per statistic at 500 images: new rule (old rule)\n")
    print(markdown_table(by_stat))
    print(
        f"\n## Smallest batch that catches a shift at the threshold half the time (alpha {RELAXED.alpha:g})\n"
    )
    print(
        markdown_table(detectable_sizes(DriftThresholds(), len(ref["confidence_sample"])), float_format=".0f")
    )
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
