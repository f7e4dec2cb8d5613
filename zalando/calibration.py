"""Temperature scaling, calibration error, and the "needs review" rule.

Temperature scaling divides a model's logits by one scalar T > 0 fitted on the validation split by
minimising the negative log-likelihood. It changes confidence, never the argmax, so accuracy and
every per-group metric stay the same. The NLL is convex in 1/T, so a bounded golden-section search
on beta = 1/T finds the optimum exactly enough without torch or scipy.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from zalando.errors import DataError

log = logging.getLogger(__name__)

# beta = 1/T is searched in this interval: T from 0.02 (sharpen 50x) to 50 (flatten 50x)
_BETA_MIN, _BETA_MAX = 0.02, 50.0


def _check_logits_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise DataError(f"logits: expected a non-empty (N, C>=2) array, got shape {z.shape}")
    if y.shape != (z.shape[0],):
        raise DataError(f"labels: expected shape ({z.shape[0]},) to match logits, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels: expected integer class ids, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise DataError(f"labels: class ids must be in 0..{z.shape[1] - 1}, got {y.min()}..{y.max()}")
    if not np.isfinite(z).all():
        raise DataError("logits: contain NaN or infinite values")
    return z, y.astype(np.int64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels under softmax(logits / temperature)."""
    z, y = _check_logits_labels(logits, labels)
    if not temperature > 0:
        raise DataError(f"temperature: must be > 0, got {temperature}")
    lp = _log_softmax(z / temperature)
    return float(-lp[np.arange(len(y)), y].mean())


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) as float64 probabilities."""
    if not temperature > 0:
        raise DataError(f"temperature: must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(_log_softmax(z / temperature))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, tol: float = 1e-6) -> float:
    """The temperature T minimising validation NLL of softmax(logits / T), searched in [0.02, 50].

    Pass the 10-label logits (before softmax) and label ids of the validation split.
    """
    z, y = _check_logits_labels(logits, labels)
    rows = np.arange(len(y))
    z_true = z[rows, y]

    def loss(beta: float) -> float:
        s = z * beta
        m = s.max(axis=1)
        lse = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
        return float((lse - beta * z_true).mean())

    lo, hi = _BETA_MIN, _BETA_MAX
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo + (1 - inv_phi) * (hi - lo), lo + inv_phi * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > tol * max(1.0, lo):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - inv_phi) * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + inv_phi * (hi - lo)
            fb = loss(b)
    beta = (lo + hi) / 2.0
    temperature = 1.0 / beta
    if beta <= _BETA_MIN * (1 + 1e-3) or beta >= _BETA_MAX * (1 - 1e-3):
        log.warning("fitted temperature %.4g is at the search bound: the logits look degenerate", temperature)
    log.info("temperature %.4f: NLL %.4f -> %.4f on %d samples", temperature, loss(1.0), loss(beta), len(y))
    return float(temperature)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the sample-weighted mean |accuracy - confidence| over equal-width confidence bins.

    ``probs`` is (N, C) (label or group probabilities), ``labels`` the true ids in the same space.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[0] == 0:
        raise DataError(f"probs: expected a non-empty (N, C) array, got shape {p.shape}")
    if y.shape != (p.shape[0],):
        raise DataError(f"labels: expected shape ({p.shape[0]},) to match probs, got {y.shape}")
    if n_bins < 1:
        raise DataError(f"n_bins: must be >= 1, got {n_bins}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip((conf * n_bins).astype(np.int64), 0, n_bins - 1)  # conf == 1.0 goes to the last bin
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins)
        - np.bincount(bins, weights=conf, minlength=n_bins)
    )
    return float(gap.sum() / len(y)) if count.sum() else 0.0


def needs_review_mask(group_probs: np.ndarray, threshold: float) -> np.ndarray:
    """True for predictions whose confidence (max group probability) is below threshold.

    These rows also go to the ``needs_review`` partition so people can label them.
    """
    p = np.asarray(group_probs)
    if p.ndim != 2 or p.shape[1] < 2:
        raise DataError(f"group_probs: expected an (N, C>=2) array, got shape {p.shape}")
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"review threshold: must be in [0, 1], got {threshold}")
    if p.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return p.max(axis=1) < threshold
