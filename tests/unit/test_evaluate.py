"""Classical metrics against hand-computed confusion matrices, PR curves, timing and the metric tables."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from zalando import evaluate as ev
from zalando.errors import DataError
from zalando.labels import GROUP_NAMES, group_of
from zalando.steps.training import commit_metric_tables, metric_keys, read_metric_tables

# Group 3 occurs three times but is never predicted; group 4 never occurs but is predicted once.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
Y_PRED = np.array([0, 0, 1, 1, 4, 2, 0, 0, 2, 1])
CM = np.array(
    [
        [2, 1, 0, 0, 0],
        [0, 1, 0, 0, 1],
        [1, 0, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
    ]
)


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a divide-by-zero RuntimeWarning fails the test
        yield


def test_confusion_matrix_by_hand() -> None:
    cm = ev.confusion_matrix(Y_TRUE, Y_PRED, 5)
    np.testing.assert_array_equal(cm, CM)
    assert cm.dtype == np.int64


def test_group_metrics_by_hand_with_never_predicted_and_never_occurring_groups() -> None:
    m = ev.group_metrics(Y_TRUE, Y_PRED)
    assert list(m.columns) == [
        "group", "group_name", "recall", "precision", "npv", "f1", "support", "tp", "fp", "tn", "fn"
    ]  # fmt: skip
    assert list(m["group_name"]) == list(GROUP_NAMES)
    np.testing.assert_array_equal(m["tp"], [2, 1, 1, 0, 0])
    np.testing.assert_array_equal(m["fp"], [2, 2, 1, 0, 1])
    np.testing.assert_array_equal(m["fn"], [1, 1, 1, 3, 0])
    np.testing.assert_array_equal(m["tn"], [5, 6, 7, 7, 9])
    np.testing.assert_array_equal(m["support"], [3, 2, 2, 3, 0])
    np.testing.assert_allclose(m["recall"], [2 / 3, 1 / 2, 1 / 2, 0.0, np.nan])  # group 4 never occurs
    np.testing.assert_allclose(m["precision"], [2 / 4, 1 / 3, 1 / 2, np.nan, 0.0])  # group 3 never predicted
    np.testing.assert_allclose(m["npv"], [5 / 6, 6 / 7, 7 / 8, 7 / 10, 9 / 9])
    np.testing.assert_allclose(m["f1"], [4 / 7, 2 / 5, 2 / 4, 0.0, 0.0])


def test_group_absent_and_never_predicted_is_undefined_and_left_out_of_macro() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 1, 1])
    m = ev.group_metrics(y_true, y_pred)
    for col in ("recall", "precision", "f1"):
        assert np.isnan(m.loc[2:, col]).all()
    np.testing.assert_allclose(m["npv"][:2], [2 / 3, 1 / 1])  # group 0: TN 2, FN 1; group 1: TN 1, FN 0
    s = ev.summary_metrics(y_true, y_pred)
    assert s["accuracy"] == pytest.approx(3 / 4)
    # only groups 0 and 1 occur or are predicted: macro over those two
    assert s["macro_recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["macro_precision"] == pytest.approx((1 + 2 / 3) / 2)


def test_group_predicted_for_every_sample_has_undefined_npv() -> None:
    m = ev.group_metrics([0, 1, 0], [0, 0, 0])
    assert np.isnan(m.loc[0, "npv"])
    assert m.loc[1, "npv"] == pytest.approx(2 / 3)  # TN = 2 (two 0s not predicted 1), FN = 1


def test_npv_matches_its_definition_on_random_data() -> None:
    rng = np.random.default_rng(7)
    t = rng.integers(0, 5, 500)
    p = np.where(rng.random(500) < 0.7, t, rng.integers(0, 5, 500))
    m = ev.group_metrics(t, p)
    for g in range(5):  # the definition, one group at a time
        tn = np.sum((t != g) & (p != g))
        fn = np.sum((t == g) & (p != g))
        tp = np.sum((t == g) & (p == g))
        fp = np.sum((t != g) & (p == g))
        assert m.loc[g, "npv"] == pytest.approx(tn / (tn + fn))
        assert m.loc[g, "recall"] == pytest.approx(tp / (tp + fn))
        assert m.loc[g, "precision"] == pytest.approx(tp / (tp + fp))


def test_summary_metrics_by_hand() -> None:
    s = ev.summary_metrics(Y_TRUE, Y_PRED)
    assert s["n"] == 10
    assert s["accuracy"] == pytest.approx(0.4)
    # all five groups occur or are predicted; undefined values count as 0
    assert s["macro_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2 + 0 + 0) / 5)
    assert s["macro_precision"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 0 + 0) / 5)
    assert s["macro_f1"] == pytest.approx((4 / 7 + 2 / 5 + 1 / 2) / 5)
    assert s["weighted_recall"] == pytest.approx(s["accuracy"])
    assert s["weighted_precision"] == pytest.approx((0.5 * 3 + (1 / 3) * 2 + 0.5 * 2) / 10)
    assert ev.summary_from_counts([2, 1, 1, 0, 0], [2, 2, 1, 0, 1], [1, 1, 1, 3, 0]) == s


def test_label_group_matrix() -> None:
    labels = np.array([0, 3, 3, 6, 8, 9])  # T-shirt, Dress, Dress, Shirt, Bag, Ankle boot
    pred = np.array([0, 2, 0, 2, 4, 3])
    m = ev.label_group_matrix(labels, pred)
    assert m.shape == (10, 5)
    assert m.sum() == 6
    assert m[3, 2] == 1 and m[3, 0] == 1 and m[6, 2] == 1 and m[9, 3] == 1
    frame = ev.label_group_frame(m)
    assert frame.loc["Dress", "One piece"] == 1


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([0, 1, 5], [0, 1, 2], "0..4"),
        ([0, 1], [0, 1, 2], "differ in length"),
        ([], [], "empty"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([0.5, 1.0], [0, 1], "integer"),
    ],
)
def test_bad_class_ids_raise_a_named_error(y_true, y_pred, message) -> None:
    with pytest.raises(DataError, match=message):
        ev.group_metrics(y_true, y_pred)


def test_pr_curve_by_hand_with_ties() -> None:
    # group 0 scores: 0.9 (pos), 0.8 (neg), 0.8 (pos), 0.1 (neg)
    y = np.array([0, 1, 0, 1])
    probs = np.full((4, 5), 0.0)
    probs[:, 0] = [0.9, 0.8, 0.8, 0.1]
    probs[:, 1] = 1.0 - probs[:, 0]
    curves = ev.pr_curves(y, probs, max_points=None)
    g0 = curves[curves["group"] == 0]
    np.testing.assert_allclose(g0["threshold"], [0.9, 0.8, 0.1])
    np.testing.assert_allclose(g0["precision"], [1.0, 2 / 3, 1 / 2])
    np.testing.assert_allclose(g0["recall"], [0.5, 1.0, 1.0])
    assert curves[curves["group"] == 3]["recall"].isna().all()  # group 3 never occurs
    ap = ev.average_precision(y, probs)
    assert ap[0] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert np.isnan(ap[3])


def test_pr_curves_sanity_on_random_scores() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 2000)
    logits = rng.normal(size=(2000, 5))
    logits[np.arange(2000), y] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    curves = ev.pr_curves(y, probs, max_points=200)
    for g in range(5):
        c = curves[curves["group"] == g]
        assert 2 <= len(c) <= 200
        assert np.all(np.diff(c["threshold"]) < 0)
        assert np.all(np.diff(c["recall"]) >= 0)
        assert c["recall"].iloc[-1] == pytest.approx(1.0)
        assert c["precision"].iloc[-1] == pytest.approx(np.mean(y == g))
        assert c["precision"].between(0, 1).all()
    perfect = np.eye(5)[y]
    np.testing.assert_allclose(ev.average_precision(y, perfect), 1.0)


def test_pr_curves_reject_bad_probabilities() -> None:
    with pytest.raises(DataError, match="shape"):
        ev.pr_curves([0, 1], np.zeros((2, 4)))
    with pytest.raises(DataError, match="NaN"):
        ev.pr_curves([0, 1], np.full((2, 5), np.nan))


def test_most_confused_pairs_and_worst_mistakes() -> None:
    cm = np.zeros((5, 5), dtype=int)
    cm[2, 0], cm[0, 2], cm[1, 3] = 5, 4, 2
    assert ev.most_confused_pairs(cm, k=5) == [(0, 2, 9), (1, 3, 2)]
    y = np.array([2, 2, 0, 1, 2])
    probs = np.array(
        [
            [0.9, 0.0, 0.1, 0.0, 0.0],  # One piece missed, conf 0.9
            [0.1, 0.0, 0.9, 0.0, 0.0],  # correct
            [0.3, 0.0, 0.7, 0.0, 0.0],  # wrongly predicted One piece, conf 0.7
            [0.0, 0.2, 0.0, 0.8, 0.0],  # a mistake not involving One piece
            [0.6, 0.0, 0.4, 0.0, 0.0],  # One piece missed, conf 0.6
        ]
    )
    np.testing.assert_array_equal(ev.worst_mistakes(y, probs, group=2, k=5), [0, 2, 4])
    np.testing.assert_array_equal(ev.worst_mistakes(y, probs, group=2, k=1), [0])


def test_time_scoring_times_every_image_once_after_warmup() -> None:
    calls: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch.sum(axis=(1, 2))

    images = np.zeros((250, 28, 28), dtype=np.uint8)
    t = ev.time_scoring(predict, images, batch_size=100, warmup=2)
    assert calls == [100, 100, 100, 100, 50]  # 2 warm-up batches, then 3 timed
    assert t["n_images"] == 250 and t["n_batches"] == 3 and t["warmup_batches"] == 2
    assert t["wall_s"] > 0 and t["images_per_s"] > 0
    assert 0 <= t["p50_ms"] <= t["p95_ms"]
    with pytest.raises(DataError, match="batch_size"):
        ev.time_scoring(predict, images, batch_size=0)


def test_time_scoring_runs_parallelism_batches_at_once() -> None:
    """As the scoring engine does: every batch timed once, ``parallelism`` of them at the same time."""
    import threading
    import time

    lock = threading.Lock()
    calls: list[int] = []
    active = [0, 0]  # now, most at once

    def predictor(barrier: threading.Barrier | None) -> Callable[[np.ndarray], None]:
        def predict(batch: np.ndarray) -> None:
            with lock:
                active[0] += 1
                active[1] = max(active)
            if barrier is not None:
                barrier.wait()  # returns only when a second batch runs beside this one
            time.sleep(0.005)
            with lock:
                active[0] -= 1
                calls.append(len(batch))

        return predict

    images = np.zeros((40, 28, 28), dtype=np.uint8)
    pair = threading.Barrier(2, timeout=30)
    t = ev.time_scoring(predictor(pair), images, batch_size=10, warmup=0, parallelism=2)
    assert calls == [10, 10, 10, 10] and active[1] == 2
    assert t["n_batches"] == 4 and t["images_per_s"] > 0 and 0 <= t["p50_ms"] <= t["p95_ms"]
    calls.clear()
    active[1] = 0
    ev.time_scoring(predictor(None), images, batch_size=10, warmup=1)
    assert calls == [10, 10, 10, 10, 10] and active[1] == 1  # one at a time unless asked
    with pytest.raises(DataError, match="parallelism"):
        ev.time_scoring(predictor(None), images, parallelism=0)


def test_parameters_and_sizes() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 2))
    assert ev.count_parameters(model) == 10 * 4 + 4 + 4 * 2 + 2
    model[0].weight.requires_grad_(False)
    assert ev.count_parameters(model, trainable_only=True) == 4 + 4 * 2 + 2
    size = ev.torch_model_bytes(model)
    assert size > 54 * 4
    assert ev.model_size_mb(b"x" * ev.MB) == 1.0
    assert ev.model_size_mb(3 * ev.MB) == 3.0
    with pytest.raises(DataError):
        ev.model_size_mb(-1)


def _tables(run_id: str = "r1", experiment: str = "cnn") -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(1)
    y = group_of(rng.integers(0, 10, 300))
    pred = np.where(rng.random(300) < 0.8, y, rng.integers(0, 5, 300))
    perf = {"runtime": "onnx", "params": 123_456, "size_mb_torch": 0.47, "size_mb_onnx": 0.5}
    perf |= {"n_images": 300, "batch_size": 128, "wall_s": 0.2, "images_per_s": 1500.0, "p50_ms": 1.0}
    perf |= {"p95_ms": 2.0, "mean_ms": 1.2, "warmup_batches": 2}  # extra keys are dropped
    energy = {"label": "score-onnx", "country_iso_code": "DEU", "duration_s": 1.5, "cpu_power_w": 3.0}
    energy |= {"gpu_power_w": 0.0, "ram_power_w": 20.0, "cpu_energy_kwh": 1e-6, "gpu_energy_kwh": 0.0}
    energy |= {"ram_energy_kwh": 8e-6, "energy_kwh": 9e-6, "emissions_kg": 3e-6, "images": None}
    energy |= {"kwh_per_1000_images": None, "power_method": "estimated (TDP x load / constant RAM)"}
    return ev.metric_tables(run_id, experiment, "v1", y, pred, performance=[perf], energy=[energy])


def test_metric_tables_have_the_documented_schemas_and_round_trip_through_parquet() -> None:
    frames = _tables()
    assert set(frames) == set(ev.METRIC_SCHEMAS)
    assert len(frames["per_group"]) == 5 and len(frames["confusion"]) == 25
    assert frames["confusion"]["count"].sum() == 300
    tables = ev.metric_arrow_tables(frames)
    for name, table in tables.items():
        assert table.schema.equals(ev.METRIC_SCHEMAS[name]), name
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        back = pq.read_table(io.BytesIO(buffer.getvalue()))
        assert back.schema.equals(ev.METRIC_SCHEMAS[name]), name
        assert back.num_rows == table.num_rows
    energy = tables["energy"].to_pandas()
    assert energy["images"].isna().all() and energy["power_method"][0].startswith("estimated")
    perf = tables["performance"].to_pandas()
    assert perf.loc[0, "params"] == 123_456 and "mean_ms" not in perf.columns


def test_metric_tables_reject_bad_rows() -> None:
    frames = _tables()
    bad = frames["performance"].assign(params=1.5)
    with pytest.raises(DataError, match="params"):
        ev.to_arrow("performance", bad)
    with pytest.raises(DataError, match="runtime"):
        ev.to_arrow("performance", frames["performance"].drop(columns=["runtime"]))
    with pytest.raises(DataError, match="unknown name"):
        ev.to_arrow("nope", frames["performance"])
    with pytest.raises(DataError, match="run_id"):
        ev.metric_tables("", "cnn", "v1", [0], [0])
    with pytest.raises(DataError, match="metrics key"):
        metric_keys("r1", "a/b")


def test_one_scan_of_a_metric_table_gives_one_table_across_runs(local_lake) -> None:
    for run_id in ("20260101T020000Z-aaaaaa", "20260102T020000Z-bbbbbb"):
        for experiment in ("cnn", "squeezenet1_1_full"):
            commit_metric_tables(
                local_lake, run_id, experiment, ev.metric_arrow_tables(_tables(run_id, experiment))
            )
    per_group = read_metric_tables(local_lake, names=("per_group",))["per_group"]
    assert len(per_group) == 2 * 2 * 5
    one_piece = per_group[per_group["group_name"] == "One piece"].sort_values(["run_id", "experiment"])
    assert list(one_piece["run_id"].astype(str).unique()) == [
        "20260101T020000Z-aaaaaa",
        "20260102T020000Z-bbbbbb",
    ]
    assert one_piece["precision"].between(0, 1).all()
    energy = read_metric_tables(local_lake, names=("energy",))["energy"]
    assert len(energy) == 4 and "power_method" in energy.columns and "recall" not in energy.columns
    # one model's rows, with the documented columns; a re-commit replaces them, never adds
    one = read_metric_tables(local_lake, "20260101T020000Z-aaaaaa", ["cnn"])
    assert set(ev.PER_GROUP_SCHEMA.names) <= set(one["per_group"].columns) and len(one["per_group"]) == 5
    again = ev.metric_arrow_tables(_tables("20260101T020000Z-aaaaaa", "cnn"))
    commit_metric_tables(local_lake, "20260101T020000Z-aaaaaa", "cnn", again)
    assert len(read_metric_tables(local_lake, names=("per_group",))["per_group"]) == 2 * 2 * 5
