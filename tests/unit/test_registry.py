"""Registry: registration, champion pointer, append-only decision log, promote and rollback."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from zalando.drift import reference_profile
from zalando.errors import ModelError, ZalandoError
from zalando.gates import evaluate_gates, select_canary_set
from zalando.lake import Lake
from zalando.lake import commit as lc
from zalando.lake.keys import CHAMPION_KEY
from zalando.registry import (
    DECISIONS_TABLE,
    NoChampionError,
    RegistryError,
    UnknownModelError,
    apply_gate_decision,
    champion_history,
    decision_log,
    get_champion,
    get_model,
    has_canary_set,
    list_models,
    load_canary_set,
    load_reference,
    promote,
    register_model,
    reject,
    require_champion,
    rollback,
    save_canary_set,
    save_reference,
)


def _metrics(f1: float) -> dict:
    groups = ("Upper part", "Bottom part", "One piece", "Footwear", "Bags")
    return {
        "per_group": {g: {"recall": 0.999, "precision": 0.999, "npv": 0.999} for g in groups},
        "macro_f1": f1,
        "latency_ms_per_1000": 300.0,
        "size_mb": 2.0,
        "canary_accuracy": 0.8,
        "dataset_version": "ds1",
    }


def _register(lake: Lake, version: str, f1: float = 0.9, experiment: str = "cnn_small") -> dict:
    return register_model(
        lake,
        model_version=version,
        experiment=experiment,
        metrics=_metrics(f1),
        spec={"architecture": "cnn", "input_size": 28},
        dataset_version="ds1",
        code_version="abc123",
        bundle_key=f"models/{experiment}/{version}",
    )


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake.local(tmp_path / "lake")


def test_register_and_list(lake: Lake) -> None:
    _register(lake, "v1", 0.90)
    _register(lake, "v2", 0.95, experiment="resnet18_full")
    df = list_models(lake)
    assert list(df["model_version"]) == ["v1", "v2"]
    assert list(df["experiment"]) == ["cnn_small", "resnet18_full"]
    assert df["metrics.macro_f1"].tolist() == [0.90, 0.95]
    assert "metrics.per_group.One piece.recall" in df.columns
    assert not df["is_champion"].any()
    assert get_model(lake, "v2")["spec"]["architecture"] == "cnn"
    # re-registering replaces, never duplicates
    _register(lake, "v1", 0.91)
    df = list_models(lake)
    assert len(df) == 2 and df.loc[df.model_version == "v1", "metrics.macro_f1"].item() == 0.91


def test_empty_registry(lake: Lake) -> None:
    assert get_champion(lake) is None
    assert list_models(lake).empty
    assert decision_log(lake).empty
    with pytest.raises(NoChampionError, match="zalando train"):
        require_champion(lake)
    _register(lake, "v1")
    with pytest.raises(NoChampionError, match=r"zalando promote VERSION"):
        require_champion(lake)


def test_promote_unknown_version_names_valid_ones(lake: Lake) -> None:
    _register(lake, "v1")
    _register(lake, "v2")
    with pytest.raises(UnknownModelError, match=r"'v9' is not registered; registered versions: v1, v2") as e:
        promote(lake, "v9", reason="manual", actor="alice")
    assert isinstance(e.value, ZalandoError) and isinstance(e.value, ModelError)
    assert get_champion(lake) is None
    assert decision_log(lake).empty


def test_bad_inputs_are_refused(lake: Lake) -> None:
    with pytest.raises(RegistryError, match="model version '../x'"):
        _register(lake, "../x")
    _register(lake, "v1")
    with pytest.raises(RegistryError, match="reason must be a non-empty string"):
        promote(lake, "v1", reason="", actor="alice")
    with pytest.raises(RegistryError, match="actor must be"):
        promote(lake, "v1", reason="why", actor="")


def test_promote_and_rollback_change_pointer_and_log(lake: Lake) -> None:
    for v in ("v1", "v2", "v3"):
        _register(lake, v)
    p1 = promote(lake, "v1", reason="first model", actor="flow:training")
    assert p1["model_version"] == "v1" and p1["bundle_key"] == "models/cnn_small/v1"
    promote(lake, "v2", reason="better", actor="flow:training", decision={"promote": True, "rows": []})
    promote(lake, "v3", reason="manual", actor="alice")
    assert get_champion(lake)["model_version"] == "v3"
    assert list_models(lake).set_index("model_version")["is_champion"].to_dict() == {
        "v1": False,
        "v2": False,
        "v3": True,
    }

    back = rollback(lake, actor="bob", reason="v3 misbehaves")
    assert back["model_version"] == "v2" and back["reason"] == "v3 misbehaves"
    assert get_champion(lake)["model_version"] == "v2"
    back = rollback(lake, actor="bob", reason="v2 too")  # twice goes two back, not ping-pong
    assert back["model_version"] == "v1"
    with pytest.raises(RegistryError, match="first champion"):
        rollback(lake, actor="bob", reason="again")

    log = decision_log(lake)
    assert log["action"].tolist() == ["promote", "promote", "promote", "rollback", "rollback"]
    assert log["model_version"].tolist() == ["v1", "v2", "v3", "v2", "v1"]
    assert pd.isna(log["previous_champion"].iloc[0])  # the first champion had no predecessor
    assert log["previous_champion"].tolist()[1:] == ["v1", "v2", "v3", "v2"]
    assert log["actor"].tolist()[-1] == "bob"
    assert json.loads(log["decision"][1]) == {"promote": True, "rows": []}
    assert log["decision_id"].is_monotonic_increasing and log["decision_id"].is_unique
    # append-only: one append commit per decision, none rewritten (no delete or overwrite)
    history = lc.snapshot_log(lake.catalog(), DECISIONS_TABLE)
    assert [h["operation"] for h in history] == ["append"] * 5
    assert [h["added_rows"] for h in history] == [1] * 5 and not any(h["deleted_rows"] for h in history)
    assert champion_history(lake) == ["v1"]
    assert get_champion(lake)["decision_id"] == log["decision_id"].iloc[-1]


def test_promote_current_champion_is_a_noop(lake: Lake) -> None:
    _register(lake, "v1")
    promote(lake, "v1", reason="first", actor="a")
    before = lake.read_bytes(CHAMPION_KEY)
    promote(lake, "v1", reason="again", actor="a")
    assert lake.read_bytes(CHAMPION_KEY) == before
    assert len(decision_log(lake)) == 1


def test_apply_gate_decision_promotes_or_rejects(lake: Lake) -> None:
    _register(lake, "v1", 0.90)
    _register(lake, "v2", 0.95)
    _register(lake, "v3", 0.95)
    champion = None
    out = apply_gate_decision(lake, "v1", evaluate_gates(_metrics(0.90), champion), actor="flow")
    assert out["promoted"] and get_champion(lake)["model_version"] == "v1"
    d2 = evaluate_gates(_metrics(0.95), get_model(lake, "v1")["metrics"])
    assert apply_gate_decision(lake, "v2", d2, actor="flow")["promoted"]
    d3 = evaluate_gates(_metrics(0.95), get_model(lake, "v2")["metrics"])  # a tie: rejected
    out = apply_gate_decision(lake, "v3", d3, actor="flow")
    assert not out["promoted"] and out["champion"]["model_version"] == "v2"
    log = decision_log(lake)
    assert log["action"].tolist() == ["promote", "promote", "reject"]
    assert "does not beat the champion" in log["reason"].iloc[-1]
    rows = json.loads(log["decision"].iloc[-1])["rows"]
    assert any(r["check"] == "macro_f1_vs_champion" and not r["passed"] for r in rows)
    # a rejection never moves the pointer, and rollback ignores it
    assert champion_history(lake) == ["v1", "v2"]
    assert rollback(lake, actor="a", reason="r")["model_version"] == "v1"


def test_reject_keeps_champion(lake: Lake) -> None:
    _register(lake, "v1")
    _register(lake, "v2")
    promote(lake, "v1", reason="first", actor="a")
    rec = reject(lake, "v2", reason="failed canary", actor="flow", decision={"promote": False})
    assert rec["champion_after"] == "v1" and get_champion(lake)["model_version"] == "v1"


def test_canary_set_is_chosen_once(lake: Lake) -> None:
    images = np.zeros((6, 28, 28), np.uint8)
    images[:, 5:20, 8:20] = np.arange(6, dtype=np.uint8)[:, None, None] * 40
    labels = np.array([0, 3, 2, 3, 4, 6])
    first = select_canary_set(images, labels, None, n=4)
    with pytest.raises(RegistryError, match="no canary set"):
        load_canary_set(lake)
    assert not has_canary_set(lake)
    save_canary_set(lake, first, run_id="r1")
    other = select_canary_set(images, labels, None, n=2)
    save_canary_set(lake, other, run_id="r2")  # kept: the first one stays
    assert load_canary_set(lake).equals(first)
    save_canary_set(lake, other, run_id="r3", force=True)
    assert load_canary_set(lake).num_rows == 2


def test_reference_round_trip(lake: Lake) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(5), 40)
    ref = reference_profile(images, probs, rng.normal(size=(40, 8)), np.array([4, 1, 1, 3, 1]), 30, 0)
    key = save_reference(lake, "v1", ref, run_id="r1")
    assert key == "registry/references/model_version=v1" and lake.is_committed(key)
    back = load_reference(lake, "v1")
    np.testing.assert_array_equal(back["embedding_sample"], ref["embedding_sample"])
    assert back["mmd_bandwidth"] == ref["mmd_bandwidth"]
    with pytest.raises(RegistryError, match="no drift reference for model v2"):
        load_reference(lake, "v2")


def test_concurrent_decisions_are_all_kept(lake: Lake) -> None:
    _register(lake, "v1")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: reject(lake, "v1", reason=f"r{i}", actor=f"w{i}"), range(16)))
    log = decision_log(lake)
    assert sorted(log["reason"]) == sorted(f"r{i}" for i in range(16)) and log["decision_id"].is_unique


def test_a_decision_after_one_from_a_fast_clock_still_sorts_last(
    lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next id is made later than the newest logged one, which the log's current snapshot names
    (no data file of the log is read to find it)."""
    from datetime import UTC, datetime

    import zalando.registry as reg

    _register(lake, "v1")
    monkeypatch.setattr(reg, "_now", lambda: datetime(2099, 1, 1, tzinfo=UTC))
    future = reject(lake, "v1", reason="from a clock running ahead", actor="w1")
    monkeypatch.undo()
    scanned: list[str] = []
    real_scan = lc.scan
    monkeypatch.setattr(lc, "scan", lambda *a, **kw: scanned.append(a[1]) or real_scan(*a, **kw))
    later = reject(lake, "v1", reason="from a right clock", actor="w2")
    assert DECISIONS_TABLE not in scanned
    assert later["decision_id"] > future["decision_id"] and later["at"].startswith(
        "2099-01-01T00:00:00.000001"
    )
    assert decision_log(lake)["reason"].tolist() == ["from a clock running ahead", "from a right clock"]
