"""Temperature scaling, calibration error, and the "needs review" rule.

Temperature scaling divides a model's logits by one scalar T > 0 fitted on the validation split by
minimising the negative log-likelihood. It changes confidence, never the argmax, so accuracy and
every per-group metric stay the same. The NLL is convex in 1/T, so a bounded golden-section search
on beta = 1/T finds the optimum exactly enough without torch or scipy.

The operating point (:func:`fit_group_weights`) is the one step here that may change decisions: per-group
weights on the group probabilities, chosen on validation so each group's recall reaches a floor
(the study's recall, which the quality gate also demands), at a bounded cost in accuracy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

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


# ----------------------------------------------------------------------------- operating point

# a floor of 1.00 at the study's two decimals means "at least 0.995" (as the quality gate reads it)
_TWO_DP_ONE = 0.995


@dataclass(frozen=True)
class OperatingPoint:
    """Per-group weights on the group probabilities, chosen on validation (see :func:`fit_group_weights`)."""

    weights: list[float]
    floors: list[float]
    recall_before: list[float]
    recall_after: list[float]
    acc_before: float
    acc_after: float
    met: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recall_floors(study_recall: Sequence[float]) -> list[float]:
    """The study's per-group recall as floors: exact, except 1.00 (two decimals) means >= 0.995."""
    return [min(float(r), _TWO_DP_ONE) for r in study_recall]


def _recalls(pred: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(y, minlength=k).astype(np.float64)
    hits = np.bincount(y[pred == y], minlength=k).astype(np.float64)
    return np.where(counts > 0, hits / np.maximum(counts, 1), 1.0)


def fit_group_weights(
    probs: np.ndarray,
    groups: np.ndarray,
    floors: Sequence[float],
    *,
    step: float = 1.1,
    max_weight: float = 4.0,
    max_acc_drop: float = 0.005,
) -> OperatingPoint:
    """Weights w (one per group) so that argmax(probs * w) reaches every group's recall floor on validation.

    Greedy and small: while some group is below its floor, multiply the weight of the group furthest
    below by ``step``; stop when every floor is met, or when a weight would pass ``max_weight`` or the
    validation accuracy would drop more than ``max_acc_drop`` (then the weights that met the most stay,
    and ``met`` is False). Weights of 1 everywhere are plain argmax. Multiplying probabilities by w and
    renormalising is a change of prior, so the probabilities stay a distribution.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(groups)
    k = p.shape[1] if p.ndim == 2 else 0
    f = np.asarray(floors, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0 or len(f) != k:
        raise DataError(f"operating point: probs must be (N, {len(f)}) with N > 0, got shape {p.shape}")
    if y.shape != (len(p),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise DataError(f"operating point: groups must be N integer ids in 0..{k - 1}")
    if not np.isfinite(p).all():
        raise DataError("operating point: probabilities contain NaN or infinite values")
    w = np.ones(k)
    pred = p.argmax(1)
    rec0, acc0 = _recalls(pred, y, k), float((pred == y).mean())
    rec, acc, reason = rec0, acc0, "floors met with plain argmax"
    while True:
        short = f - rec
        if (short <= 1e-12).all():
            if (w != 1).any():
                reason = "floors met on validation"
            met = True
            break
        g = int(np.argmax(short))
        trial = w.copy()
        trial[g] *= step
        if trial[g] > max_weight:
            met, reason = False, f"group {g} needs a weight above {max_weight}"
            break
        t_pred = (p * trial).argmax(1)
        t_acc = float((t_pred == y).mean())
        if acc0 - t_acc > max_acc_drop:
            met, reason = False, f"meeting group {g}'s floor would cost more than {max_acc_drop:.3f} accuracy"
            break
        w, rec, acc = trial, _recalls(t_pred, y, k), t_acc
    return OperatingPoint(
        weights=[round(float(v), 6) for v in w],
        floors=[float(v) for v in f],
        recall_before=[float(v) for v in rec0],
        recall_after=[float(v) for v in rec],
        acc_before=acc0,
        acc_after=acc,
        met=met,
        reason=reason,
    )


# candidate thresholds for a second pass on the doubtful rows only, cheapest (fewest rows) first
DOUBT_GRID = (0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)


def choose_doubt_threshold(
    first: np.ndarray,
    second: np.ndarray,
    groups: np.ndarray,
    floors: Sequence[float],
    grid: Sequence[float] | None = None,
) -> dict[str, Any] | None:
    """The lowest threshold t on the first pass's top group probability such that giving only the rows
    below t the second pass's decision loses nothing on validation against giving it to every row;
    None when no t on the grid does.

    ``first`` and ``second`` are two ways of scoring the same rows (group probabilities, operating
    point applied): the one view and the mean of the view and its mirror (the flip), or a cheap screen
    net and the full scoring graph. "Loses nothing": grouped accuracy at least the second pass's, and
    every group's recall at least its floor wherever the second pass reaches that floor (at least the
    second pass's recall elsewhere). A row below t gets exactly the second pass's decision, a row above
    keeps the first's. ``grid``: the candidates (default ``DOUBT_GRID``). Returns ``below`` (t),
    ``share`` (of rows below it) and the three validation accuracies.
    """
    one, both = np.asarray(first, np.float64), np.asarray(second, np.float64)
    y = np.asarray(groups)
    if one.shape != both.shape or one.ndim != 2 or len(one) == 0 or y.shape != (len(one),):
        raise DataError(f"doubt threshold: first {one.shape} / second {both.shape} / groups {y.shape}")
    k = one.shape[1]
    f = np.asarray(floors, np.float64)
    full_pred = both.argmax(1)
    full_acc, full_rec = float((full_pred == y).mean()), _recalls(full_pred, y, k)
    need = np.where(full_rec >= f - 1e-12, f, full_rec)
    top = one.max(1)
    for t in sorted(float(v) for v in (DOUBT_GRID if grid is None else grid)):
        doubtful = top < t
        pred = np.where(doubtful, full_pred, one.argmax(1))
        acc = float((pred == y).mean())
        if acc >= full_acc and (_recalls(pred, y, k) >= need - 1e-12).all():
            return {
                "below": t,
                "share": round(float(doubtful.mean()), 6),
                "val_group_acc": acc,
                "val_group_acc_second": full_acc,
                "val_group_acc_first": float((one.argmax(1) == y).mean()),
            }
    return None
