"""The `training` flow: ingest -> preprocess -> train every experiment -> evaluate -> promote.

Deployed as `training/retrain` (by hand, or by the drift alarm automation) and run inside `nightly`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.common import RunConfig
from tasks.data import ingest_source, make_dataset_version, verify_source, write_eda_report
from tasks.feedback import add_feedback_labels  # issue 15: feedback labels
from tasks.lake import prepare_lake
from tasks.training import (
    decide_champion,
    evaluate_model,
    plan_experiments,
    promote_champion,
    publish_report,
    train_model,
)
from zalando.errors import ModelError
from zalando.lake import new_run_id
from zalando.s3server import embedded_s3
from zalando.settings import Profile, load_settings
from zalando.steps.promotion import PromotionDecision
from zalando.steps.training import Evaluation, PlannedExperiment


class PromotionApproval(RunInput):
    """What the approver answers in the UI when a challenger passed every gate."""

    approve: bool = False
    comment: str = ""


@flow(
    name="training",
    # one task at a time: torch uses every core for one model; .map still shows the fan-out
    task_runner=ThreadPoolTaskRunner(max_workers=1),
    flow_run_name="training-{profile}",
)
def training(
    profile: Profile = "cpu",
    experiments: list[str] | None = None,
    data_source: str | None = None,
    seed: int | None = None,
    force: bool = False,
    reason: str = "manual",
    require_approval: bool = False,
    approval_timeout_s: int = 3600,
    gates: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and gate every experiment of a profile; promote the best challenger that passes.

    Args:
        profile: paper (the study, GPU), cpu (the nightly default) or quick (tests and demos).
        experiments: train only these experiments (default: every experiment of the profile).
        data_source: where the Fashion-MNIST IDX files come from (default: ZALANDO_DATA_SOURCE).
        seed: random seed for the split and training (default: ZALANDO_SEED).
        force: re-ingest, re-split and retrain even when the cache says nothing changed.
        reason: why this run happens (manual, schedule, drift alarm ...); recorded in the decision log.
        require_approval: pause before promoting a challenger that passed the gates, until someone
            approves (or refuses) it in the UI.
        approval_timeout_s: how long to wait for the approval; no answer means refused.
        gates: quality gate settings overriding the profile's (zalando.gates.GateConfig fields).
    """
    log = get_run_logger()
    settings = load_settings(profile=profile, data_source=data_source, seed=seed)
    cfg = RunConfig.from_settings(settings, run_id=new_run_id())
    log.info("training run %s (profile %s, reason: %s)", cfg.run_id, profile, reason)
    with embedded_s3(settings):
        prepare_lake(cfg)
        digest = verify_source(cfg)
        ingest_source.with_options(refresh_cache=force)(cfg, digest, force=force)
        dataset = make_dataset_version.with_options(refresh_cache=force)(cfg, digest, force=force)
        dataset = add_feedback_labels(cfg, dataset)  # issue 15: feedback labels (a new version when any)
        eda = write_eda_report(cfg, digest)
        plan = plan_experiments(cfg, experiments)
        trained = train_model.with_options(refresh_cache=force).map(
            unmapped(cfg), plan, unmapped(dataset.dataset_version)
        )
        evaluated = evaluate_model.with_options(refresh_cache=force).map(unmapped(cfg), trained)
        evaluations, failed = _collect(plan, trained, evaluated)
        decision = decide_champion(cfg, evaluations, gates)
        approved, comment, actor = True, "", f"prefect:{flow_run.get_name() or 'training'} ({reason})"
        if require_approval and decision.winner:
            approved, comment, actor = _ask_approval(decision, approval_timeout_s)
        promotion = promote_champion(cfg, decision, approved, comment, actor)
        report = publish_report(cfg, evaluations, promotion.champion)
    return {
        "run_id": cfg.run_id,
        "profile": profile,
        "source_digest": digest,
        "dataset_version": dataset.dataset_version,
        "eda": eda.uri,
        "models": {e.experiment: e.model_version for e in evaluations},
        "champion": promotion.champion,
        "promoted": promotion.promoted,
        "report": report,
        "failed": failed,
    }


def _collect(
    plan: list[PlannedExperiment], trained: Any, evaluated: Any
) -> tuple[list[Evaluation], dict[str, str]]:
    """Evaluations of the experiments that made it; one broken experiment does not lose the night.

    The failures are logged, published as an artifact and returned; when every experiment failed
    the run fails with each one's reason.
    """
    evaluations, failed = [], {}
    for p, t, e in zip(plan, trained, evaluated, strict=True):
        e.wait()
        if e.state.is_completed():
            evaluations.append(e.result())
        else:
            culprit = e.state if t.state.is_completed() else t.state
            failed[p.experiment] = culprit.message or culprit.name
    if failed:
        lines = "\n".join(f"| `{name}` | {msg} |" for name, msg in failed.items())
        create_markdown_artifact(
            key="failed-experiments",
            markdown=f"# Experiments that failed\n\n| experiment | reason |\n| --- | --- |\n{lines}\n",
            description=f"{len(failed)} of {len(plan)} experiments failed",
        )
        get_run_logger().error(
            "%d experiment(s) failed: %s", len(failed), "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    if not evaluations:
        raise ModelError("every experiment failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return evaluations, failed


def _ask_approval(decision: PromotionDecision, timeout_s: int) -> tuple[bool, str, str]:
    """Pause the run until someone answers in the UI; returns (approved, comment, actor)."""
    log = get_run_logger()
    winner = str(decision.winner)
    log.info("challenger %s passed every gate: waiting for approval in the UI", winner)
    description = (
        f"Promote **{winner}** ({decision.winner_experiment}) over "
        f"`{decision.champion_before}`? See the gate checks of this run."
    )
    try:
        answer = pause_flow_run(
            wait_for_input=PromotionApproval.with_initial_data(description=description),
            timeout=timeout_s,
            key="approve-" + "".join(c if c.isalnum() else "-" for c in winner.lower()),
        )
    except FlowPauseTimeout as exc:  # nobody answered
        log.warning("no approval for %s within %ss (%s): not promoted", winner, timeout_s, type(exc).__name__)
        return False, "no answer before the approval timeout", "approval-timeout"
    return answer.approve, answer.comment, "human approver (Prefect UI)"
