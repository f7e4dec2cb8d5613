"""Gates, canary set, label-free drift and labelled KPIs, on constructed tables and synthetic images.

The drift tests use a deterministic stand-in model (nearest group centroid on 7x7 pooled pixels,
embedding = a fixed random projection) so they run without training; the same checks against a
real trained model run in the orchestration integration tests.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

from zalando.errors import ConfigError, DataError
from zalando.labels import GROUP_NAMES, LABEL_TO_GROUP
from zalando.monitor import (
    STUDY_FLOORS,
    DriftThresholds,
    GateConfig,
    KpiThresholds,
    any_alarm,
    canary_accuracy,
    chi2_sf,
    drift_report,
    evaluate_gates,
    gate_metrics,
    ks_2samp,
    labelled_kpis,
    mmd2_rbf,
    psi,
    reference_from_table,
    reference_profile,
    reference_to_table,
    select_canary_set,
)

# ------------------------------------------------------------------------------------------- gates


def _metrics(f1: float = 0.95, **over: object) -> dict:
    """A challenger that passes every study floor with room to spare."""
    m = {
        "model_version": "v-new",
        "dataset_version": "ds1",
        "per_group": {g: {"recall": 0.999, "precision": 0.999, "npv": 0.999} for g in GROUP_NAMES},
        "macro_f1": f1,
        "latency_ms_per_1000": 400.0,
        "size_mb": 3.0,
        "canary_accuracy": 0.8,
    }
    m.update(over)
    return m


def test_gates_pass() -> None:
    d = evaluate_gates(_metrics(0.95), {**_metrics(0.94), "model_version": "v-old"})
    assert d.promote and d.reasons == []
    checks = [r["check"] for r in d.rows]
    assert len([c for c in checks if c.startswith(("recall[", "precision[", "npv["))]) == 15
    assert {"latency_ms_per_1000", "size_mb", "canary_accuracy", "macro_f1_vs_champion"} <= set(checks)
    assert d.champion_version == "v-old" and d.challenger_version == "v-new"
    frame = d.to_frame()
    assert list(frame.columns) == ["check", "value", "threshold", "rule", "passed"] and frame["passed"].all()
    assert "PROMOTE" in d.to_markdown()


def test_gates_fail_one_floor() -> None:
    m = _metrics()
    m["per_group"]["One piece"]["precision"] = 0.84  # floor .86
    d = evaluate_gates(m, _metrics(0.90))
    assert not d.promote
    failed = [r["check"] for r in d.rows if not r["passed"]]
    assert failed == ["precision[One piece]"]
    assert d.reasons == ["One piece precision 0.8400 below floor 0.86"]
    assert "**no**" in d.to_markdown()


def test_gates_tie_with_champion_fails() -> None:
    d = evaluate_gates(_metrics(0.95), _metrics(0.95))
    assert not d.promote
    assert [r["check"] for r in d.rows if not r["passed"]] == ["macro_f1_vs_champion"]
    # just under the margin fails, at the margin passes
    assert not evaluate_gates(_metrics(0.9509), _metrics(0.95)).promote
    assert evaluate_gates(_metrics(0.951), _metrics(0.95)).promote
    # margin 0 lets a tie through
    assert evaluate_gates(_metrics(0.95), _metrics(0.95), GateConfig(min_f1_margin=0.0)).promote


def test_gates_floor_rounding_to_two_decimals() -> None:
    for value, ok in ((0.995, True), (0.9949, False)):
        m = _metrics()
        m["per_group"]["Footwear"]["recall"] = value  # floor 1.00
        assert evaluate_gates(m, None).promote is ok, value
    cfg = GateConfig(decimals=3)
    m = _metrics()
    m["per_group"]["Footwear"]["recall"] = 0.995
    assert not evaluate_gates(m, None, cfg).promote


def test_gates_latency_size_canary_and_missing() -> None:
    assert not evaluate_gates(_metrics(latency_ms_per_1000=1500.0), None).promote
    assert not evaluate_gates(_metrics(size_mb=80.0), None).promote
    assert not evaluate_gates(_metrics(canary_accuracy=0.3), None).promote
    # a drop of more than max_canary_drop below the champion's canary blocks promotion
    d = evaluate_gates(_metrics(0.96, canary_accuracy=0.70), _metrics(0.95, canary_accuracy=0.80))
    assert [r["check"] for r in d.rows if not r["passed"]] == ["canary_accuracy_vs_champion"]
    m = _metrics()
    del m["latency_ms_per_1000"]
    d = evaluate_gates(m, None)
    assert not d.promote and "latency missing" in d.reasons[0]
    # no champion: the F1 check passes with no threshold
    row = next(r for r in evaluate_gates(_metrics(), None).rows if r["check"] == "macro_f1_vs_champion")
    assert row["passed"] and row["threshold"] is None
    # limits can be switched off
    cfg = GateConfig(max_latency_ms_per_1000=None, max_size_mb=None, canary_floor=None)
    assert evaluate_gates(
        _metrics(latency_ms_per_1000=9e9, size_mb=9e9, canary_accuracy=0.0), None, cfg
    ).promote


def test_gates_refuse_champion_from_other_data() -> None:
    d = evaluate_gates(_metrics(0.99), _metrics(0.90, dataset_version="ds0"))
    assert not d.promote and "evaluate the champion on the same validation data" in d.reasons[0]


def test_gates_accept_records_and_frames() -> None:
    recs = [{"group_name": g, "recall": 0.999, "precision": 0.999, "npv": 0.999} for g in GROUP_NAMES]
    assert evaluate_gates(_metrics(per_group=recs), None).promote
    assert evaluate_gates(_metrics(per_group=pd.DataFrame(recs)), None).promote
    keyed = {g.lower().replace(" ", "_"): v for g, v in _metrics()["per_group"].items()}
    assert evaluate_gates(_metrics(per_group=keyed), None).promote


def test_gate_config() -> None:
    cfg = GateConfig()
    assert cfg.floors["One piece"].precision == 0.86 and cfg.min_f1_margin == 0.001
    assert {g: f.model_dump() for g, f in cfg.floors.items()} == STUDY_FLOORS
    cfg = GateConfig(floors={"one_piece": {"recall": 0.5, "precision": 0.5, "npv": 0.5}})
    assert list(cfg.floors) == ["One piece"]
    with pytest.raises(ConfigError, match="group 'Hats': unknown"):
        GateConfig(floors={"Hats": {"recall": 0.5, "precision": 0.5, "npv": 0.5}})


# ------------------------------------------------------------------------------------------- synthetic data


def _prototypes() -> np.ndarray:
    """One smooth, half-dark 28x28 pattern per label (fixed seed)."""
    base = np.kron(np.random.default_rng(123).normal(size=(10, 7, 7)), np.ones((4, 4)))
    for _ in range(2):
        base = (np.roll(base, 1, 1) + base + np.roll(base, -1, 1)) / 3
        base = (np.roll(base, 1, 2) + base + np.roll(base, -1, 2)) / 3
    return np.clip(base * 200, 0, 255)


PROTOS = _prototypes()


def make_images(n: int, seed: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n) if labels is None else np.asarray(labels)
    x = PROTOS[y] * rng.uniform(0.7, 1.1, (n, 1, 1)) + rng.normal(0, 20, (n, 28, 28))
    return np.clip(x, 0, 255).astype(np.uint8), y


class CentroidModel:
    """A deterministic stand-in for a trained net: softmax of -distance to group centroids."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        f, g = self._feat(x), LABEL_TO_GROUP[y]
        self.centroids = np.stack([f[g == k].mean(0) for k in range(5)])
        self.proj = np.random.default_rng(7).normal(size=(49, 16)) / 3

    @staticmethod
    def _feat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(x), 49) / 255.0

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = self._feat(x)
        z = -((f[:, None, :] - self.centroids[None]) ** 2).sum(-1) / 0.5
        p = np.exp(z - z.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).astype(np.float32), np.tanh(f @ self.proj).astype(np.float32)


@pytest.fixture(scope="module")
def world() -> dict:
    x_train, y_train = make_images(3000, 1)
    x_val, y_val = make_images(1000, 2)
    model = CentroidModel(x_train, y_train)
    p_val, e_val = model(x_val)
    prior = np.bincount(LABEL_TO_GROUP[y_train], minlength=5)
    ref = reference_profile(x_train, p_val, e_val, prior, sample_size=500, seed=0)
    return {"model": model, "ref": ref, "x_val": x_val, "y_val": y_val, "p_val": p_val}


# ------------------------------------------------------------------------------------------- drift


def _alarms(world: dict, images: np.ndarray) -> tuple[pd.DataFrame, set[str]]:
    p, e = world["model"](images)
    df = drift_report(images, p, e, world["ref"])
    return df, set(df.loc[df["alarm"], "statistic"])


def test_clean_batch_raises_no_alarm(world: dict) -> None:
    for n, seed in ((5000, 3), (300, 4)):
        x, _ = make_images(n, seed)  # held out, same distribution
        df, alarms = _alarms(world, x)
        assert alarms == set(), df.to_string()
        assert not any_alarm(df)
        assert set(df["statistic"]) == {
            "group_mix_psi", "group_mix_chi2", "confidence_psi", "confidence_ks",
            "pixel_mean", "pixel_std", "dark_fraction", "embedding_mmd2",
        }  # fmt: skip
        # every row is under its threshold, or (tests with a p-value) not significant
        assert ((df["value"] < df["threshold"]) | (df["p_value"] >= DriftThresholds().alpha)).all()


def test_inverted_batch_alarms(world: dict) -> None:
    x, _ = make_images(2000, 5)
    _, alarms = _alarms(world, 255 - x)
    assert {"pixel_mean", "dark_fraction", "embedding_mmd2"} <= alarms


def test_rotated_batch_alarms(world: dict) -> None:
    x, _ = make_images(2000, 6)
    df, alarms = _alarms(world, np.rot90(x, 1, axes=(1, 2)).copy())
    # rotation keeps pixel statistics: the model-side detectors must catch it
    assert not df.set_index("statistic").loc[["pixel_mean", "pixel_std", "dark_fraction"], "alarm"].any()
    assert {"embedding_mmd2", "group_mix_psi"} <= alarms


def test_one_group_batch_alarms(world: dict) -> None:
    x, _ = make_images(500, 7, labels=np.full(500, 8))  # bags only
    df, alarms = _alarms(world, x)
    assert {"group_mix_psi", "group_mix_chi2"} <= alarms
    row = df.set_index("statistic").loc["group_mix_chi2"]
    assert row["p_value"] < 1e-6 and "bags=1.000" in row["batch_value"]


def test_small_batch_never_alarms(world: dict) -> None:
    x, _ = make_images(20, 8, labels=np.full(20, 8))
    df, alarms = _alarms(world, x)
    assert alarms == set() and df["detail"].str.contains("no alarm").all()


def test_drift_report_is_fast(world: dict) -> None:
    x, _ = make_images(10_000, 9)
    p, e = world["model"](x)
    t0 = time.perf_counter()
    drift_report(x, p, e, world["ref"])
    assert time.perf_counter() - t0 < 1.0


def test_reference_round_trips_through_arrow(world: dict) -> None:
    ref = world["ref"]
    back = reference_from_table(reference_to_table(ref))
    assert back["mmd_bandwidth"] == ref["mmd_bandwidth"] and back["group_prior"] == ref["group_prior"]
    np.testing.assert_array_equal(back["embedding_sample"], ref["embedding_sample"])
    np.testing.assert_array_equal(back["confidence_sample"], ref["confidence_sample"])
    x, _ = make_images(500, 10)
    p, e = world["model"](x)
    pd.testing.assert_frame_equal(drift_report(x, p, e, back), drift_report(x, p, e, ref))


def test_drift_bad_inputs(world: dict) -> None:
    x, _ = make_images(100, 11)
    p, e = world["model"](x)
    with pytest.raises(DataError, match="batch_embeddings: expected shape"):
        drift_report(x, p, e[:, :3], world["ref"])
    with pytest.raises(DataError, match="batch_group_probs: expected shape"):
        drift_report(x, p[:50], e, world["ref"])
    with pytest.raises(DataError, match="batch_images: expected uint8"):
        drift_report(x.astype(np.float32), p, e, world["ref"])


def test_statistics_helpers() -> None:
    for x in (0.5, 3.0, 9.4877, 30.0):  # df=4 has a closed form; df=1 is erfc
        assert chi2_sf(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-9)
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
    assert chi2_sf(9.4877, 4) == pytest.approx(0.05, abs=1e-4)
    assert psi([0.4, 0.1, 0.1, 0.3, 0.1], [0.4, 0.1, 0.1, 0.3, 0.1]) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) > 0.5
    rng = np.random.default_rng(0)
    d, p = ks_2samp(rng.normal(size=2000), rng.normal(size=2000))
    assert d < 0.06 and p > 0.01
    d, p = ks_2samp(rng.normal(size=2000), rng.normal(0.5, 1, size=2000))
    assert d > 0.15 and p < 1e-10
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert abs(mmd2_rbf(a, b, 2.0)) < 0.01 < mmd2_rbf(a, b + 1.0, 2.0)


# ------------------------------------------------------------------------------------------- canary


def test_canary_set_from_model_probs(world: dict) -> None:
    t = select_canary_set(world["x_val"], world["y_val"], world["p_val"], n=40)
    assert t.num_rows == 40 and t.schema.field("image").type.byte_width == 784
    groups = t.column("group").to_numpy()
    assert (groups == 0).sum() == 20 and (groups == 2).sum() == 20  # half upper, half one piece
    assert set(t.column("method").to_pylist()) == {"reference_model"}
    margins = t.column("margin").to_numpy()
    assert (np.diff(margins) >= 0).all()  # hardest first
    # the chosen ones are the lowest-margin candidates of their group
    vi = t.column("val_index").to_numpy()
    p, g = world["p_val"], LABEL_TO_GROUP[world["y_val"]]
    one = np.flatnonzero(g == 2)
    m_one = p[one, 2] - p[one, 0]
    assert set(vi[groups == 2]) == set(one[np.argsort(m_one, kind="stable")[:20]])
    img0 = np.frombuffer(t.column("image")[0].as_py(), np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(img0, world["x_val"][vi[0]])
    # deterministic
    assert t.equals(select_canary_set(world["x_val"], world["y_val"], world["p_val"], n=40))


def test_canary_set_heuristic_and_accuracy(world: dict) -> None:
    ids = [f"train-{i:05d}" for i in range(len(world["y_val"]))]
    t = select_canary_set(world["x_val"], world["y_val"], None, n=31, image_ids=ids)
    assert t.num_rows == 31 and set(t.column("method").to_pylist()) == {"pixel_centroid"}
    assert set(t.column("group").to_pylist()) == {0, 2}
    assert t.column("image_id")[0].as_py().startswith("train-")
    images = np.stack([np.frombuffer(b, np.uint8).reshape(28, 28) for b in t.column("image").to_pylist()])
    p, _ = world["model"](images)
    truth = t.column("group").to_numpy()
    acc = canary_accuracy(p, truth)
    assert acc == pytest.approx(float((p.argmax(1) == truth).mean()))
    assert canary_accuracy(np.eye(5)[truth], truth) == 1.0
    with pytest.raises(DataError, match="canary group_probs: expected shape"):
        canary_accuracy(p[:3], truth)
    with pytest.raises(DataError, match="needs both Upper part and One piece"):
        select_canary_set(world["x_val"][:5], np.full(5, 8), None, n=4)


# ------------------------------------------------------------------------------------------- KPIs


def test_labelled_kpis_alarm_when_true_positives_fall() -> None:
    truth = np.repeat(np.arange(5), 100)
    good = truth.copy()
    df = labelled_kpis(truth, good)
    assert not df["alarm"].any() and (df["tp"] == 100).all() and (df["recall"] == 1.0).all()

    bad = truth.copy()
    bad[np.flatnonzero(truth == 2)[:20]] = 0  # 20 dresses called Upper part: One piece recall .80
    df = labelled_kpis(truth, bad).set_index("group_name")
    assert df.loc["One piece", "tp"] == 80 and df.loc["One piece", "recall"] == pytest.approx(0.8)
    assert df.loc["One piece", "alarm"] and "recall 0.800 < 0.91" in df.loc["One piece", "reason"]
    assert df.loc["Upper part", "precision"] == pytest.approx(100 / 120)
    assert df.loc["Upper part", "alarm"] and "precision" in df.loc["Upper part", "reason"]
    assert not df.loc[["Bottom part", "Footwear", "Bags"], "alarm"].any()
    assert any_alarm(df.reset_index())


def test_labelled_kpis_thresholds_and_support() -> None:
    truth = np.repeat(np.arange(5), [100, 100, 5, 100, 100])
    pred = truth.copy()
    pred[truth == 2] = 0  # One piece entirely missed, but only 5 images: below min_support
    df = labelled_kpis(truth, pred).set_index("group_name")
    assert not df.loc["One piece", "alarm"] and df.loc["One piece", "tp"] == 0
    th = KpiThresholds(min_tp={"footwear": 101}, min_support=0)
    df = labelled_kpis(truth, pred, th).set_index("group_name")
    assert df.loc["Footwear", "alarm"] and "TP 100 < 101" in df.loc["Footwear", "reason"]
    assert df.loc["One piece", "alarm"]
    with pytest.raises(DataError, match="y_pred_group: expected integer group ids"):
        labelled_kpis(truth, pred + 5)


def test_gate_metrics_from_evaluation_frames() -> None:
    rows = [
        {"split": s, "group": g, "group_name": n, "recall": r, "precision": 0.999, "npv": 0.999, "f1": 0.99}
        for s, r in (("val", 0.999), ("test", 0.5))
        for g, n in enumerate(GROUP_NAMES)
    ]
    summary = pd.DataFrame(
        [{"split": "val", "accuracy": 0.99, "macro_f1": 0.97}, {"split": "test", "macro_f1": 0.5}]
    )
    perf = pd.DataFrame(
        [
            {"runtime": "torch", "images_per_s": 2000.0, "size_mb_torch": 2.0, "size_mb_onnx": 2.1},
            {"runtime": "onnx", "images_per_s": 4000.0, "size_mb_torch": 2.0, "size_mb_onnx": 2.1},
        ]
    )
    m = gate_metrics(
        pd.DataFrame(rows), summary, perf, model_version="v1", dataset_version="ds1", canary_accuracy=0.9
    )
    assert m["macro_f1"] == 0.97 and m["runtime"] == "onnx"
    assert m["latency_ms_per_1000"] == pytest.approx(250.0) and m["size_mb"] == 2.1
    assert m["per_group"]["One piece"]["recall"] == 0.999  # the val split, not test
    assert evaluate_gates(m, None).promote
    with pytest.raises(DataError, match="appears twice"):
        evaluate_gates({**m, "per_group": rows}, None)
    with pytest.raises(DataError, match="no rows for split 'train'"):
        gate_metrics(
            pd.DataFrame(rows), summary, perf, model_version="v1", dataset_version="d", split="train"
        )


# ------------------------------------------------------------------------------------------- drift numbers

# drift_report on a small fixed world, as computed by the hand-written statistics before they moved to
# scipy.stats: (value, p_value or None, alarm) per statistic; the numbers must not change.
DRIFT_GOLDEN: dict[str, dict[str, tuple[float, float | None, bool]]] = {
    "clean": {
        "group_mix_psi": (0.01506210584, None, False),
        "group_mix_chi2": (0.1229001014, 0.1960502132, False),
        "confidence_psi": (0.0140814771, None, False),
        "confidence_ks": (0.04583333333, 0.8562610254, False),
        "pixel_mean": (0.03241031193, None, False),
        "pixel_std": (0.009871109257, None, False),
        "dark_fraction": (0.03072165039, None, False),
        "embedding_mmd2": (0.001916838362, None, False),
    },
    "mild": {
        "group_mix_psi": (0.2697469727, None, True),
        "group_mix_chi2": (0.6578697766, 2.240820817e-36, True),
        "confidence_psi": (0.3558105643, None, True),
        "confidence_ks": (0.165, 0.000146994479, True),
        "pixel_mean": (0.1203051757, None, False),
        "pixel_std": (0.174243816, None, False),
        "dark_fraction": (0.1889591921, None, False),
        "embedding_mmd2": (0.0146997824, None, True),
    },
    "drifted": {
        "group_mix_psi": (1.216275741, None, True),
        "group_mix_chi2": (1.609688256, 4.524674406e-223, True),
        "confidence_psi": (0.7936187723, None, True),
        "confidence_ks": (0.24, 3.591611553e-09, True),
        "pixel_mean": (1.722543876, None, True),
        "pixel_std": (0.4673184825, None, True),
        "dark_fraction": (3.376014787, None, True),
        "embedding_mmd2": (0.1351951577, None, True),
    },
}
GOLDEN_MMD_THRESHOLD = 0.005596505009


@pytest.fixture(scope="module")
def small_world() -> dict:
    x_train, y_train = make_images(600, 31)
    x_val, _ = make_images(300, 32)
    model = CentroidModel(x_train, y_train)
    p_val, e_val = model(x_val)
    prior = np.bincount(LABEL_TO_GROUP[y_train], minlength=5)
    ref = reference_profile(x_train, p_val, e_val, prior, sample_size=200, seed=0, calibration_splits=50)
    return {"model": model, "ref": ref}


def golden_batch(case: str) -> np.ndarray:
    """400 images: held out ('clean'), or with extra bags and brighter pixels ('mild', 'drifted')."""
    if case == "clean":
        return make_images(400, 33)[0]
    bags, brighter, seed = {"mild": (0.2, 4, 36), "drifted": (0.5, 25, 35)}[case]
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(400) < bags, 8, rng.integers(0, 10, 400))
    x = make_images(400, seed, labels=labels)[0].astype(np.int64) + brighter
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("case", ["clean", "mild", "drifted"])
def test_drift_report_numbers_unchanged(small_world: dict, case: str) -> None:
    x = golden_batch(case)
    p, e = small_world["model"](x)
    df = drift_report(x, p, e, small_world["ref"]).set_index("statistic")
    assert list(df.index) == list(DRIFT_GOLDEN[case])
    for stat, (value, p_value, alarm) in DRIFT_GOLDEN[case].items():
        row = df.loc[stat]
        assert row["value"] == pytest.approx(value, rel=1e-6), stat
        if p_value is None:
            assert math.isnan(row["p_value"]), stat
        else:
            assert row["p_value"] == pytest.approx(p_value, rel=1e-6), stat
        assert bool(row["alarm"]) is alarm, stat
    assert df.loc["embedding_mmd2", "threshold"] == pytest.approx(GOLDEN_MMD_THRESHOLD, rel=1e-6)
