"""Temperature scaling, ECE and the needs-review rule on synthetic logits."""

from __future__ import annotations

import numpy as np
import pytest

from zalando.calibration import (
    apply_temperature,
    choose_doubt_threshold,
    expected_calibration_error,
    fit_group_weights,
    fit_temperature,
    needs_review_mask,
    nll,
    recall_floors,
)
from zalando.errors import DataError


def _calibrated_logits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax IS the true label distribution (perfect calibration at T=1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, 10))
    probs = apply_temperature(logits, 1.0)
    u = rng.random(n)[:, None]
    labels = (u > probs.cumsum(axis=1)).sum(axis=1).clip(0, 9)
    return logits, labels


def test_fit_temperature_recovers_overconfidence() -> None:
    logits, labels = _calibrated_logits(4000, 0)
    over = logits * 3.0  # an over-confident model: its logits are 3x too large
    t = fit_temperature(over, labels)
    assert 2.6 < t < 3.4
    assert nll(over, labels, t) < nll(over, labels, 1.0) - 0.1
    ece_before = expected_calibration_error(apply_temperature(over, 1.0), labels)
    ece_after = expected_calibration_error(apply_temperature(over, t), labels)
    assert ece_after < ece_before / 2
    # scaling never changes the argmax
    assert (apply_temperature(over, t).argmax(1) == over.argmax(1)).all()


def test_fit_temperature_underconfidence_and_calibrated() -> None:
    logits, labels = _calibrated_logits(4000, 1)
    assert 0.25 < fit_temperature(logits * 0.4, labels) < 0.55  # under-confident: T < 1
    assert 0.85 < fit_temperature(logits, labels) < 1.15  # already calibrated: T near 1


def test_ece_known_values() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bin 0.9: acc 0.5 vs conf 0.9 (gap .4, weight .5); bin 0.6: acc 1 vs conf .6 (gap .4, weight .5)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)


def test_needs_review_mask() -> None:
    p = np.array([[0.5, 0.5, 0, 0, 0], [0.95, 0.05, 0, 0, 0], [0.2] * 5])
    assert needs_review_mask(p, 0.6).tolist() == [True, False, True]
    assert needs_review_mask(p, 0.0).tolist() == [False, False, False]
    assert needs_review_mask(np.zeros((0, 5)), 0.5).shape == (0,)
    with pytest.raises(DataError, match="review threshold"):
        needs_review_mask(p, 1.5)


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match="labels: class ids must be in 0..9"):
        fit_temperature(np.zeros((3, 10)), np.array([0, 1, 10]))
    with pytest.raises(DataError, match="logits: expected"):
        fit_temperature(np.zeros(10), np.array([0]))
    with pytest.raises(DataError, match="NaN"):
        fit_temperature(np.full((2, 10), np.nan), np.array([0, 1]))
    with pytest.raises(DataError, match="temperature: must be > 0"):
        nll(np.zeros((2, 10)), np.array([0, 1]), 0.0)


def _two_group_case(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Group 1 is under-predicted: many of its images get slightly more mass on group 0."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    p = np.full((n, 3), 0.05)
    p[np.arange(n), y] = 0.9
    hard = (y == 1) & (rng.random(n) < 0.2)  # 20% of group 1 look like group 0, by a small margin
    p[hard] = [0.5, 0.45, 0.05]
    easy0 = (y == 0) & (rng.random(n) < 0.05)  # a few group-0 images that a large weight would steal
    p[easy0] = [0.52, 0.43, 0.05]
    return p / p.sum(1, keepdims=True), y


def test_operating_point_meets_a_recall_floor_at_small_cost() -> None:
    p, y = _two_group_case()
    op = fit_group_weights(p, y, [0.9, 0.95, 0.9])
    assert op.recall_before[1] < 0.85 and op.recall_after[1] >= 0.95 and op.met
    assert op.weights[1] > 1 and op.weights[0] == op.weights[2] == 1.0
    assert op.acc_after >= op.acc_before - 0.005
    pred = (p * np.array(op.weights)).argmax(1)
    assert float((pred[y == 1] == 1).mean()) == pytest.approx(op.recall_after[1])


def test_operating_point_keeps_argmax_when_floors_hold_and_stops_when_too_costly() -> None:
    p, y = _two_group_case()
    plain = fit_group_weights(p, y, [0.5, 0.5, 0.5])
    assert plain.weights == [1.0, 1.0, 1.0] and plain.met and plain.acc_after == plain.acc_before
    conflicting = fit_group_weights(p, y, [0.99, 1.0, 0.99])  # raising group 1 costs group 0 its floor
    assert not conflicting.met and max(conflicting.weights) <= 4.0
    costly = p.copy()
    costly[(y == 1) & (p[:, 1] < 0.5)] = [0.6, 0.35, 0.05]  # the hard ones now need a weight > 1.7 ...
    costly[y == 0] = [0.52, 0.43, 0.05]  # ... but every group-0 image flips at 1.21
    too_costly = fit_group_weights(costly, y, [0.0, 0.95, 0.0])
    assert not too_costly.met and "accuracy" in too_costly.reason
    assert too_costly.acc_after >= too_costly.acc_before - 0.005
    capped = fit_group_weights(p, y, [0.0, 1.0, 0.0], max_weight=1.05)
    assert not capped.met and "weight above" in capped.reason and capped.weights == [1.0, 1.0, 1.0]
    assert recall_floors([0.96, 1.0]) == [0.96, 0.995]


def test_operating_point_bad_inputs() -> None:
    p, y = _two_group_case(20)
    with pytest.raises(DataError, match="probs must be"):
        fit_group_weights(p, y, [0.9, 0.9])
    with pytest.raises(DataError, match="groups must be"):
        fit_group_weights(p, y + 5, [0.9, 0.9, 0.9])
    with pytest.raises(DataError, match="NaN"):
        fit_group_weights(np.full_like(p, np.nan), y, [0.9, 0.9, 0.9])


def _two_groups(rows: list[tuple[int, int, float, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of (count, truth, the one view's probability of group 0, the full flip's group) -> one, both, y."""
    one, both, y = [], [], []
    for count, truth, p0, flip_group in rows:
        one += [[p0, 1 - p0]] * count
        both += [[0.9, 0.1] if flip_group == 0 else [0.1, 0.9]] * count
        y += [truth] * count
    return np.array(one), np.array(both), np.array(y)


def test_flip_threshold_is_the_lowest_that_loses_nothing_against_flipping_every_row() -> None:
    one, both, y = _two_groups(
        [
            (100, 0, 0.999, 0),  # right either way
            (1, 1, 0.97, 1),  # the one view is wrong at 0.97, the flip mends it
            (1, 1, 0.96, 1),  # the same at 0.96
            (1, 0, 0.9995, 1),  # the one view is right at 0.9995, the flip spoils it
        ]
    )
    choice = choose_doubt_threshold(one, both, y, floors=[0.0, 0.0])
    assert choice is not None and choice["below"] == 0.98  # below 0.98: only the two mended rows
    assert choice["share"] == pytest.approx(2 / 103, abs=1e-6)
    assert (choice["val_group_acc"], choice["val_group_acc_second"], choice["val_group_acc_first"]) == (
        1.0, pytest.approx(102 / 103), pytest.approx(101 / 103),
    )  # fmt: skip
    assert choose_doubt_threshold(one, both, y, floors=[0.0, 0.0], grid=(0.8, 0.9, 0.95)) is None


def test_flip_threshold_keeps_a_recall_floor_that_flipping_every_row_meets() -> None:
    one, both, y = _two_groups(
        [
            (40, 0, 0.99, 0),
            (9, 1, 0.01, 1),
            (1, 1, 0.996, 1),  # group 1's tenth row: the one view says group 0 at 0.996, the flip mends it
            (1, 0, 0.15, 0),  # the one view says group 1 at 0.85, the flip mends it
            (1, 0, 0.9995, 1),  # right at 0.9995, spoiled by the flip
        ]
    )
    loose = choose_doubt_threshold(one, both, y, floors=[0.0, 0.5])
    strict = choose_doubt_threshold(one, both, y, floors=[0.0, 1.0])
    assert loose is not None and loose["below"] == 0.9  # the 0.85 row: accuracy back to the full flip's
    assert strict is not None and strict["below"] == 0.998  # recall 1.0 needs the 0.996 row flipped too
    with pytest.raises(DataError, match="doubt threshold"):
        choose_doubt_threshold(one, both[:-1], y, floors=[0.0, 0.0])
