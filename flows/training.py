"""The `training` flow: ingest -> preprocess -> train every experiment -> evaluate -> promote.

Deployed as `training/retrain` (by hand, or by the drift alarm automation) and run inside `nightly`.
The experiments train in the `experiment-training` subflow, whose task runner is chosen per run:
Prefect's thread pool, one experiment at a time (`local`), or prefect-dask's DaskTaskRunner (`dask`:
the scheduler at `dask_address`, or a local cluster), one experiment per worker at a time. Workers
read the dataset version from the lake; they need the same ZALANDO_* settings as the flow.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.batch_scoring import Runner
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
from zalando.errors import ConfigError, ModelError
from zalando.lake import new_run_id
from zalando.s3server import embedded_s3
from zalando.settings import Profile, load_settings
from zalando.steps.promotion import PromotionDecision
from zalando.steps.training import Evaluation, PlannedExperiment, TrainedModel

# the Dask worker resource a training task holds: a worker offering 1 trains one experiment at a time
EXPERIMENT_RESOURCE = "experiment"


class PromotionApproval(RunInput):
    """What the approver answers in the UI when a challenger passed every gate."""

    approve: bool = False
    comment: str = ""


class TrainOutcome(BaseModel):
    """One experiment's training: the trained model, or why it failed."""

    experiment: str
    trained: TrainedModel | None = None
    error: str | None = None


# one task at a time: torch uses every core for one model; .map still shows the fan-out. (Not named
# train-…: the parent lists a subflow run as a task run of the flow's name, beside the train-… tasks.)
@flow(name="experiment-training", task_runner=ThreadPoolTaskRunner(max_workers=1))
def train_experiments(
    cfg: RunConfig, plan: list[PlannedExperiment], dataset_version: str, force: bool = False
) -> list[TrainOutcome]:
    """Train every planned experiment on this subflow's task runner; a failed one is reported, not raised.

    The inputs are references only (the run's config, the resolved specs, the dataset version):
    each task reads its data from the lake, wherever it runs.
    """
    futures = train_model.with_options(refresh_cache=force).map(
        unmapped(cfg), plan, unmapped(dataset_version)
    )
    futures.wait()
    return [
        TrainOutcome(experiment=p.experiment, trained=f.result())
        if f.state.is_completed()
        else TrainOutcome(experiment=p.experiment, error=f.state.message or f.state.name)
        for p, f in zip(plan, futures, strict=True)
    ]


@flow(
    name="training",
    # one task at a time: evaluation, like training, lets torch use every core for one model
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
    runner: Runner = "local",
    dask_address: str | None = None,
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
        runner: where the experiments train: `local` (one at a time on this process's thread
            pool) or `dask` (one per Dask worker offering the `experiment` resource, in parallel).
        dask_address: the Dask scheduler (runner `dask`), e.g. tcp://10.0.0.5:8786; default: a
            local cluster of one worker process per experiment (at most one per core).
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
        outcomes = _train_all(cfg, plan, dataset.dataset_version, force, runner, dask_address)
        trained = [o.trained for o in outcomes if o.trained is not None]
        evaluated = (
            evaluate_model.with_options(refresh_cache=force).map(unmapped(cfg), trained) if trained else []
        )
        evaluations, failed = _collect(outcomes, trained, evaluated)
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
        "trained_on": {t.experiment: t.trained_on for t in trained},
        "champion": promotion.champion,
        "promoted": promotion.promoted,
        "report": report,
        "failed": failed,
    }


def _train_all(
    cfg: RunConfig,
    plan: list[PlannedExperiment],
    dataset_version: str,
    force: bool,
    runner: Runner,
    dask_address: str | None,
) -> list[TrainOutcome]:
    """The `experiment-training` subflow on the chosen runner."""
    if runner == "local":
        return train_experiments(cfg, plan, dataset_version, force)
    import dask  # imported only when asked for: dask is heavy

    if dask_address:
        workers = _check_experiment_workers(dask_address)
        get_run_logger().info("training on the Dask cluster at %s: %s", dask_address, ", ".join(workers))
    task_runner = _experiment_runner(dask_address, len(plan))
    # every training task holds a worker's whole `experiment` resource: one experiment per worker
    with dask.annotate(resources={EXPERIMENT_RESOURCE: 1}):
        return train_experiments.with_options(task_runner=task_runner)(cfg, plan, dataset_version, force)


def _experiment_runner(dask_address: str | None, experiments: int, cores: int | None = None) -> Any:
    """The DaskTaskRunner of the experiments: the scheduler at ``dask_address``, or a local cluster of
    one worker process per experiment (at most one per core), the cores shared out as threads."""
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    cores = cores or os.cpu_count() or 1
    workers = max(1, min(experiments, cores))
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": max(1, cores // workers),
            "processes": True,
            "dashboard_address": None,
            "resources": {EXPERIMENT_RESOURCE: 1},
        }
    )


def _check_experiment_workers(address: str) -> list[str]:
    """The workers at ``address`` that train ("name (K threads)"); none is an error now, where the
    tasks would otherwise wait forever."""
    from distributed import Client

    try:
        with Client(address, timeout=30, set_as_default=False) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"]
    except OSError as exc:
        raise ConfigError(f"no Dask scheduler answers at {address}: {exc}", transient=True) from exc
    offering = [w for w in workers.values() if w.get("resources", {}).get(EXPERIMENT_RESOURCE, 0) >= 1]
    if not offering:
        raise ConfigError(
            f"none of the {len(workers)} Dask worker(s) at {address} offers the `{EXPERIMENT_RESOURCE}` "
            f"resource: start training workers with `dask worker {address} --nthreads K "
            f"--resources {EXPERIMENT_RESOURCE}=1` (and the ZALANDO_* settings of the lake)"
        )
    return sorted(f"{w.get('name')} ({w.get('nthreads')} threads)" for w in offering)


def _collect(
    outcomes: list[TrainOutcome], trained: list[TrainedModel], evaluated: Any
) -> tuple[list[Evaluation], dict[str, str]]:
    """Evaluations of the experiments that made it; one broken experiment does not lose the night.

    The failures (in training or in evaluation) are logged, published as an artifact and returned;
    when every experiment failed the run fails with each one's reason.
    """
    evaluations, reasons = [], {o.experiment: o.error for o in outcomes if o.trained is None}
    for t, e in zip(trained, evaluated, strict=True):
        e.wait()
        if e.state.is_completed():
            evaluations.append(e.result())
        else:
            reasons[t.experiment] = e.state.message or e.state.name
    failed = {o.experiment: str(reasons[o.experiment]) for o in outcomes if o.experiment in reasons}
    if failed:
        lines = "\n".join(f"| `{name}` | {msg} |" for name, msg in failed.items())
        create_markdown_artifact(
            key="failed-experiments",
            markdown=f"# Experiments that failed\n\n| experiment | reason |\n| --- | --- |\n{lines}\n",
            description=f"{len(failed)} of {len(outcomes)} experiments failed",
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
