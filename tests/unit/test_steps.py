"""The step layer without an orchestrator: the promotion verdict decided once (and acted on as
decided), and the experiment plan that carries the resolved spec the train step trains."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from zalando.errors import ConfigError, DataError
from zalando.lake import Lake
from zalando.registry import decision_log, get_champion, promote, register_model
from zalando.settings import Settings
from zalando.steps.promotion import (
    NOTHING_NEW,
    PASSED_EVERY_GATE,
    apply_promotion,
    decide_promotion,
    promotion_verdicts,
)
from zalando.steps.training import Evaluation, PlannedExperiment, checkpoint_dir_for, plan_experiments

GROUPS = ("Upper part", "Bottom part", "One piece", "Footwear", "Bags")


def _metrics(f1: float) -> dict:
    return {
        "per_group": {g: {"recall": 0.999, "precision": 0.999, "npv": 0.999} for g in GROUPS},
        "macro_f1": f1,
        "latency_ms_per_1000": 300.0,
        "size_mb": 2.0,
        "canary_accuracy": 0.8,
        "dataset_version": "ds1",
    }


def _register(lake: Lake, version: str, f1: float) -> Evaluation:
    experiment = f"exp_{version}"
    register_model(
        lake,
        model_version=version,
        experiment=experiment,
        metrics=_metrics(f1),
        spec={"architecture": "cnn"},
        dataset_version="ds1",
        code_version="abc",
        bundle_key=f"models/{experiment}/{version}",
    )
    return Evaluation(
        experiment=experiment,
        model_version=version,
        dataset_version="ds1",
        run_id="r1",
        registered=False,
        metrics_uri=None,
        eval_key=None,
        gate_metrics=_metrics(f1),
        per_group_test=[],
        summary_test={},
        performance=[],
    )


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    lake = Lake.local(tmp_path / "lake")
    _register(lake, "v1", 0.90)
    promote(lake, "v1", reason="first", actor="test")
    return lake


QUICK = Settings(profile="quick", lake_uri="file:///unused")


def test_the_verdict_is_decided_once_and_acted_on_as_decided(lake: Lake) -> None:
    evals = [_register(lake, "v2", 0.95), _register(lake, "v3", 0.93), _register(lake, "v4", 0.85)]
    decision = decide_promotion(lake, QUICK, evals, "run1")
    assert (decision.champion_before, decision.champion_before_experiment) == ("v1", "exp_v1")
    assert (decision.winner, decision.winner_experiment) == ("v2", "exp_v2")
    assert [g.passed for g in decision.decisions] == [True, True, False]

    out = apply_promotion(lake, decision, actor="flow")
    by_version = {v.model_version: v for v in out.verdicts}
    assert [by_version[v].verdict for v in ("v2", "v3", "v4")] == ["promoted", "rejected", "rejected"]
    assert by_version["v2"].log_reason == PASSED_EVERY_GATE
    assert by_version["v3"].log_reason == "passed every gate, but v2 had the higher validation macro F1"
    assert by_version["v3"].gates_passed is True and by_version["v3"].reasons == []
    assert "does not beat the champion" in by_version["v4"].log_reason
    assert by_version["v4"].reasons == decision.decisions[2].decision.reasons != []
    assert (out.champion_before, out.champion, out.promoted) == ("v1", "v2", "v2")
    assert get_champion(lake)["model_version"] == "v2"

    # the registry's log records exactly the verdicts' actions and reasons, in order
    log = decision_log(lake).iloc[1:]
    assert log["model_version"].tolist() == ["v2", "v3", "v4"]
    assert log["action"].tolist() == ["promote", "reject", "reject"]
    assert log["reason"].tolist() == [by_version[v].log_reason for v in ("v2", "v3", "v4")]

    # the same models again (a cached training run): nothing to gate, the champion is kept, nothing logged
    again = decide_promotion(lake, QUICK, evals, "run2")
    assert again.decisions == [] and again.winner is None
    kept = apply_promotion(lake, again, actor="flow")
    (row,) = kept.verdicts
    assert (row.verdict, row.model_version, row.experiment) == ("kept (no new model)", "v2", "exp_v2")
    assert row.reasons == [NOTHING_NEW] and row.log_reason is None and row.gates_passed is None
    assert kept.promoted is None and len(decision_log(lake)) == 4


def test_a_refused_winner_is_rejected_with_the_approvers_comment(lake: Lake) -> None:
    decision = decide_promotion(lake, QUICK, [_register(lake, "v2", 0.95)], "run1")
    (verdict,) = promotion_verdicts(decision, approved=False, comment="not tonight")
    assert verdict.verdict == "refused by approver" and verdict.log_reason == "approval refused: not tonight"
    assert promotion_verdicts(decision, approved=False)[0].log_reason == "approval refused"

    out = apply_promotion(lake, decision, actor="human", approved=False, comment="not tonight")
    assert out.promoted is None and out.champion == "v1" == get_champion(lake)["model_version"]
    last = decision_log(lake).iloc[-1]
    assert (last["action"], last["reason"], last["actor"]) == (
        "reject",
        "approval refused: not tonight",
        "human",
    )


def test_no_candidate_is_an_error(lake: Lake) -> None:
    with pytest.raises(DataError, match="no trained model"):
        decide_promotion(lake, QUICK, [], "run1")


def test_the_plan_carries_the_resolved_spec_and_its_digest(tmp_path: Path) -> None:
    settings = Settings(profile="quick", lake_uri="file:///unused", work_dir=tmp_path)
    (planned,) = plan_experiments(settings, ["fashion_cnn", "fashion_cnn"])  # named twice, planned once
    assert planned.spec.profile == "quick" and planned.spec.epochs == 1  # the quick profile's cap
    assert planned.profile.name == "quick" and planned.profile.max_train_images == 256
    # the digest is the same fingerprint as before the step layer: old checkpoints and caches still match
    assert planned.spec_digest == hashlib.sha256(planned.spec.model_dump_json().encode()).hexdigest()[:16]
    assert checkpoint_dir_for(settings, planned, "ds-1") == (
        tmp_path / "checkpoints" / "fashion_cnn" / f"ds-1-{planned.spec_digest}-{settings.seed}"
    )
    # a task input/result: JSON and back gives the same spec (and digest)
    again = PlannedExperiment.model_validate_json(planned.model_dump_json())
    assert again == planned and again.spec_digest == planned.spec_digest
    default = plan_experiments(settings)
    assert [p.experiment for p in default] == list(default[0].profile.experiments)
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        plan_experiments(settings, ["nope"])


def test_another_spec_gets_another_digest(tmp_path: Path) -> None:
    """The plan holds the spec it read: editing the experiments file later changes only a new plan."""
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text("experiments:\n  - name: wide_cnn\n    extends: fashion_cnn\n    lr: 0.01\n")
    settings = Settings(profile="quick", lake_uri="file:///unused", experiments_file=experiments)
    (planned,) = plan_experiments(settings, ["wide_cnn"])
    experiments.write_text("experiments:\n  - name: wide_cnn\n    extends: fashion_cnn\n    lr: 0.02\n")
    assert planned.spec.lr == 0.01
    assert plan_experiments(settings, ["wide_cnn"])[0].spec_digest != planned.spec_digest
