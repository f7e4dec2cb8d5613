"""Quality gates, the canary set, drift statistics without labels, and labelled KPIs.

Everything here is pure numpy/pandas/pyarrow: the callers (tasks) read inputs from the lake and
write the returned tables back. Three families of checks:

* **Gates** (:func:`evaluate_gates`): may a challenger replace the champion? Per-group floors on
  recall, precision and NPV, latency, size, canary accuracy, and a macro-F1 margin over the champion.
* **Drift without labels** (:func:`reference_profile`, :func:`drift_report`): a scored batch against
  a reference stored at training time — predicted group mix, confidence, pixel statistics and
  embedding MMD.
* **Labelled KPIs** (:func:`labelled_kpis`): when a batch has labels, the study's alarm — a group's
  true positives (recall) or precision falling below a threshold.

Alarm rule for the statistical tests: a row alarms only when the shift is both *significant*
(p-value below ``alpha``) and *large enough to matter* (an effect size above a floor). On a batch of
10,000 images a chi-square test flags shifts of a fraction of a percent that no one should retrain
for; an effect-size floor alone is noisy on small batches. Needing both avoids either failure.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from zalando.errors import DataError
from zalando.labels import GROUP_KEYS, GROUP_NAMES, LABEL_NAMES, NUM_GROUPS, group_index, group_of
from zalando.study import STUDY_BEST

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- gates


class GroupFloors(BaseModel):
    """Minimum recall, precision and NPV of one group (compared at ``GateConfig.decimals`` places)."""

    model_config = ConfigDict(extra="forbid")
    recall: float = Field(ge=0.0, le=1.0)
    precision: float = Field(ge=0.0, le=1.0)
    npv: float = Field(ge=0.0, le=1.0)


# The study's best model (MobileNetV2 fully fine-tuned), per group, as printed with 2 decimals.
STUDY_FLOORS: dict[str, dict[str, float]] = STUDY_BEST


def _default_floors() -> dict[str, GroupFloors]:
    return {g: GroupFloors(**v) for g, v in STUDY_FLOORS.items()}


class GateConfig(BaseModel):
    """What a challenger must pass to be promoted.

    Floors are compared after rounding half-up to ``decimals`` places, like the study's table: with
    2 decimals a floor of 1.00 means "at least 0.995", so a Footwear recall of 0.9950 passes and
    0.9949 fails. (An exact 1.00 would fail any model that makes a single mistake on validation.)

    Champion margin: the challenger's macro F1 must be >= champion macro F1 + ``min_f1_margin``
    (not rounded). With the default 0.001 a tie fails; set 0.0 to let ties pass.
    """

    model_config = ConfigDict(extra="forbid")
    floors: dict[str, GroupFloors] = Field(default_factory=_default_floors)
    decimals: int = Field(default=2, ge=0, le=6)
    max_latency_ms_per_1000: float | None = Field(default=1000.0, gt=0)
    max_size_mb: float | None = Field(default=50.0, gt=0)
    min_f1_margin: float = Field(default=0.001, ge=0.0)
    canary_floor: float | None = Field(default=0.5, ge=0.0, le=1.0)
    max_canary_drop: float | None = Field(default=0.05, ge=0.0, le=1.0)
    require_same_dataset: bool = True

    @field_validator("floors", mode="before")
    @classmethod
    def _normalise_group_names(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {GROUP_NAMES[group_index(k)]: f for k, f in v.items()}
        return v


class GateDecision(BaseModel):
    """The outcome of :func:`evaluate_gates`: every number compared, and why it failed if it did."""

    promote: bool
    challenger_version: str | None = None
    champion_version: str | None = None
    rows: list[dict[str, Any]]
    reasons: list[str]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["check", "value", "threshold", "rule", "passed"])

    def to_markdown(self) -> str:
        """A Markdown table for a Prefect artifact or a report."""
        verdict = "PROMOTE" if self.promote else "REJECT"
        lines = [
            f"**Gate decision: {verdict}** challenger `{self.challenger_version}` "
            f"vs champion `{self.champion_version}`",
            "",
            "| check | value | rule | threshold | passed |",
            "| --- | ---: | :---: | ---: | :---: |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['check']} | {_fmt(r['value'])} | {r['rule']} | {_fmt(r['threshold'])} | "
                f"{'yes' if r['passed'] else '**no**'} |"
            )
        if self.reasons:
            lines += ["", *[f"- {r}" for r in self.reasons]]
        return "\n".join(lines)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _per_group_map(per_group: Any, who: str) -> dict[int, Mapping[str, Any]]:
    """Accept {group name/key: {recall, precision, npv, ...}}, a list of records or a DataFrame."""
    if per_group is None:
        return {}
    if isinstance(per_group, pd.DataFrame):
        per_group = per_group.to_dict("records")
    if isinstance(per_group, Mapping):
        return {group_index(k): v for k, v in per_group.items()}
    out: dict[int, Mapping[str, Any]] = {}
    for rec in per_group:
        gid = next((rec[c] for c in ("group_name", "group", "group_key") if c in rec), None)
        if gid is None:
            raise DataError(f"{who} per_group record {rec!r}: needs a group_name, group or group_key field")
        g = group_index(gid if not isinstance(gid, float) else int(gid))
        if g in out:
            raise DataError(
                f"{who} per_group: group {GROUP_NAMES[g]!r} appears twice (filter one split, e.g. 'val')"
            )
        out[g] = rec
    return out


def gate_metrics(
    per_group: pd.DataFrame,
    summary: pd.DataFrame,
    performance: pd.DataFrame | None = None,
    *,
    model_version: str,
    dataset_version: str,
    canary_accuracy: float | None = None,
    split: str = "val",
) -> dict[str, Any]:
    """Build the metric dict :func:`evaluate_gates` reads from ``zalando.evaluate``'s frames.

    ``per_group`` and ``summary`` rows are filtered to ``split`` when they have a split column.
    Latency is that of the fastest runtime in ``performance`` (ms per 1,000 images =
    1e6 / images_per_s); size is that runtime's file (size_mb_onnx for "onnx", else size_mb_torch).
    """

    def pick(frame: pd.DataFrame, name: str) -> pd.DataFrame:
        if "split" in frame.columns:
            frame = frame[frame["split"] == split]
        if frame.empty:
            raise DataError(f"{name}: no rows for split {split!r}")
        return frame

    pg = pick(per_group, "per_group")
    sm = pick(summary, "summary")
    if len(sm) != 1 or "macro_f1" not in sm.columns:
        raise DataError(f"summary: expected one row with macro_f1 for split {split!r}, got {len(sm)} rows")
    out: dict[str, Any] = {
        "model_version": model_version,
        "dataset_version": dataset_version,
        "split": split,
        "per_group": {
            GROUP_NAMES[group_index(r["group_name"])]: {
                k: _num(r.get(k)) for k in ("recall", "precision", "npv", "f1", "support")
            }
            for r in pg.to_dict("records")
        },
        "macro_f1": _num(sm["macro_f1"].iloc[0]),
        "accuracy": _num(sm["accuracy"].iloc[0]) if "accuracy" in sm.columns else None,
        "latency_ms_per_1000": None,
        "size_mb": None,
        "runtime": None,
        "canary_accuracy": canary_accuracy,
    }
    if performance is not None and len(performance) and "images_per_s" in performance.columns:
        perf = performance[performance["images_per_s"].astype(float) > 0]
        if len(perf):
            best = perf.loc[perf["images_per_s"].astype(float).idxmax()].to_dict()
            out["runtime"] = best.get("runtime")
            out["latency_ms_per_1000"] = 1e6 / float(best["images_per_s"])
            size_cols = (
                ("size_mb_onnx", "size_mb_torch") if best.get("runtime") == "onnx" else ("size_mb_torch",)
            )
            out["size_mb"] = next(
                (_num(best.get(c)) for c in size_cols if _num(best.get(c)) is not None), None
            )
    return out


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def evaluate_gates(
    challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, config: GateConfig | None = None
) -> GateDecision:
    """Decide whether ``challenger`` may replace ``champion``; a missing metric fails its check.

    Metric dicts (the same shape that :func:`zalando.registry.register_model` stores)::

        {"model_version": str, "dataset_version": str,
         "per_group": {"Upper part": {"recall": .97, "precision": .98, "npv": .99}, ...},
         "macro_f1": float, "latency_ms_per_1000": float, "size_mb": float,
         "canary_accuracy": float}

    ``per_group`` may also be a list of records or a DataFrame with a ``group_name`` column. The
    champion's numbers must come from the same validation data (same ``dataset_version``).
    """
    config = config or GateConfig()
    rows: list[dict[str, Any]] = []
    reasons: list[str] = []
    half = 0.5 * 10.0 ** (-config.decimals)

    def add(
        check: str, value: float | None, threshold: float | None, rule: str, passed: bool, why: str
    ) -> None:
        rows.append({"check": check, "value": value, "threshold": threshold, "rule": rule, "passed": passed})
        if not passed:
            reasons.append(why)

    pg = _per_group_map(challenger.get("per_group"), "challenger")
    for gname, floors in config.floors.items():
        metrics = pg.get(group_index(gname), {})
        for metric in ("recall", "precision", "npv"):
            floor = getattr(floors, metric)
            value = _num(metrics.get(metric))
            # rounding half-up to `decimals` places, then >= floor, without float-rounding surprises
            passed = value is not None and value + 1e-12 >= floor - half
            why = (
                f"{gname} {metric} {'missing' if value is None else f'{value:.4f}'} "
                f"below floor {floor:.{config.decimals}f}"
            )
            add(f"{metric}[{gname}]", value, floor, f">= ({config.decimals} dp)", passed, why)

    if config.max_latency_ms_per_1000 is not None:
        v = _num(challenger.get("latency_ms_per_1000"))
        thr = config.max_latency_ms_per_1000
        add(
            "latency_ms_per_1000", v, thr, "<=", v is not None and v <= thr,
            f"latency {'missing' if v is None else f'{v:.1f} ms'} per 1,000 images above {thr:.1f} ms",
        )  # fmt: skip
    if config.max_size_mb is not None:
        v = _num(challenger.get("size_mb"))
        thr = config.max_size_mb
        add(
            "size_mb", v, thr, "<=", v is not None and v <= thr,
            f"model size {'missing' if v is None else f'{v:.2f} MB'} above {thr:.2f} MB",
        )  # fmt: skip

    canary = _num(challenger.get("canary_accuracy"))
    if config.canary_floor is not None:
        thr = config.canary_floor
        add(
            "canary_accuracy", canary, thr, ">=", canary is not None and canary >= thr,
            f"canary accuracy {'missing' if canary is None else f'{canary:.4f}'} below floor {thr:.4f}",
        )  # fmt: skip
    champ_canary = _num(champion.get("canary_accuracy")) if champion else None
    if config.max_canary_drop is not None and champ_canary is not None:
        thr = champ_canary - config.max_canary_drop
        add(
            "canary_accuracy_vs_champion", canary, thr, ">=", canary is not None and canary >= thr - 1e-12,
            f"canary accuracy {'missing' if canary is None else f'{canary:.4f}'} dropped more than "
            f"{config.max_canary_drop:.4f} below the champion's {champ_canary:.4f}",
        )  # fmt: skip

    f1 = _num(challenger.get("macro_f1"))
    if champion is None:
        add("macro_f1_vs_champion", f1, None, "no champion", f1 is not None, "challenger macro F1 missing")
    else:
        champ_f1 = _num(champion.get("macro_f1"))
        ds_c, ds_ch = challenger.get("dataset_version"), champion.get("dataset_version")
        if config.require_same_dataset and ds_c and ds_ch and ds_c != ds_ch:
            add(
                "macro_f1_vs_champion", f1, None, "same data", False,
                f"champion macro F1 was measured on dataset {ds_ch!r}, the challenger's on {ds_c!r}: "
                "evaluate the champion on the same validation data",
            )  # fmt: skip
        else:
            thr = None if champ_f1 is None else champ_f1 + config.min_f1_margin
            passed = f1 is not None and thr is not None and f1 >= thr - 1e-12
            if config.min_f1_margin > 0 and f1 is not None and champ_f1 is not None and f1 <= champ_f1:
                passed = False  # a tie never "beats by a margin", whatever float rounding says
            add(
                "macro_f1_vs_champion", f1, thr, f">= champion + {config.min_f1_margin:g}", passed,
                f"macro F1 {_fmt(f1)} does not beat the champion's {_fmt(champ_f1)} "
                f"by {config.min_f1_margin:g}",
            )  # fmt: skip

    decision = GateDecision(
        promote=all(r["passed"] for r in rows),
        challenger_version=challenger.get("model_version"),
        champion_version=champion.get("model_version") if champion else None,
        rows=rows,
        reasons=reasons,
    )
    log.info(
        "gates for %s vs %s: %s (%d/%d checks passed)",
        decision.challenger_version,
        decision.champion_version,
        "promote" if decision.promote else "reject",
        sum(r["passed"] for r in rows),
        len(rows),
    )
    return decision


# ---------------------------------------------------------------------------------------------- canary

UPPER, ONE_PIECE = GROUP_NAMES.index("Upper part"), GROUP_NAMES.index("One piece")


def _check_images(images: np.ndarray, who: str) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{who}: expected an (N, 28, 28) image array, got shape {x.shape}")
    if x.dtype != np.uint8:
        raise DataError(f"{who}: expected uint8 pixels 0..255, got dtype {x.dtype}")
    return x


def _check_probs(probs: np.ndarray, n: int, who: str) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (n, NUM_GROUPS):
        raise DataError(f"{who}: expected shape ({n}, {NUM_GROUPS}), got {p.shape}")
    if not np.isfinite(p).all():
        raise DataError(f"{who}: contains NaN or infinite values")
    return p


def _pooled_features(images: np.ndarray) -> np.ndarray:
    """7x7 average-pooled pixels / 255: a cheap, deterministic 49-d shape descriptor."""
    x = images.reshape(len(images), 7, 4, 7, 4).astype(np.float32)
    return x.mean(axis=(2, 4)).reshape(len(images), 49) / 255.0


def select_canary_set(
    val_images: np.ndarray,
    val_labels: np.ndarray,
    val_group_probs: np.ndarray | None = None,
    n: int = 200,
    *,
    image_ids: list[str] | np.ndarray | None = None,
) -> pa.Table:
    """The hardest One piece / Upper part look-alikes of the validation split, half from each group.

    Hardness is the margin p(true group) - p(the look-alike group) under a reference model's
    ``val_group_probs``; without a model, the same margin under a nearest-centroid rule on 7x7 pooled
    pixels (deterministic). Lowest margin first. Returns an Arrow table in the raw schema (image_id,
    image, label, label_name, group, group_name) plus val_index, margin and method, for the caller
    to commit to the lake once and reuse every night.
    """
    x = _check_images(val_images, "val_images")
    y = np.asarray(val_labels)
    if y.shape != (len(x),):
        raise DataError(f"val_labels: expected shape ({len(x)},) to match val_images, got {y.shape}")
    if n < 2:
        raise DataError(f"canary size n: must be >= 2, got {n}")
    g = group_of(y)
    cand = np.flatnonzero((g == UPPER) | (g == ONE_PIECE))
    if not (g[cand] == UPPER).any() or not (g[cand] == ONE_PIECE).any():
        raise DataError("val_labels: the canary set needs both Upper part and One piece images")
    other = np.where(g[cand] == UPPER, ONE_PIECE, UPPER)
    if val_group_probs is not None:
        p = _check_probs(val_group_probs, len(x), "val_group_probs")[cand]
        rows = np.arange(len(cand))
        margin = p[rows, g[cand]] - p[rows, other]
        method = "reference_model"
    else:
        f = _pooled_features(x[cand])
        cu, co = f[g[cand] == UPPER].mean(0), f[g[cand] == ONE_PIECE].mean(0)
        du, do = np.linalg.norm(f - cu, axis=1), np.linalg.norm(f - co, axis=1)
        d_own = np.where(g[cand] == UPPER, du, do)
        d_other = np.where(g[cand] == UPPER, do, du)
        margin = (d_other - d_own) / np.maximum(d_other + d_own, 1e-12)
        method = "pixel_centroid"

    picked: list[np.ndarray] = []
    want = {ONE_PIECE: n // 2, UPPER: n - n // 2}
    by_group = {grp: np.flatnonzero(g[cand] == grp) for grp in want}
    for grp in (ONE_PIECE, UPPER):
        idx = by_group[grp][np.argsort(margin[by_group[grp]], kind="stable")]
        picked.append(idx[: want[grp]])
    short = n - sum(len(p) for p in picked)
    if short > 0:  # one group has too few images: fill from the other's next hardest
        for k, grp in enumerate((ONE_PIECE, UPPER)):
            idx = by_group[grp][np.argsort(margin[by_group[grp]], kind="stable")]
            extra = idx[len(picked[k]) : len(picked[k]) + short]
            picked[k] = np.concatenate([picked[k], extra])
            short -= len(extra)
        if short > 0:
            log.warning("canary set: only %d candidates, wanted %d", n - short, n)
    sel = np.concatenate(picked)
    sel = sel[np.argsort(margin[sel], kind="stable")]
    vi = cand[sel]
    if image_ids is not None and len(image_ids) != len(x):
        raise DataError(f"image_ids: expected {len(x)} ids to match val_images, got {len(image_ids)}")
    ids = (
        [f"val-{i:05d}" for i in vi]
        if image_ids is None
        else [str(s) for s in np.asarray(image_ids, dtype=object)[vi]]
    )
    labels = y[vi].astype(np.int8)
    groups = g[vi].astype(np.int8)
    log.info(
        "canary set: %d images (%s), margin %.3f..%.3f", len(vi), method, margin[sel].min(), margin[sel].max()
    )
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "image": pa.array([x[i].tobytes() for i in vi], pa.binary(784)),
            "label": pa.array(labels, pa.int8()),
            "label_name": pa.array([LABEL_NAMES[i] for i in labels], pa.string()),
            "group": pa.array(groups, pa.int8()),
            "group_name": pa.array([GROUP_NAMES[i] for i in groups], pa.string()),
            "val_index": pa.array(vi.astype(np.int32), pa.int32()),
            "margin": pa.array(margin[sel].astype(np.float32), pa.float32()),
            "method": pa.array([method] * len(vi), pa.string()),
        }
    )


def canary_accuracy(group_probs: np.ndarray, true_groups: np.ndarray) -> float:
    """Group accuracy on the canary set (``true_groups`` is the table's ``group`` column)."""
    t = np.asarray(true_groups).astype(np.int64)
    if t.ndim != 1 or len(t) == 0:
        raise DataError(f"true_groups: expected a non-empty 1-d array, got shape {t.shape}")
    p = _check_probs(group_probs, len(t), "canary group_probs")
    return float((p.argmax(axis=1) == t).mean())


# ---------------------------------------------------------------------------------------------- drift

# Fixed confidence bins: max group probability lives in [0.2, 1]; most mass sits near 1.
CONFIDENCE_EDGES: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
_PSI_EPS = 1e-4


class DriftThresholds(BaseModel):
    """When a drift statistic alarms. See the module docstring for the significance+effect rule."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(default=0.001, gt=0.0, lt=1.0)
    group_mix_psi: float = Field(default=0.2, gt=0.0)
    group_mix_min_effect: float = Field(default=0.1, gt=0.0)  # Cohen's w = sqrt(chi2 / n)
    confidence_psi: float = Field(default=0.2, gt=0.0)
    confidence_min_ks: float = Field(default=0.1, gt=0.0, le=1.0)
    pixel_smd: float = Field(default=0.25, gt=0.0)  # |batch mean - train mean| / train sd, per-image stat
    mmd_factor: float = Field(default=1.5, gt=0.0)  # times the threshold calibrated on the reference
    mmd_sample_size: int = Field(default=500, ge=10, le=5000)
    min_batch_size: int = Field(default=50, ge=1)
    seed: int = 0


def _pixel_stats(images: np.ndarray, dark_level: int) -> np.ndarray:
    """Per image: mean and std of pixels/255 and the fraction of pixels <= dark_level. (N, 3)."""
    flat = images.reshape(len(images), -1)
    s = flat.sum(axis=1, dtype=np.int64).astype(np.float64)
    ss = np.einsum("ij,ij->i", flat.astype(np.float32), flat.astype(np.float32)).astype(np.float64)
    npx = flat.shape[1]
    mean = s / npx
    std = np.sqrt(np.maximum(ss / npx - mean**2, 0.0))
    dark = (flat <= dark_level).sum(axis=1) / npx
    return np.stack([mean / 255.0, std / 255.0, dark], axis=1)


_PIXEL_STATS = ("pixel_mean", "pixel_std", "dark_fraction")


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aa = np.einsum("ij,ij->i", a, a)[:, None]
    bb = np.einsum("ij,ij->i", b, b)[None, :]
    return np.maximum(aa + bb - 2.0 * (a @ b.T), 0.0)


def _mmd2_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 estimate from kernel blocks."""
    n, m = len(kxx), len(kyy)
    sx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    sy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sx + sy - 2.0 * kxy.mean())


def mmd2_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD^2 between samples x and y under k(a, b) = exp(-|a-b|^2 / (2 bandwidth^2))."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise DataError(f"MMD needs at least 2 samples on each side, got {len(x)} and {len(y)}")
    g = 1.0 / (2.0 * bandwidth**2)
    return _mmd2_from_kernels(
        np.exp(-g * _sq_dists(x, x)), np.exp(-g * _sq_dists(y, y)), np.exp(-g * _sq_dists(x, y))
    )


def _subsample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= k else np.sort(rng.choice(n, size=k, replace=False))


def reference_profile(
    train_images: np.ndarray,
    val_group_probs: np.ndarray,
    val_embeddings: np.ndarray,
    train_group_prior: np.ndarray,
    sample_size: int = 500,
    seed: int = 0,
    *,
    dark_level: int = 25,
    pixel_sample: int = 20000,
    confidence_sample: int = 5000,
    calibration_splits: int = 100,
) -> dict[str, Any]:
    """What a clean batch looks like, computed once per model at training time.

    ``train_images`` (uint8 (N,28,28)) give the pixel statistics, ``val_group_probs`` (from the
    model being monitored) the confidence distribution, ``val_embeddings`` the MMD reference sample
    (``sample_size`` rows), ``train_group_prior`` the group counts or proportions of the training
    split. The MMD bandwidth is the median pairwise distance of the reference sample; its threshold
    is the 99th percentile of the MMD^2 between random halves of the reference (no labels, no
    permutations at scoring time). Store it with :func:`reference_to_table`.
    """
    x = _check_images(train_images, "train_images")
    emb = np.asarray(val_embeddings, dtype=np.float64)
    if emb.ndim != 2 or len(emb) < 4:
        raise DataError(f"val_embeddings: expected an (N>=4, D) array, got shape {emb.shape}")
    p = _check_probs(val_group_probs, len(emb), "val_group_probs")
    prior = np.asarray(train_group_prior, dtype=np.float64)
    if prior.shape != (NUM_GROUPS,) or (prior < 0).any() or prior.sum() <= 0:
        raise DataError(
            f"train_group_prior: expected {NUM_GROUPS} non-negative counts or proportions, got {prior}"
        )
    if not np.isfinite(emb).all():
        raise DataError("val_embeddings: contain NaN or infinite values")
    rng = np.random.default_rng(seed)

    stats = _pixel_stats(x[_subsample(len(x), pixel_sample, rng)], dark_level)
    conf = p.max(axis=1).astype(np.float32).astype(np.float64)
    conf_props = np.histogram(conf, bins=np.array(CONFIDENCE_EDGES))[0] / len(conf)
    conf_sample = np.sort(conf[_subsample(len(conf), confidence_sample, rng)]).astype(np.float32)

    ref = emb[_subsample(len(emb), sample_size, rng)]
    d2 = _sq_dists(ref, ref)
    iu = np.triu_indices(len(ref), k=1)
    bandwidth = float(np.sqrt(np.median(d2[iu])))
    if not bandwidth > 0:
        raise DataError("val_embeddings: the reference sample has no spread (all rows equal)")
    k = np.exp(-d2 / (2.0 * bandwidth**2))
    h = len(ref) // 2
    null = []
    for _ in range(calibration_splits):
        perm = rng.permutation(len(ref))
        a, b = perm[:h], perm[h : 2 * h]
        null.append(_mmd2_from_kernels(k[np.ix_(a, a)], k[np.ix_(b, b)], k[np.ix_(a, b)]))
    mmd_q99 = float(np.quantile(null, 0.99))

    profile = {
        "version": 1,
        "seed": int(seed),
        "dark_level": int(dark_level),
        "group_prior": (prior / prior.sum()).tolist(),
        "pixel_mean": stats.mean(axis=0).tolist(),
        "pixel_sd": stats.std(axis=0).tolist(),
        "pixel_n": int(len(stats)),
        "confidence_edges": list(CONFIDENCE_EDGES),
        "confidence_props": conf_props.tolist(),
        "confidence_sample": conf_sample,
        "embedding_sample": ref.astype(np.float32),
        "mmd_bandwidth": bandwidth,
        "mmd_half_size": int(h),
        "mmd_half_q99": max(mmd_q99, 0.0),
    }
    log.info(
        "reference profile: %d train images, %d val rows, embedding dim %d, MMD bandwidth %.4g, half-split q99 %.3g",
        len(x), len(emb), emb.shape[1], bandwidth, mmd_q99,
    )  # fmt: skip
    return profile


def reference_to_table(reference: Mapping[str, Any]) -> pa.Table:
    """One-row Arrow table holding a reference profile (commit it with ``lake.commit_partition``)."""
    scalars = {k: v for k, v in reference.items() if k not in ("confidence_sample", "embedding_sample")}
    emb = np.asarray(reference["embedding_sample"], dtype=np.float32)
    return pa.table(
        {
            "profile_json": pa.array([json.dumps(scalars)], pa.string()),
            "confidence_sample": pa.array(
                [np.asarray(reference["confidence_sample"], np.float32)], pa.list_(pa.float32())
            ),
            "embedding_dim": pa.array([emb.shape[1]], pa.int32()),
            "embedding_sample": pa.array([emb.reshape(-1)], pa.list_(pa.float32())),
        }
    )


def reference_from_table(table: pa.Table) -> dict[str, Any]:
    """Inverse of :func:`reference_to_table`."""
    need = {"profile_json", "confidence_sample", "embedding_dim", "embedding_sample"}
    if table.num_rows != 1 or not need <= set(table.column_names):
        raise DataError(f"reference table: expected one row with columns {sorted(need)}, got {table.schema}")
    ref = json.loads(table.column("profile_json")[0].as_py())
    ref["confidence_sample"] = np.asarray(table.column("confidence_sample")[0].values, dtype=np.float32)
    dim = int(table.column("embedding_dim")[0].as_py())
    ref["embedding_sample"] = np.asarray(
        table.column("embedding_sample")[0].values, dtype=np.float32
    ).reshape(-1, dim)
    return ref


def psi(observed: np.ndarray, expected: np.ndarray, eps: float = _PSI_EPS) -> float:
    """Population stability index between two proportion vectors (clipped at eps)."""
    o = np.clip(np.asarray(observed, dtype=np.float64), eps, None)
    e = np.clip(np.asarray(expected, dtype=np.float64), eps, None)
    return float(((o - e) * np.log(o / e)).sum())


def gammaincc(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x) (series / continued fraction, Numerical Recipes)."""
    if a <= 0:
        raise ValueError(f"gammaincc: a must be > 0, got {a}")
    if x <= 0:
        return 1.0
    lg = math.lgamma(a)
    if x < a + 1.0:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - lg))
    tiny = 1e-300  # modified Lentz continued fraction for Q
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(-x + a * math.log(x) - lg) * h)


def chi2_sf(stat: float, df: int) -> float:
    """P(Chi2(df) >= stat): the chi-square test's p-value (scipy.stats.chi2.sf without scipy)."""
    return gammaincc(df / 2.0, stat / 2.0)


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    both = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, both, side="right") / len(a)
    cdf_b = np.searchsorted(b, both, side="right") / len(b)
    d = float(np.abs(cdf_a - cdf_b).max())
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return d, 1.0
    j = np.arange(1, 101)
    p = float(2.0 * np.sum((-1.0) ** (j - 1) * np.exp(-2.0 * (j * lam) ** 2)))
    return d, min(max(p, 0.0), 1.0)


DRIFT_COLUMNS = [
    "statistic",
    "value",
    "threshold",
    "p_value",
    "alarm",
    "batch_value",
    "reference_value",
    "detail",
]


def drift_report(
    batch_images: np.ndarray,
    batch_group_probs: np.ndarray,
    batch_embeddings: np.ndarray,
    reference: Mapping[str, Any],
    thresholds: DriftThresholds | None = None,
) -> pd.DataFrame:
    """Drift statistics of one scored batch against the reference profile, one row per statistic.

    Columns: statistic, value (compared with threshold), threshold, p_value (NaN where none),
    alarm, batch_value, reference_value, detail. Rows: group_mix_psi, group_mix_chi2 (value is
    Cohen's w), confidence_psi, confidence_ks, pixel_mean / pixel_std / dark_fraction (value is the
    standardised mean difference), embedding_mmd2. Below ``min_batch_size`` images nothing alarms.
    """
    th = thresholds or DriftThresholds()
    x = _check_images(batch_images, "batch_images")
    n = len(x)
    if n < 2:
        raise DataError(f"batch_images: drift needs at least 2 images, got {n}")
    p = _check_probs(batch_group_probs, n, "batch_group_probs")
    emb = np.asarray(batch_embeddings)
    ref_emb = np.asarray(reference["embedding_sample"], dtype=np.float64)
    if emb.ndim != 2 or emb.shape != (n, ref_emb.shape[1]):
        raise DataError(f"batch_embeddings: expected shape ({n}, {ref_emb.shape[1]}), got {emb.shape}")
    rng = np.random.default_rng(th.seed)
    small = n < th.min_batch_size
    rows: list[dict[str, Any]] = []

    def add(
        stat: str, value: float, thr: float, p_value: float, alarm: bool, bv: Any, rv: Any, detail: str
    ) -> None:
        rows.append(
            {
                "statistic": stat,
                "value": float(value),
                "threshold": float(thr),
                "p_value": float(p_value),
                "alarm": bool(alarm) and not small,
                "batch_value": str(bv) if not isinstance(bv, float) else bv,
                "reference_value": str(rv) if not isinstance(rv, float) else rv,
                "detail": detail + (f"; batch of {n} < {th.min_batch_size}: no alarm" if small else ""),
            }
        )

    # predicted group mix vs training prior
    prior = np.asarray(reference["group_prior"], dtype=np.float64)
    counts = np.bincount(p.argmax(axis=1), minlength=NUM_GROUPS).astype(np.float64)
    mix = counts / n
    mix_txt = ", ".join(f"{k}={v:.3f}" for k, v in zip(GROUP_KEYS, mix, strict=True))
    prior_txt = ", ".join(f"{k}={v:.3f}" for k, v in zip(GROUP_KEYS, prior, strict=True))
    v = psi(mix, prior)
    add(
        "group_mix_psi",
        v,
        th.group_mix_psi,
        math.nan,
        v > th.group_mix_psi,
        mix_txt,
        prior_txt,
        "PSI of predicted group mix",
    )
    expected = np.clip(prior, 1e-12, None) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    pv = chi2_sf(chi2, NUM_GROUPS - 1)
    w = math.sqrt(chi2 / n)
    add(
        "group_mix_chi2", w, th.group_mix_min_effect, pv, pv < th.alpha and w >= th.group_mix_min_effect,
        mix_txt, prior_txt, f"Cohen's w; chi2={chi2:.1f}, df={NUM_GROUPS - 1}; alarm if p<{th.alpha:g} and w>=threshold",
    )  # fmt: skip

    # confidence vs validation
    # float32 on both sides: the reference sample is stored as float32, and so are scored probabilities
    conf = p.max(axis=1).astype(np.float32).astype(np.float64)
    edges = np.asarray(reference["confidence_edges"], dtype=np.float64)
    props = np.histogram(conf, bins=edges)[0] / n
    v = psi(props, reference["confidence_props"])
    ref_conf = np.asarray(reference["confidence_sample"], dtype=np.float64)
    add(
        "confidence_psi", v, th.confidence_psi, math.nan, v > th.confidence_psi,
        float(conf.mean()), float(ref_conf.mean()), "PSI of max group probability in fixed bins (mean shown)",
    )  # fmt: skip
    d, pv = ks_2samp(conf, ref_conf)
    add(
        "confidence_ks", d, th.confidence_min_ks, pv, pv < th.alpha and d >= th.confidence_min_ks,
        float(np.median(conf)), float(np.median(ref_conf)), f"KS D (median shown); alarm if p<{th.alpha:g} and D>=threshold",
    )  # fmt: skip

    # pixel statistics vs training
    stats = _pixel_stats(x, int(reference["dark_level"]))
    means = stats.mean(axis=0)
    for i, name in enumerate(_PIXEL_STATS):
        ref_mean, ref_sd = float(reference["pixel_mean"][i]), float(reference["pixel_sd"][i])
        smd = (means[i] - ref_mean) / max(ref_sd, 1e-9)
        rel = (means[i] - ref_mean) / max(abs(ref_mean), 1e-9)
        add(
            name, abs(smd), th.pixel_smd, math.nan, abs(smd) > th.pixel_smd, float(means[i]), ref_mean,
            f"|standardised mean difference| of per-image {name}; relative change {rel:+.1%}",
        )  # fmt: skip

    # embedding MMD vs reference sample
    sub = emb[_subsample(n, th.mmd_sample_size, rng)].astype(np.float64)
    if not np.isfinite(sub).all():
        raise DataError("batch_embeddings: contain NaN or infinite values")
    bw = float(reference["mmd_bandwidth"])
    mmd2 = mmd2_rbf(sub, ref_emb, bw)
    h = int(reference["mmd_half_size"])
    # null spread of the unbiased MMD^2 scales like 1/n + 1/m: rescale the half-vs-half calibration
    scale = (1.0 / len(sub) + 1.0 / len(ref_emb)) / (2.0 / h)
    thr = th.mmd_factor * float(reference["mmd_half_q99"]) * scale
    thr = max(thr, 1e-12)
    add(
        "embedding_mmd2", mmd2, thr, math.nan, mmd2 > thr, float(mmd2), float(reference["mmd_half_q99"]),
        f"unbiased RBF MMD^2, {len(sub)} batch vs {len(ref_emb)} reference rows, bandwidth {bw:.4g}",
    )  # fmt: skip

    df = pd.DataFrame(rows, columns=DRIFT_COLUMNS)
    alarms = df.loc[df["alarm"], "statistic"].tolist()
    if alarms:
        log.warning("drift alarm on %d images: %s", n, ", ".join(alarms))
    else:
        log.info("no drift on %d images", n)
    return df


def any_alarm(report: pd.DataFrame) -> bool:
    """True when any row of a drift or KPI table alarms."""
    return bool(report["alarm"].any()) if len(report) else False


# ---------------------------------------------------------------------------------------------- KPIs


def _default_kpi(metric: str) -> dict[str, float]:
    """Per group: the study's floor minus 0.05, since one night's batch is noisier than validation."""
    return {g: round(v[metric] - 0.05, 2) for g, v in STUDY_FLOORS.items()}


class KpiThresholds(BaseModel):
    """Per-group floors for a labelled batch (the study's alarm). Groups with fewer than
    ``min_support`` true images are reported but never alarm; ``min_tp`` is an optional absolute
    floor on true positives per group."""

    model_config = ConfigDict(extra="forbid")
    recall: dict[str, float] = Field(default_factory=lambda: _default_kpi("recall"))
    precision: dict[str, float] = Field(default_factory=lambda: _default_kpi("precision"))
    min_tp: dict[str, int] = Field(default_factory=dict)
    min_support: int = Field(default=20, ge=0)

    @field_validator("recall", "precision", "min_tp", mode="before")
    @classmethod
    def _normalise(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {GROUP_NAMES[group_index(k)]: f for k, f in v.items()}
        return v


KPI_COLUMNS = [
    "group", "group_name", "support", "predicted", "tp", "fp", "fn", "recall", "precision",
    "recall_threshold", "precision_threshold", "min_tp", "alarm", "reason",
]  # fmt: skip


def labelled_kpis(
    y_true_group: np.ndarray, y_pred_group: np.ndarray, thresholds: KpiThresholds | None = None
) -> pd.DataFrame:
    """Per group TP / FP / FN, recall and precision of a labelled batch, alarming below thresholds."""
    th = thresholds or KpiThresholds()
    t = np.asarray(y_true_group)
    pr = np.asarray(y_pred_group)
    if t.ndim != 1 or t.shape != pr.shape or len(t) == 0:
        raise DataError(
            f"y_true_group / y_pred_group: expected equal non-empty 1-d arrays, got {t.shape} and {pr.shape}"
        )
    for who, arr in (("y_true_group", t), ("y_pred_group", pr)):
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= NUM_GROUPS:
            raise DataError(f"{who}: expected integer group ids 0..{NUM_GROUPS - 1}")
    cm = np.bincount(t * NUM_GROUPS + pr, minlength=NUM_GROUPS**2).reshape(NUM_GROUPS, NUM_GROUPS)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
    rows = []
    for g, name in enumerate(GROUP_NAMES):
        r_thr, p_thr, tp_min = th.recall.get(name), th.precision.get(name), th.min_tp.get(name)
        why = []
        if support[g] >= max(th.min_support, 1):
            if r_thr is not None and recall[g] < r_thr:
                why.append(f"recall {recall[g]:.3f} < {r_thr:.2f}")
            if p_thr is not None and predicted[g] > 0 and precision[g] < p_thr:
                why.append(f"precision {precision[g]:.3f} < {p_thr:.2f}")
            if p_thr is not None and predicted[g] == 0:
                why.append("never predicted")
            if tp_min is not None and tp[g] < tp_min:
                why.append(f"TP {tp[g]} < {tp_min}")
        rows.append(
            {
                "group": g, "group_name": name, "support": int(support[g]), "predicted": int(predicted[g]),
                "tp": int(tp[g]), "fp": int(predicted[g] - tp[g]), "fn": int(support[g] - tp[g]),
                "recall": float(recall[g]), "precision": float(precision[g]),
                "recall_threshold": r_thr, "precision_threshold": p_thr, "min_tp": tp_min,
                "alarm": bool(why), "reason": "; ".join(why),
            }
        )  # fmt: skip
    df = pd.DataFrame(rows, columns=KPI_COLUMNS)
    if df["alarm"].any():
        log.warning(
            "KPI alarm: %s", "; ".join(f"{r.group_name}: {r.reason}" for r in df[df.alarm].itertuples())
        )
    return df
