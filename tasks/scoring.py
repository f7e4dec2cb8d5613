"""Batch-scoring tasks: plan a batch into shard references, score one shard, commit the batch,
measure its drift (and raise the alarm that retrains). Each calls one step of
:mod:`zalando.steps.scoring` or :mod:`zalando.steps.monitoring`.

Exactly-once lives in the library (deterministic shard files and markers, the batch made visible
in one Iceberg commit), so these tasks are never cached: a retry or a re-run scores only what is
missing.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks.common import RunConfig, io_task_options
from zalando.steps import monitoring, scoring
from zalando.steps.monitoring import DriftResult
from zalando.steps.scoring import CommittedBatch

if TYPE_CHECKING:  # annotations only: the scoring library's own types
    from zalando.scoring.batch import ShardRef
    from zalando.scoring.run import BatchPlan
    from zalando.scoring.shadow import ShadowResult
    from zalando.scoring.shard import ScoringOptions, ShardResult


@task(name="plan-batch", cache_policy=NO_CACHE, **io_task_options())
def plan_batch(
    cfg: RunConfig,
    location: str | None,
    model_version: str | None,
    batch_date: date | None,
    shard_size: int,
    force: bool,
    runtime: str = "auto",
    allow_empty: bool = False,
) -> BatchPlan:
    """Pin the model version (the champion unless given), list the batch's inputs, cut shards,
    and check the model once (``auto``: measuring which runtime the shards should use)."""
    plan = scoring.plan_batch(
        cfg.catalog(),
        location,
        model_version=model_version,
        batch_date=batch_date,
        shard_size=shard_size,
        force=force,
        runtime=runtime,
        allow_empty=allow_empty,
    )
    get_run_logger().info(
        "batch %s with model %s: %s",
        plan.batch_id,
        plan.model_version,
        "already committed, skipped" if plan.committed else f"{len(plan.shards)} shard(s)",
    )
    return plan


@task(name="score-shard", cache_policy=NO_CACHE, **io_task_options())
def score_shard(
    cfg: RunConfig, shard: ShardRef, model_version: str, options: ScoringOptions, runtime: str = "onnx"
) -> ShardResult:
    """Score one shard (skipped when an earlier attempt committed it) with the planned runtime."""
    result = scoring.score_shard(cfg.settings(), shard, model_version, options, runtime)
    get_run_logger().info(
        "shard %d/%d: %d scored, %d quarantined%s in %.2fs (%s)",
        shard.shard_id + 1,
        shard.num_shards,
        result.scored,
        result.quarantined,
        " (already committed)" if result.skipped else "",
        result.seconds,
        result.runtime or "-",
    )
    return result


@task(name="finalize-batch", cache_policy=NO_CACHE, **io_task_options())
def commit_batch(
    cfg: RunConfig, plan: BatchPlan, options: ScoringOptions, results: list[ShardResult] | None
) -> CommittedBatch:
    """Reconcile the shards and commit the batch (one Iceberg commit); publish the batch summary artifact."""
    summary = scoring.commit_batch(cfg.catalog(), plan, options, results)
    _batch_artifacts(summary)
    return summary


def _batch_artifacts(s: CommittedBatch) -> None:
    rows = [{"group": g, "predicted": n} for g, n in s.group_counts.items()]
    create_table_artifact(
        key="batch-group-counts",
        table=rows,
        description=f"Predicted group counts of batch {s.batch_id} (model {s.model_version})",
    )
    reasons = ", ".join(f"{k}: {v}" for k, v in s.reasons.items()) or "none"
    create_markdown_artifact(
        key="batch-summary",
        markdown=(
            f"# Batch {s.batch_id}\n\n"
            f"| | |\n|---|---|\n"
            f"| model version | `{s.model_version}` |\n"
            f"| records | {s.records} |\n| scored | {s.scored} |\n"
            f"| quarantined | {s.quarantined} ({reasons}) |\n"
            f"| low confidence (needs review) | {s.low_confidence} |\n"
            f"| shards | {s.shards} ({s.shards_skipped} already committed) |\n"
            f"| skipped (batch already committed) | {s.skipped} |\n\n"
            f"Predictions: `{s.predictions_table}` where `batch_id = '{s.batch_id}'` "
            f"(snapshot {s.snapshot_id}, {s.data_files} data files; metadata `{s.predictions_uri}`)\n"
        ),
        description=f"Batch {s.batch_id} scored with {s.model_version}",
    )


@task(name="shadow-score", cache_policy=NO_CACHE, **io_task_options())
def shadow_score(
    cfg: RunConfig,
    plan: BatchPlan,
    location: str | None,
    options: ScoringOptions,
    shard_size: int,
    runtime: str = "auto",
    force: bool = False,
) -> ShadowResult:
    """Score the committed batch with the challenger beside the champion; publish the agreement artifact."""
    from zalando.scoring.shadow import agreement_markdown

    out = scoring.shadow_batch(
        cfg.catalog(), plan, location, options, shard_size=shard_size, runtime=runtime, force=force
    )
    log = get_run_logger()  # one line whatever happened (the library's own line stays in its logger)
    if out.status == "no_challenger":
        log.info("shadow scoring of batch %s asked for, but there is no challenger", out.batch_id)
    elif out.status == "failed":
        log.warning(
            "shadow scoring of batch %s with %s failed (its predictions are committed): %s",
            out.batch_id, out.challenger_version, out.error,
        )  # fmt: skip
    else:
        log.info(
            "batch %s shadowed by %s (%s): agreement %s",
            out.batch_id, out.challenger_version, out.status, out.agreement,
        )  # fmt: skip
    if out.status != "no_challenger":
        create_markdown_artifact(
            key="shadow-agreement",
            markdown=agreement_markdown(out),
            description=f"Shadow scoring of batch {out.batch_id}: {out.challenger_version} beside "
            f"{out.champion_version} ({out.status})",
        )
    return out


DRIFT_EVENT = "zalando.drift.alarm"


@task(name="monitor-drift", cache_policy=NO_CACHE, **io_task_options())
def monitor_drift(cfg: RunConfig, plan: BatchPlan, options: ScoringOptions) -> DriftResult:
    """Label-free drift of the scored batch; on an alarm, emit the event that triggers `retrain`."""
    log = get_run_logger()
    out = monitoring.monitor_batch(cfg.catalog(), plan, cfg.run_id, image_prep=options.image_prep)
    if out.skipped:
        log.info("batch %s already committed: drift was measured when it was scored", plan.batch_id)
        return out
    create_table_artifact(
        key="drift",
        table=[
            {k: r.get(k) for k in ("statistic", "value", "threshold", "p_value", "alarm")} for r in out.table
        ],
        description=(
            f"Drift of batch {plan.batch_id} against the reference of model {plan.model_version} "
            f"({out.rows} sampled rows): {'ALARM: ' + ', '.join(out.alarms) if out.alarm else 'no alarm'}. "
            f"Lake: {out.uri}"
        ),
    )
    if out.alarm:
        emit_event(
            event=DRIFT_EVENT,
            resource={
                "prefect.resource.id": f"zalando.batch.{plan.batch_id}",
                "prefect.resource.name": plan.batch_id,
            },
            related=[
                {
                    "prefect.resource.id": f"zalando.model.{plan.model_version}",
                    "prefect.resource.role": "model",
                }
            ],
            payload={
                "profile": cfg.profile,
                "batch_id": plan.batch_id,
                "model_version": plan.model_version,
                "statistics": out.alarms,
                "monitoring_uri": out.uri,
            },
        )
        log.warning(
            "drift alarm on batch %s (%s): event %s emitted",
            plan.batch_id,
            ", ".join(out.alarms),
            DRIFT_EVENT,
        )
    return out
