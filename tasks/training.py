"""Training tasks: plan the experiments, train one, evaluate one, decide, promote, report.

Each task calls one step of :mod:`zalando.steps.training`, :mod:`zalando.steps.promotion` or
:mod:`zalando.steps.reporting` and publishes what people look at in the UI: the per-group metric
table of every model, the champion decision, links to the lake's report.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.common import RunConfig, cache_on, io_task_options
from zalando.steps import promotion, reporting, training
from zalando.steps.promotion import PromotionDecision, PromotionOutcome
from zalando.steps.training import Evaluation, PlannedExperiment, TrainedModel


def _artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")


@task(name="plan-experiments", cache_policy=NO_CACHE)
def plan_experiments(cfg: RunConfig, experiments: list[str] | None = None) -> list[PlannedExperiment]:
    """The experiments to train, each resolved for the profile (the spec the train task trains).

    ``experiments`` picks a subset (any known experiment, in or out of the profile); unknown names
    fail with the list of valid ones.
    """
    plan = training.plan_experiments(cfg.settings(), experiments)
    get_run_logger().info("profile %s trains %s", cfg.profile, ", ".join(p.experiment for p in plan))
    return plan


@task(
    name="train",
    task_run_name="train-{planned.experiment}",
    cache_policy=cache_on(
        "planned.experiment", "planned.spec_digest", "dataset_version", "cfg.seed", "cfg.lake_uri"
    ),
    **io_task_options(),
)
def train_model(cfg: RunConfig, planned: PlannedExperiment, dataset_version: str) -> TrainedModel:
    """Train one planned experiment; its bundle, model card and drift reference go to the lake.

    Cached on the resolved spec, the dataset version and the seed: an unchanged night retrains nothing.
    A retry (or a re-run after a crash) resumes from the last epoch checkpoint in the work folder.
    On a Dask worker (the training flow's `dask` runner) torch uses the worker's threads
    (`dask worker --nthreads K`); the result records where it trained (``trained_on``).
    """
    settings, trained_on = cfg.settings(), "local"
    worker = _dask_worker()
    if worker is not None:  # one experiment per worker: torch gets the worker's threads
        settings = settings.model_copy(update={"torch_threads": worker.state.nthreads})
        trained_on = worker.address
    out = training.train_model(cfg.lake(), settings, planned, dataset_version, cfg.run_id)
    get_run_logger().info(
        "%s -> model %s (%d epoch(s), %.1fs, T=%.3f) on %s with %s torch thread(s)",
        out.experiment,
        out.model_version,
        out.epochs_run,
        out.wall_s,
        out.temperature,
        trained_on,
        settings.torch_threads or "all",
    )
    return out.model_copy(update={"trained_on": trained_on})


def _dask_worker() -> Any | None:
    """The Dask worker running this task, or None on the flow's own thread pool.

    Only a process that imported distributed can be a Dask worker, so the local path never
    imports it.
    """
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker()
    except ValueError:  # distributed is loaded (a local cluster, the client) but this is no worker
        return None


@task(
    name="evaluate",
    task_run_name="evaluate-{trained.experiment}",
    cache_policy=cache_on("trained.model_version", "cfg.lake_uri"),
    **io_task_options(),
)
def evaluate_model(cfg: RunConfig, trained: TrainedModel) -> Evaluation:
    """Metrics, performance, energy and canary accuracy of one model; registered in the registry."""
    out = training.evaluate_model(
        cfg.lake(),
        cfg.settings(),
        trained.experiment,
        trained.model_version,
        cfg.run_id,
        train_energy=trained.train_energy,
    )
    s = out.summary_test
    create_table_artifact(
        key=_artifact_key("per-group", out.experiment),
        table=[row.model_dump() for row in out.per_group_test],
        description=(
            f"Per-group metrics of `{out.experiment}` ({out.model_version}) on the test split: "
            f"accuracy {s['accuracy']:.4f}, macro F1 {s['macro_f1']:.4f}. Lake: {out.metrics_uri}"
        ),
    )
    get_run_logger().info(
        "%s: test accuracy %.4f, macro F1 %.4f", out.experiment, s["accuracy"], s["macro_f1"]
    )
    return out


@task(name="decide-champion", cache_policy=NO_CACHE, **io_task_options())
def decide_champion(
    cfg: RunConfig, evaluations: list[Evaluation], gates: dict[str, Any] | None = None
) -> PromotionDecision:
    """Gate every new model against the champion on the same validation data; pick the winner."""
    decision = promotion.decide_promotion(cfg.lake(), cfg.settings(), evaluations, cfg.run_id, gates=gates)
    log = get_run_logger()
    if not decision.decisions:
        log.info("no new model to decide on (cached training): champion %s stays", decision.champion_before)
    for d in decision.decisions:
        log.info("%s (%s): %s", d.experiment, d.model_version, "passes" if d.passed else "fails")
    return decision


# Not retried: the decision log is append-only, so a blind retry could log a decision twice. A
# failed promotion fails the run; the next run decides again.
@task(name="promote", cache_policy=NO_CACHE)
def promote_champion(
    cfg: RunConfig, decision: PromotionDecision, approved: bool, comment: str, actor: str
) -> PromotionOutcome:
    """Record the decisions in the registry log and move the champion pointer; publish the verdicts."""
    out = promotion.apply_promotion(cfg.lake(), decision, actor=actor, approved=approved, comment=comment)
    create_table_artifact(
        key="champion-decision",
        table=[
            {
                "experiment": v.experiment,
                "model_version": v.model_version,
                "val_macro_f1": v.val_macro_f1,
                "gates_passed": v.gates_passed,
                "decision": v.verdict,
                "reasons": "; ".join(v.reasons) or "-",
            }
            for v in out.verdicts
        ],
        description=(
            f"Champion before: `{out.champion_before}`; after: `{out.champion}`. "
            f"Actor: {actor}{' (' + comment + ')' if comment else ''}."
        ),
    )
    details = "\n\n".join(f"### {d.experiment}\n\n{d.decision.to_markdown()}" for d in decision.decisions)
    create_markdown_artifact(
        key="gate-checks",
        markdown=f"# Quality gates, run `{cfg.run_id}`\n\n{details or 'No new model to gate.'}\n",
        description="Every number compared by the quality gates",
    )
    get_run_logger().info("champion: %s (was %s)", out.champion, out.champion_before)
    return out


@task(name="publish-report", cache_policy=NO_CACHE, **io_task_options())
def publish_report(cfg: RunConfig, evaluations: list[Evaluation], champion: str | None) -> str:
    """The run's Markdown + PNG report in the lake, and its tables and links as artifacts; returns
    the report's URI."""
    out = reporting.write_run_report(cfg.lake(), cfg.run_id, evaluations, champion)
    create_table_artifact(
        key="run-per-group",
        table=out.tables["per_group"],
        description=f"Per group x experiment on the test split, with the study's best model as reference (run {cfg.run_id})",
    )
    links = "\n".join(f"- [{name}]({uri})" for name, uri in out.files.items())
    create_markdown_artifact(
        key="run-report",
        markdown=(
            f"# Run `{cfg.run_id}` (profile {cfg.profile})\n\n"
            f"Champion after this run: **`{champion}`**\n\n"
            f"Report in the lake: [{out.report_uri}]({out.report_uri})\n\n"
            f"Files:\n\n{links}\n\n"
            "Metric tables: " + ", ".join(f"`{e.metrics_uri}`" for e in evaluations if e.metrics_uri) + "\n"
        ),
        description="Links to this run's report, figures and metric tables in the lake",
    )
    return out.report_uri
