"""Quality gates, each profile's gate settings, gate metrics and the canary set, on constructed tables
and synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from zalando.errors import ConfigError, DataError
from zalando.gates import (
    STUDY_FLOORS,
    GateConfig,
    canary_accuracy,
    evaluate_gates,
    gate_config,
    gate_metrics,
    select_canary_set,
)
from zalando.labels import GROUP_NAMES, LABEL_TO_GROUP
from zalando.models.experiments import load_catalog

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


# ------------------------------------------------------------------------------------------- per profile


def test_quick_profile_only_has_to_beat_the_champion() -> None:
    cat = load_catalog()
    quick, cpu = gate_config(cat.profile("quick")), gate_config(cat.profile("cpu"))
    assert quick.floors == {} and quick.max_latency_ms_per_1000 is None and quick.canary_floor is None
    assert len(cpu.floors) == 5 and cpu.max_latency_ms_per_1000 is not None
    assert gate_config(cat.profile("cpu"), {"min_f1_margin": 0.0}).min_f1_margin == 0.0
    with pytest.raises(ConfigError, match="quality gate settings"):
        gate_config(cat.profile("cpu"), {"min_f1_margin": -1})


def test_profile_gates_are_data() -> None:
    cat = load_catalog()
    # paper and cpu apply every gate with GateConfig's defaults; quick switches the absolute ones off
    assert gate_config(cat.profile("paper")) == gate_config(cat.profile("cpu")) == GateConfig()
    quick = gate_config(cat.profile("quick"))
    assert (quick.max_canary_drop, quick.max_size_mb) == (None, None)
    assert quick.min_f1_margin == GateConfig().min_f1_margin and quick.require_same_dataset
    # overrides go on top of the profile's settings, not instead of them
    quick0 = gate_config(cat.profile("quick"), {"min_f1_margin": 0.0})
    assert quick0.floors == {} and quick0.canary_floor is None and quick0.min_f1_margin == 0.0
    with pytest.raises(ConfigError, match="quality gate settings: min_f1_margn: Extra inputs"):
        gate_config(cat.profile("cpu"), {"min_f1_margn": 0.0})
    with pytest.raises(ConfigError, match="quality gate settings: group 'Hats': unknown"):
        gate_config(cat.profile("cpu"), {"floors": {"Hats": {"recall": 0.5, "precision": 0.5, "npv": 0.5}}})


def test_experiments_file_changes_profile_gates(tmp_path: Path) -> None:
    f = tmp_path / "extra.yaml"
    f.write_text(
        "profiles:\n"
        "  quick:\n    max_epochs: 1\n    gates:\n      min_f1_margin: 0.0\n"
        "  cpu:\n    max_epochs: 3\n"
        "  mine:\n    experiments: [fashion_cnn]\n    gates:\n      max_size_mb: 10\n"
    )
    cat = load_catalog(f)
    quick = gate_config(cat.profile("quick"))
    assert quick.min_f1_margin == 0.0 and quick.floors == {} and quick.max_latency_ms_per_1000 is None
    assert gate_config(cat.profile("cpu")) == GateConfig()  # a profile changed elsewhere keeps its gates
    mine = gate_config(cat.profile("mine"))  # a new profile: every gate, with its own size limit
    assert mine.max_size_mb == 10 and len(mine.floors) == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles:\n  cpu:\n    gates:\n      canary_floor: 2\n")
    with pytest.raises(ConfigError, match="profile 'cpu': gates: .*canary_floor: Input should be less"):
        load_catalog(bad)


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
