"""The `feedback` flow (issue 15): the labelled KPIs of every batch with new reviewers' labels.

Deployed as `feedback/kpis` (every day at 06:00 UTC, after the nightly, and by hand), and run by
`zalando labels import` when a Prefect API is set. A group's true positives on the reviewed items
below its threshold emit `zalando.kpi.alarm`, and the automation in prefect.yaml runs `retrain`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks.common import RunConfig
from tasks.feedback import find_batches_with_new_feedback, measure_kpis
from tasks.lake import prepare_lake
from zalando.lake import new_run_id
from zalando.s3server import embedded_s3
from zalando.settings import Profile, load_settings


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"labelled-kpis-{flow_run.parameters.get('batch_id') or 'new-feedback'}"


@flow(name="feedback", flow_run_name=_run_name)
def labelled_kpis(
    batch_id: str | None = None,
    model_version: str | None = None,
    thresholds: dict[str, Any] | None = None,
    profile: Profile | None = None,
) -> dict[str, Any]:
    """Measure per-group recall, precision and true positives on the reviewed items of batches.

    Args:
        batch_id: this batch (default: every batch whose feedback changed since it was measured).
        model_version: the model whose predictions were reviewed (default: the newest the feedback names).
        thresholds: zalando.kpis.KpiThresholds fields changing the `kpi_thresholds` setting for this
            run, e.g. {"min_tp": {"Footwear": 30}}.
        profile: the profile passed on with the alarm (the `retrain` it starts trains this profile).
    """
    log = get_run_logger()
    settings = load_settings(profile=profile)
    cfg = RunConfig.from_settings(settings, run_id=new_run_id())
    with embedded_s3(settings):
        prepare_lake(cfg)
        batches = [batch_id] if batch_id else find_batches_with_new_feedback(cfg)
        results = [measure_kpis(cfg, b, model_version, thresholds) for b in batches]
    alarms = {r.batch_id: r.alarm_groups for r in results if r.alarm}
    log.info("labelled KPIs of %d batch(es); alarms: %s", len(results), alarms or "none")
    return {
        "run_id": cfg.run_id,
        "batches": {r.batch_id: r.model_dump(mode="json") for r in results},  # groups: the CLI prints them
        "alarms": alarms,
    }
