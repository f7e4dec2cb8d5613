"""Drift without labels: a scored batch against a reference profile stored at training time.

:func:`reference_profile` describes a clean batch once per model (predicted group mix, confidence,
pixel statistics, an embedding sample for MMD); :func:`drift_report` compares one scored batch with it,
one row per statistic.

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
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from zalando.data.arrays import check_image_array
from zalando.errors import DataError
from zalando.labels import GROUP_KEYS, NUM_GROUPS, check_group_probs

log = logging.getLogger(__name__)

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
    x = check_image_array(train_images, "train_images")
    emb = np.asarray(val_embeddings, dtype=np.float64)
    if emb.ndim != 2 or len(emb) < 4:
        raise DataError(f"val_embeddings: expected an (N>=4, D) array, got shape {emb.shape}")
    p = check_group_probs(val_group_probs, len(emb), "val_group_probs")
    prior = np.asarray(train_group_prior, dtype=np.float64)
    if prior.shape != (NUM_GROUPS,) or (prior < 0).any() or prior.sum() <= 0:
        raise DataError(
            f"train_group_prior: expected {NUM_GROUPS} non-negative counts or proportions, got {prior}"
        )
    if not np.isfinite(emb).all():
        raise DataError("val_embeddings: contain NaN or infinite values")
    rng = np.random.default_rng(seed)

    pixel = _pixel_stats(x[_subsample(len(x), pixel_sample, rng)], dark_level)
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
        "pixel_mean": pixel.mean(axis=0).tolist(),
        "pixel_sd": pixel.std(axis=0).tolist(),
        "pixel_n": int(len(pixel)),
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


def ks_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value with Stephens' correction.

    D is ``scipy.stats.ks_2samp``'s; the p-value is the Kolmogorov distribution's tail
    (``scipy.stats.kstwobign``) at ``(sqrt(en) + 0.12 + 0.11 / sqrt(en)) * D``, ``en = n m / (n + m)``,
    as the drift report has always computed it: ks_2samp's own p-value (exact, or ``kstwo``) differs
    from it by 1-8% on batches of a few hundred images, which would move alarms near ``alpha``.
    """
    d = float(stats.ks_2samp(a, b, method="asymp").statistic)
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    return d, float(stats.kstwobign.sf((en + 0.12 + 0.11 / en) * d))


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


class _Stat(NamedTuple):
    """One drift statistic before the small-batch rule: a row of :data:`DRIFT_COLUMNS`."""

    statistic: str
    value: float
    threshold: float
    p_value: float
    alarm: bool
    batch_value: Any
    reference_value: Any
    detail: str


def _group_mix_stats(p: np.ndarray, reference: Mapping[str, Any], th: DriftThresholds) -> list[_Stat]:
    """Predicted group mix vs the training prior: PSI, and a chi-square test with Cohen's w as effect."""
    n = len(p)
    prior = np.asarray(reference["group_prior"], dtype=np.float64)
    counts = np.bincount(p.argmax(axis=1), minlength=NUM_GROUPS).astype(np.float64)
    mix = counts / n
    mix_txt = ", ".join(f"{k}={v:.3f}" for k, v in zip(GROUP_KEYS, mix, strict=True))
    prior_txt = ", ".join(f"{k}={v:.3f}" for k, v in zip(GROUP_KEYS, prior, strict=True))
    v = psi(mix, prior)
    expected = np.clip(prior, 1e-12, None) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    pv = float(stats.chi2.sf(chi2, NUM_GROUPS - 1))
    w = math.sqrt(chi2 / n)
    return [
        _Stat(
            "group_mix_psi", v, th.group_mix_psi, math.nan, v > th.group_mix_psi,
            mix_txt, prior_txt, "PSI of predicted group mix",
        ),
        _Stat(
            "group_mix_chi2", w, th.group_mix_min_effect, pv, pv < th.alpha and w >= th.group_mix_min_effect,
            mix_txt, prior_txt, f"Cohen's w; chi2={chi2:.1f}, df={NUM_GROUPS - 1}; alarm if p<{th.alpha:g} and w>=threshold",
        ),
    ]  # fmt: skip


def _confidence_stats(p: np.ndarray, reference: Mapping[str, Any], th: DriftThresholds) -> list[_Stat]:
    """Max group probability vs validation: PSI in fixed bins, and a two-sample KS test."""
    # float32 on both sides: the reference sample is stored as float32, and so are scored probabilities
    conf = p.max(axis=1).astype(np.float32).astype(np.float64)
    edges = np.asarray(reference["confidence_edges"], dtype=np.float64)
    props = np.histogram(conf, bins=edges)[0] / len(p)
    v = psi(props, reference["confidence_props"])
    ref_conf = np.asarray(reference["confidence_sample"], dtype=np.float64)
    d, pv = ks_test(conf, ref_conf)
    return [
        _Stat(
            "confidence_psi", v, th.confidence_psi, math.nan, v > th.confidence_psi,
            float(conf.mean()), float(ref_conf.mean()), "PSI of max group probability in fixed bins (mean shown)",
        ),
        _Stat(
            "confidence_ks", d, th.confidence_min_ks, pv, pv < th.alpha and d >= th.confidence_min_ks,
            float(np.median(conf)), float(np.median(ref_conf)), f"KS D (median shown); alarm if p<{th.alpha:g} and D>=threshold",
        ),
    ]  # fmt: skip


def _pixel_drift_stats(x: np.ndarray, reference: Mapping[str, Any], th: DriftThresholds) -> list[_Stat]:
    """Per-image pixel mean, std and dark fraction vs training: standardised mean differences."""
    means = _pixel_stats(x, int(reference["dark_level"])).mean(axis=0)
    out = []
    for i, name in enumerate(_PIXEL_STATS):
        ref_mean, ref_sd = float(reference["pixel_mean"][i]), float(reference["pixel_sd"][i])
        smd = (means[i] - ref_mean) / max(ref_sd, 1e-9)
        rel = (means[i] - ref_mean) / max(abs(ref_mean), 1e-9)
        stat = _Stat(
            name, abs(smd), th.pixel_smd, math.nan, abs(smd) > th.pixel_smd, float(means[i]), ref_mean,
            f"|standardised mean difference| of per-image {name}; relative change {rel:+.1%}",
        )  # fmt: skip
        out.append(stat)
    return out


def _embedding_stat(emb: np.ndarray, reference: Mapping[str, Any], th: DriftThresholds) -> _Stat:
    """Unbiased RBF MMD^2 of (a sample of) the batch's embeddings vs the reference sample."""
    ref_emb = np.asarray(reference["embedding_sample"], dtype=np.float64)
    rng = np.random.default_rng(th.seed)
    sub = emb[_subsample(len(emb), th.mmd_sample_size, rng)].astype(np.float64)
    if not np.isfinite(sub).all():
        raise DataError("batch_embeddings: contain NaN or infinite values")
    bw = float(reference["mmd_bandwidth"])
    mmd2 = mmd2_rbf(sub, ref_emb, bw)
    h = int(reference["mmd_half_size"])
    # null spread of the unbiased MMD^2 scales like 1/n + 1/m: rescale the half-vs-half calibration
    scale = (1.0 / len(sub) + 1.0 / len(ref_emb)) / (2.0 / h)
    thr = max(th.mmd_factor * float(reference["mmd_half_q99"]) * scale, 1e-12)
    return _Stat(
        "embedding_mmd2", mmd2, thr, math.nan, mmd2 > thr, float(mmd2), float(reference["mmd_half_q99"]),
        f"unbiased RBF MMD^2, {len(sub)} batch vs {len(ref_emb)} reference rows, bandwidth {bw:.4g}",
    )  # fmt: skip


def _row(s: _Stat, n: int, min_batch_size: int) -> dict[str, Any]:
    """A report row; below ``min_batch_size`` images it never alarms, and says so."""
    small = n < min_batch_size
    return {
        "statistic": s.statistic,
        "value": float(s.value),
        "threshold": float(s.threshold),
        "p_value": float(s.p_value),
        "alarm": bool(s.alarm) and not small,
        "batch_value": s.batch_value if isinstance(s.batch_value, float) else str(s.batch_value),
        "reference_value": s.reference_value
        if isinstance(s.reference_value, float)
        else str(s.reference_value),
        "detail": s.detail + (f"; batch of {n} < {min_batch_size}: no alarm" if small else ""),
    }


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
    x = check_image_array(batch_images, "batch_images")
    n = len(x)
    if n < 2:
        raise DataError(f"batch_images: drift needs at least 2 images, got {n}")
    p = check_group_probs(batch_group_probs, n, "batch_group_probs")
    emb = np.asarray(batch_embeddings)
    dim = np.asarray(reference["embedding_sample"]).shape[1]
    if emb.ndim != 2 or emb.shape != (n, dim):
        raise DataError(f"batch_embeddings: expected shape ({n}, {dim}), got {emb.shape}")
    found = [
        *_group_mix_stats(p, reference, th),
        *_confidence_stats(p, reference, th),
        *_pixel_drift_stats(x, reference, th),
        _embedding_stat(emb, reference, th),
    ]
    df = pd.DataFrame([_row(s, n, th.min_batch_size) for s in found], columns=DRIFT_COLUMNS)
    alarms = df.loc[df["alarm"], "statistic"].tolist()
    if alarms:
        log.warning("drift alarm on %d images: %s", n, ", ".join(alarms))
    else:
        log.info("no drift on %d images", n)
    return df


def any_alarm(report: pd.DataFrame) -> bool:
    """True when any row of a drift or KPI table alarms."""
    return bool(report["alarm"].any()) if len(report) else False
