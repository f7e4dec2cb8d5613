"""Feedback tasks (issue 15): find the batches with new reviewers' labels, measure their labelled KPIs
(an alarm emits `zalando.kpi.alarm`, and the automation in prefect.yaml retrains), and extend a
dataset version with every accepted feedback label. Each calls one step of :mod:`zalando.steps.feedback`.

Never cached: they are cheap (small feedback tables), and what they read changes whenever a
reviewer decides, which no task input shows.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks.common import RunConfig, io_task_options
from zalando.data.feedback_data import FeedbackDataConfig
from zalando.data.split import DatasetVersion
from zalando.kpis import reviewed_thresholds
from zalando.steps import feedback
from zalando.steps.feedback import KpiResult

KPI_EVENT = "zalando.kpi.alarm"
KPI_ARTIFACT_COLUMNS = ("group_name", "support", "predicted", "tp", "min_tp", "recall", "precision", "alarm")


@task(name="find-new-feedback", cache_policy=NO_CACHE, **io_task_options())
def find_batches_with_new_feedback(cfg: RunConfig) -> list[str]:
    """Batches whose feedback changed since their KPIs were measured (or whose alarm was never sent)."""
    return feedback.batches_with_new_feedback(cfg.lake())


@task(
    name="labelled-kpis", task_run_name="labelled-kpis-{batch_id}", cache_policy=NO_CACHE, **io_task_options()
)
def measure_kpis(
    cfg: RunConfig, batch_id: str, model_version: str | None = None, thresholds: dict[str, Any] | None = None
) -> KpiResult:
    """Per-group KPIs of the batch's reviewed items, in the lake and as an artifact; an alarm emits
    the event that triggers `retrain`. Thresholds: the ``kpi_thresholds`` setting, then ``thresholds``."""
    log = get_run_logger()
    th = reviewed_thresholds(cfg.settings().kpi_thresholds, thresholds)
    out = feedback.measure_labelled_kpis(
        cfg.lake(), batch_id, model_version, th, run_id=cfg.run_id, emits_alarm=True
    )
    if out.skipped:
        log.info("batch %s: %s; no KPIs", batch_id, out.skipped)
        return out
    create_table_artifact(
        key="labelled-kpis",
        table=[{k: getattr(g, k) for k in KPI_ARTIFACT_COLUMNS} for g in out.groups],
        description=(
            f"Labelled KPIs of batch {batch_id} (model {out.model_version}) on {out.reviewed} reviewed "
            f"items ({out.unusable} unusable left out). Reviewed items lean towards doubtful ones: recall "
            f"and precision here are biased low, not the batch's accuracy. "
            f"{'ALARM: ' + ', '.join(out.alarm_groups) if out.alarm else 'No alarm'}. Lake: {out.uri}"
        ),
    )
    if out.alarm:
        emit_event(
            event=KPI_EVENT,
            resource={"prefect.resource.id": f"zalando.batch.{batch_id}", "prefect.resource.name": batch_id},
            related=[
                {
                    "prefect.resource.id": f"zalando.model.{out.model_version}",
                    "prefect.resource.role": "model",
                }
            ],
            payload={
                "profile": cfg.profile,
                "batch_id": batch_id,
                "model_version": out.model_version,
                "groups": out.alarm_groups,
                "reasons": {g.group_name: g.reason for g in out.groups if g.alarm},
                "reviewed": out.reviewed,
                "kpis_uri": out.uri,
            },
        )
        log.warning(
            "KPI alarm on batch %s (%s): event %s emitted", batch_id, ", ".join(out.alarm_groups), KPI_EVENT
        )
    return out


@task(name="add-feedback-labels", cache_policy=NO_CACHE, **io_task_options())
def add_feedback_labels(cfg: RunConfig, dataset: DatasetVersion) -> DatasetVersion:
    """The dataset version plus every accepted feedback label (a new version), or as it is without any."""
    settings = cfg.settings()
    config = FeedbackDataConfig(weight=settings.feedback_weight, holdout=settings.feedback_holdout)
    out = feedback.add_feedback_labels(cfg.lake(), dataset, config, run_id=cfg.run_id)
    if out.items:
        get_run_logger().info(
            "dataset version %s = %s + %d feedback images (%d to train on, weight %g; %d held out)",
            out.dataset.dataset_version, out.base_dataset_version, out.items, out.train_items,
            config.weight, out.holdout_items,
        )  # fmt: skip
    return out.dataset
