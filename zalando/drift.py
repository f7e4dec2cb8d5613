"""Drift without labels: a scored batch against a reference profile stored at training time.

:func:`reference_profile` describes a clean batch once per model (predicted group mix, confidence,
pixel statistics, an embedding sample for MMD); :func:`drift_report` compares one scored batch with it,
one row per statistic.

Alarm rule: a row alarms only when the shift is both *significant at this batch size* (p-value below
``alpha``) and *large enough to matter* (its value above the threshold, an effect-size floor). On a
batch of 10,000 images a test flags shifts of a fraction of a percent that no one should retrain for;
an effect size alone is noise on a small batch (the PSI of 50 clean images averages about
(bins - 1) / 50, and more with sparse bins). Needing both avoids either failure. The tests: chi-square
on the group counts, a Monte Carlo multinomial test for each PSI (:func:`psi_test`, exact at any n),
Kolmogorov-Smirnov on the confidence, a z-test on each pixel statistic's batch mean, and for the MMD
random splits of the reference embeddings at the batch's size (sequential Monte Carlo).

A statistic also has a smallest batch it is trusted on (``min_n``: ``min_batch_size``, and for the
group mix enough images that every group expects ``min_expected_count``): below it the row is reported
(``trusted`` false) but never alarms.
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
from pydantic import BaseModel, ConfigDict, Field, model_validator
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
    min_batch_size: int = Field(default=50, ge=1)  # no statistic alarms on fewer images
    min_expected_count: float = Field(default=5.0, gt=0.0)  # group mix: Cochran's rule, per group
    psi_draws: int = Field(default=4999, ge=99, le=100_000)  # Monte Carlo draws of the PSI tests
    mmd_draws: int = Field(default=4999, ge=99, le=20_000)  # random splits of the MMD's null
    seed: int = 0

    @model_validator(mode="after")
    def _tests_can_reject(self) -> DriftThresholds:
        for name in ("psi_draws", "mmd_draws"):
            draws = getattr(self, name)
            if 1.0 / (draws + 1) >= self.alpha:
                raise ValueError(
                    f"{name}={draws}: a Monte Carlo p-value is at least 1/(draws+1), so it could never "
                    f"reach alpha={self.alpha:g}; use {name} >= {math.ceil(1 / self.alpha)}"
                )
        return self


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
        "confidence_n": int(len(conf)),
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


def _psi_rows(observed: np.ndarray, expected: np.ndarray, eps: float) -> np.ndarray:
    """PSI along the last axis of (broadcastable) proportion arrays, clipped at eps."""
    o = np.clip(observed, eps, None)
    e = np.clip(expected, eps, None)
    return ((o - e) * np.log(o / e)).sum(axis=-1)


def psi(observed: np.ndarray, expected: np.ndarray, eps: float = _PSI_EPS) -> float:
    """Population stability index between two proportion vectors (clipped at eps)."""
    return float(
        _psi_rows(np.asarray(observed, dtype=np.float64), np.asarray(expected, dtype=np.float64), eps)
    )


def psi_test(
    counts: np.ndarray,
    reference_props: np.ndarray,
    reference_n: int | None = None,
    *,
    draws: int = 4999,
    seed: int = 0,
    eps: float = _PSI_EPS,
) -> tuple[float, float]:
    """PSI of a batch's bin counts against reference proportions, and its p-value at this batch size.

    Under no drift the PSI of n images is not zero: about (bins - 1) (1/n + 1/reference_n) on average,
    and more when sparse bins are clipped at eps, so a fixed threshold alarms on small clean batches.
    The p-value is Monte Carlo, (1 + #{null >= observed}) / (draws + 1), over ``draws`` batches of n
    drawn from the reference proportions (one-sample, ``reference_n`` None: the reference is exact) or,
    with ``reference_n``, batch and reference both drawn from their pooled proportions (two-sample).
    Exact at any n however sparse the bins, where a chi-square approximation is not.
    """
    c = np.asarray(counts, dtype=np.float64)
    n = int(round(c.sum()))
    if n < 1:
        raise DataError("psi_test: no counts")
    e = np.asarray(reference_props, dtype=np.float64)
    e = e / e.sum()
    value = psi(c / n, e, eps)
    rng = np.random.default_rng(seed)
    if reference_n is None:
        null = _psi_rows(rng.multinomial(n, e, size=draws) / n, e, eps)
    else:
        pooled = (c + e * reference_n) / (n + reference_n)
        sim_batch = rng.multinomial(n, pooled, size=draws) / n
        sim_ref = rng.multinomial(int(reference_n), pooled, size=draws) / reference_n
        null = _psi_rows(sim_batch, sim_ref, eps)
    exceed = int((null >= value * (1.0 - 1e-9)).sum())  # ties count against the batch
    return value, (1 + exceed) / (draws + 1)


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
    "trusted",
    "min_n",
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
    min_n: int


def _group_mix_min_n(prior: np.ndarray, th: DriftThresholds) -> int:
    """Smallest batch whose every group expects ``min_expected_count`` images (Cochran's chi-square rule)."""
    smallest = float(prior[prior > 0].min())
    return max(th.min_batch_size, math.ceil(th.min_expected_count / smallest - 1e-9))


def _group_mix_stats(p: np.ndarray, reference: Mapping[str, Any], th: DriftThresholds) -> list[_Stat]:
    """Predicted group mix vs the training prior: PSI (Monte Carlo test), and chi-square with Cohen's w."""
    n = len(p)
    prior = np.asarray(reference["group_prior"], dtype=np.float64)
    counts = np.bincount(p.argmax(axis=1), minlength=NUM_GROUPS).astype(np.float64)
    mix = counts / n
    mix_txt = ", ".join(f"{k}={v:.3f}" for k, v in zip(GROUP_KEYS, mix, strict=True))
    prior_txt = ", ".join(f"{k}={v:.3f}" for k, v in zip(GROUP_KEYS, prior, strict=True))
    v, psi_p = psi_test(counts, prior, draws=th.psi_draws, seed=th.seed)
    expected = np.clip(prior, 1e-12, None) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    pv = float(stats.chi2.sf(chi2, NUM_GROUPS - 1))
    w = math.sqrt(chi2 / n)
    min_n = _group_mix_min_n(prior, th)
    return [
        _Stat(
            "group_mix_psi", v, th.group_mix_psi, psi_p, psi_p < th.alpha and v > th.group_mix_psi,
            mix_txt, prior_txt, f"PSI of predicted group mix; Monte Carlo p ({th.psi_draws} draws); alarm if p<{th.alpha:g} and PSI>threshold",
            min_n,
        ),
        _Stat(
            "group_mix_chi2", w, th.group_mix_min_effect, pv, pv < th.alpha and w >= th.group_mix_min_effect,
            mix_txt, prior_txt, f"Cohen's w; chi2={chi2:.1f}, df={NUM_GROUPS - 1}; alarm if p<{th.alpha:g} and w>=threshold",
            min_n,
        ),
    ]  # fmt: skip


def _confidence_stats(p: np.ndarray, reference: Mapping[str, Any], th: DriftThresholds) -> list[_Stat]:
    """Max group probability vs validation: PSI in fixed bins (two-sample Monte Carlo test), and KS."""
    # float32 on both sides: the reference sample is stored as float32, and so are scored probabilities
    conf = p.max(axis=1).astype(np.float32).astype(np.float64)
    edges = np.asarray(reference["confidence_edges"], dtype=np.float64)
    counts = np.histogram(conf, bins=edges)[0]
    ref_conf = np.asarray(reference["confidence_sample"], dtype=np.float64)
    # references written before confidence_n was stored: the sample size is a lower bound
    ref_n = int(reference.get("confidence_n", len(ref_conf)))
    v, psi_p = psi_test(counts, reference["confidence_props"], ref_n, draws=th.psi_draws, seed=th.seed + 1)
    d, pv = ks_test(conf, ref_conf)
    return [
        _Stat(
            "confidence_psi", v, th.confidence_psi, psi_p, psi_p < th.alpha and v > th.confidence_psi,
            float(conf.mean()), float(ref_conf.mean()),
            f"PSI of max group probability in fixed bins (mean shown); Monte Carlo p vs {ref_n} reference rows; alarm if p<{th.alpha:g} and PSI>threshold",
            th.min_batch_size,
        ),
        _Stat(
            "confidence_ks", d, th.confidence_min_ks, pv, pv < th.alpha and d >= th.confidence_min_ks,
            float(np.median(conf)), float(np.median(ref_conf)), f"KS D (median shown); alarm if p<{th.alpha:g} and D>=threshold",
            th.min_batch_size,
        ),
    ]  # fmt: skip


def _pixel_drift_stats(x: np.ndarray, reference: Mapping[str, Any], th: DriftThresholds) -> list[_Stat]:
    """Per-image pixel mean, std and dark fraction vs training: standardised mean differences, z-tested.

    Under no drift a batch mean of n images differs from the reference mean by about
    sd * sqrt(1/n + 1/pixel_n): at n=50 an |SMD| of 0.25 is 1.8 standard errors, reached by chance
    7% of the time, hence the z-test.
    """
    n = len(x)
    means = _pixel_stats(x, int(reference["dark_level"])).mean(axis=0)
    se = math.sqrt(1.0 / n + 1.0 / int(reference["pixel_n"]))
    out = []
    for i, name in enumerate(_PIXEL_STATS):
        ref_mean, ref_sd = float(reference["pixel_mean"][i]), float(reference["pixel_sd"][i])
        smd = (means[i] - ref_mean) / max(ref_sd, 1e-9)
        pv = float(2.0 * stats.norm.sf(abs(smd) / se))
        rel = (means[i] - ref_mean) / max(abs(ref_mean), 1e-9)
        stat = _Stat(
            name, abs(smd), th.pixel_smd, pv, pv < th.alpha and abs(smd) > th.pixel_smd, float(means[i]), ref_mean,
            f"|standardised mean difference| of per-image {name}; relative change {rel:+.1%}; z-test; "
            f"alarm if p<{th.alpha:g} and |SMD|>threshold",
            th.min_batch_size,
        )  # fmt: skip
        out.append(stat)
    return out


def _mmd2_of_splits(k: np.ndarray, ind: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 between the rows marked 1 and the rest, for each 0/1 row of ``ind`` (splits x m).

    One matrix product for all splits; float32 halves its cost (sums of a few 1e5 kernel values).
    """
    a = ind.sum(axis=1, dtype=np.float64)
    b = ind.shape[1] - a
    diag, rows = np.diag(k), k.sum(axis=1)
    aa = ((ind.astype(np.float32) @ k.astype(np.float32)) * ind).sum(axis=1, dtype=np.float64)
    a_diag, a_rows = ind @ diag, ind @ rows  # (aa: sums over A x A, diagonal included)
    s_aa = aa - a_diag
    s_ab = a_rows - aa
    s_bb = rows.sum() - 2.0 * a_rows + aa - (diag.sum() - a_diag)
    return s_aa / (a * (a - 1)) + s_bb / (b * (b - 1)) - 2.0 * s_ab / (a * b)


def _random_splits(m: int, a: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` rows of m indicators, each with a uniformly random a of them set."""
    ind = np.zeros((draws, m))
    ind[np.arange(draws)[:, None], np.argpartition(rng.random((draws, m)), a - 1, axis=1)[:, :a]] = 1.0
    return ind


_SPLIT_CHUNK = 250  # splits per matrix product
_SPLIT_STOP = 10  # sequential stop: this many null splits at or over the batch's MMD^2


def _mmd2_split_p_value(k_ref: np.ndarray, n: int, mmd2: float, th: DriftThresholds) -> tuple[float, int]:
    """The MMD^2's p-value for a batch of n rows vs the m reference rows, and the splits it took.

    Null: the reference split at random into min(n, m/2) rows and the rest, its MMD^2 rescaled to n vs
    m rows (the null spread goes like 1/n + 1/m). Sequential (Besag and Clifford 1991): it stops once
    ``_SPLIT_STOP`` splits reach the batch's value, p = that count / splits drawn, so a clean batch
    costs a few hundred splits; otherwise p = (1 + count) / (``mmd_draws`` + 1).
    """
    m = len(k_ref)
    a = max(2, min(n, m // 2))
    scale = (1.0 / n + 1.0 / m) / (1.0 / a + 1.0 / (m - a))
    rng = np.random.default_rng(th.seed + 2)
    hits = drawn = 0
    while drawn < th.mmd_draws:
        chunk = min(_SPLIT_CHUNK, th.mmd_draws - drawn)
        hits += int((scale * _mmd2_of_splits(k_ref, _random_splits(m, a, chunk, rng)) >= mmd2).sum())
        drawn += chunk
        if hits >= _SPLIT_STOP:
            return hits / drawn, drawn
    return (1 + hits) / (drawn + 1), drawn


def _embedding_stat(emb: np.ndarray, reference: Mapping[str, Any], th: DriftThresholds) -> _Stat:
    """Unbiased RBF MMD^2 of (a sample of) the batch's embeddings vs the reference sample.

    Its p-value comes from random splits of the reference sample at the batch's size
    (:func:`_mmd2_split_p_value`); the threshold is the reference's stored half-split q99 x
    ``mmd_factor`` rescaled to these sizes, as before. An alarm needs both.
    """
    ref_emb = np.asarray(reference["embedding_sample"], dtype=np.float64)
    rng = np.random.default_rng(th.seed)
    sub = emb[_subsample(len(emb), th.mmd_sample_size, rng)].astype(np.float64)
    if not np.isfinite(sub).all():
        raise DataError("batch_embeddings: contain NaN or infinite values")
    bw = float(reference["mmd_bandwidth"])
    g = 1.0 / (2.0 * bw**2)
    k_ref = np.exp(-g * _sq_dists(ref_emb, ref_emb))
    mmd2 = _mmd2_from_kernels(np.exp(-g * _sq_dists(sub, sub)), k_ref, np.exp(-g * _sq_dists(sub, ref_emb)))
    n, m, h = len(sub), len(ref_emb), int(reference["mmd_half_size"])
    # null spread of the unbiased MMD^2 scales like 1/n + 1/m: rescale the half-vs-half calibration
    thr = max(th.mmd_factor * float(reference["mmd_half_q99"]) * (1.0 / n + 1.0 / m) / (2.0 / h), 1e-12)
    pv, used = _mmd2_split_p_value(k_ref, n, mmd2, th)
    return _Stat(
        "embedding_mmd2", mmd2, thr, pv, pv < th.alpha and mmd2 > thr, float(mmd2), float(reference["mmd_half_q99"]),
        f"unbiased RBF MMD^2, {n} batch vs {m} reference rows, bandwidth {bw:.4g}; p from {used} "
        f"splits of the reference; alarm if p<{th.alpha:g} and MMD^2>threshold (half-split q99 x {th.mmd_factor:g}, rescaled)",
        th.min_batch_size,
    )  # fmt: skip


def _row(s: _Stat, n: int) -> dict[str, Any]:
    """A report row; below the statistic's ``min_n`` images it is not trusted, never alarms, and says so."""
    trusted = n >= s.min_n
    return {
        "statistic": s.statistic,
        "value": float(s.value),
        "threshold": float(s.threshold),
        "p_value": float(s.p_value),
        "alarm": bool(s.alarm) and trusted,
        "trusted": trusted,
        "min_n": int(s.min_n),
        "batch_value": s.batch_value if isinstance(s.batch_value, float) else str(s.batch_value),
        "reference_value": s.reference_value
        if isinstance(s.reference_value, float)
        else str(s.reference_value),
        "detail": s.detail + ("" if trusted else f"; batch of {n} < {s.min_n}: no alarm"),
    }


def drift_report(
    batch_images: np.ndarray,
    batch_group_probs: np.ndarray,
    batch_embeddings: np.ndarray,
    reference: Mapping[str, Any],
    thresholds: DriftThresholds | None = None,
) -> pd.DataFrame:
    """Drift statistics of one scored batch against the reference profile, one row per statistic.

    Columns: statistic, value (compared with threshold), threshold, p_value (of the row's test at
    this batch size), alarm, trusted and min_n
    (a statistic is trusted on batches of at least min_n images; below, it never alarms),
    batch_value, reference_value, detail. Rows: group_mix_psi, group_mix_chi2 (value is Cohen's w),
    confidence_psi, confidence_ks, pixel_mean / pixel_std / dark_fraction (value is the
    standardised mean difference), embedding_mmd2. See the module docstring for the alarm rule.
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
    df = pd.DataFrame([_row(s, n) for s in found], columns=DRIFT_COLUMNS)
    alarms = df.loc[df["alarm"], "statistic"].tolist()
    if alarms:
        log.warning("drift alarm on %d images: %s", n, ", ".join(alarms))
    else:
        log.info("no drift on %d images", n)
    return df


def any_alarm(report: pd.DataFrame) -> bool:
    """True when any row of a drift or KPI table alarms."""
    return bool(report["alarm"].any()) if len(report) else False
