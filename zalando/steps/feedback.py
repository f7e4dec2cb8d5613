"""Feedback steps (issue 15): the labelled KPIs of a reviewed batch, and the dataset version a
retrain learns from (the base split plus every accepted feedback label).

All their reads and writes of feedback, predictions, pixels, KPI tables and feedback rows go
through :class:`zalando.ui.store.LakeStore`, the one adapter over the lake for them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from zalando.data.feedback_data import FeedbackDataConfig
from zalando.data.split import DatasetVersion
from zalando.errors import DataError
from zalando.kpis import KpiThresholds
from zalando.lake import Lake

log = logging.getLogger(__name__)

KPI_SCHEMA = pa.schema(
    [
        ("batch_id", pa.string()),
        ("model_version", pa.string()),
        ("group", pa.int8()),
        ("group_name", pa.string()),
        ("support", pa.int32()),  # reviewed items whose label is this group
        ("predicted", pa.int32()),  # reviewed items the model put in this group
        ("tp", pa.int32()),
        ("fp", pa.int32()),
        ("fn", pa.int32()),
        ("recall", pa.float64()),  # NaN: no support
        ("precision", pa.float64()),  # NaN: never predicted
        ("recall_threshold", pa.float64()),
        ("precision_threshold", pa.float64()),
        ("min_tp", pa.int32()),
        ("alarm", pa.bool_()),
        ("reason", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------- results


class GroupKpi(BaseModel):
    """One group's numbers on the reviewed items of a batch (a row of the KPI table)."""

    group_name: str
    support: int
    predicted: int
    tp: int
    fp: int
    fn: int
    recall: float | None  # None: no reviewed item of this group
    precision: float | None  # None: the model put no reviewed item in this group
    min_tp: int | None
    alarm: bool
    reason: str


class KpiResult(BaseModel):
    """The labelled KPIs of one batch: which groups alarm, and where the table was committed."""

    batch_id: str
    model_version: str | None = None
    reviewed: int = 0  # decisions with a group (the ones measured)
    unusable: int = 0  # decisions "not a fashion article / unusable" (not measured)
    alarm: bool = False
    alarm_groups: list[str] = []
    alarm_sent: bool = False  # recorded: the caller emits the alarm event
    key: str | None = None
    uri: str | None = None
    skipped: str | None = None  # why nothing was measured
    groups: list[GroupKpi] = []


class FeedbackDataset(BaseModel):
    """The dataset version a retrain uses: the base one plus the accepted feedback labels (if any)."""

    dataset: DatasetVersion  # its dataset_version is the new id (the base one when no feedback)
    base_dataset_version: str
    items: int = 0  # accepted feedback images in it
    train_items: int = 0
    holdout_items: int = 0  # feedback_val: never trained on, validated on by the feedback gate
    missing: int = 0  # accepted labels whose image the batch's inputs no longer give
    key: str | None = None
    reused: bool = False  # committed by an earlier run


# ---------------------------------------------------------------------------------------------- KPIs


def measure_labelled_kpis(
    lake: Lake,
    batch_id: str,
    model_version: str | None = None,
    thresholds: KpiThresholds | None = None,
    *,
    run_id: str = "labelled-kpis",
    emits_alarm: bool = False,
) -> KpiResult:
    """Per-group recall, precision and true positives of the batch's reviewed items, committed to
    ``kpis/batch_id=…/model_version=…`` (replacing an earlier measurement).

    The decisions on ``model_version`` (default: the newest the batch's feedback names) count, one per
    image (the first); ``unusable`` ones are counted and left out. Thresholds: the study's alarm on
    reviewed items (:func:`zalando.kpis.reviewed_thresholds`) unless given. ``emits_alarm``: the
    caller emits the alarm event, so the manifest records it as sent; otherwise the next run of the
    ``feedback/kpis`` flow measures the batch again and sends it.
    """
    from zalando.drift import any_alarm
    from zalando.feedback import first_decisions
    from zalando.kpis import labelled_kpis, reviewed_groups, reviewed_thresholds
    from zalando.ui.store import LakeStore

    store = LakeStore(lake)
    th = thresholds or reviewed_thresholds()
    state = store.feedback_state(batch_id)
    decisions = store.read_feedback(batch_id)
    if not decisions:
        return KpiResult(batch_id=batch_id, model_version=model_version, skipped="no feedback")
    version = model_version or sorted({d.model_version for d in decisions})[-1]
    counted = list(first_decisions([d for d in decisions if d.model_version == version]).values())
    groups = reviewed_groups(counted)
    if not groups.y_true:
        why = f"no decision with a group on model {version}" + (
            f" ({groups.unusable} unusable)" if counted else ""
        )
        log.info("batch %s: %s; no KPIs", batch_id, why)
        return KpiResult(batch_id=batch_id, model_version=version, unusable=groups.unusable, skipped=why)
    df = labelled_kpis(np.asarray(groups.y_true), np.asarray(groups.y_pred), th)
    alarm = any_alarm(df)
    alarm_groups = df.loc[df["alarm"], "group_name"].astype(str).tolist()
    key = store.commit_kpis(
        batch_id,
        version,
        _kpi_table(df, batch_id, version),
        run_id=run_id,
        extra={
            "feedback_state": state,
            "reviewed": len(groups.y_true),
            "unusable": groups.unusable,
            "alarm": alarm,
            "alarm_groups": alarm_groups,
            "alarm_sent": alarm and emits_alarm,
            "thresholds": th.model_dump(),
        },
    )
    log.info(
        "labelled KPIs of batch %s (model %s, %d reviewed items): %s",
        batch_id, version, len(groups.y_true), ", ".join(alarm_groups) or "no alarm",
    )  # fmt: skip
    return KpiResult(
        batch_id=batch_id,
        model_version=version,
        reviewed=len(groups.y_true),
        unusable=groups.unusable,
        alarm=alarm,
        alarm_groups=alarm_groups,
        alarm_sent=alarm and emits_alarm,
        key=key,
        uri=lake.uri(key),
        groups=[_group_kpi(r) for r in df.to_dict("records")],
    )


def batches_with_new_feedback(lake: Lake) -> list[str]:
    """Batches whose feedback changed since their labelled KPIs were last measured, or whose last
    measurement alarmed without the alarm event being sent (measured where no Prefect API was set)."""
    from zalando.ui.store import LakeStore

    store = LakeStore(lake)
    pending = []
    for batch_id in store.feedback_batches():
        state = store.feedback_state(batch_id)
        done = any(
            r.extra.get("feedback_state") == state and (r.extra.get("alarm_sent") or not r.extra.get("alarm"))
            for r in store.read_kpis(batch_id)
        )
        if not done:
            pending.append(batch_id)
    log.info("%d batch(es) with feedback not measured yet: %s", len(pending), ", ".join(pending) or "none")
    return pending


def _kpi_table(df: Any, batch_id: str, model_version: str) -> pa.Table:
    rows = [
        {
            **r,
            "batch_id": batch_id,
            "model_version": model_version,
            **{k: _none_if_nan(r[k]) for k in _NULLABLE},
        }
        for r in df.to_dict("records")
    ]
    return pa.Table.from_pylist(rows, schema=KPI_SCHEMA)


_NULLABLE = ("recall_threshold", "precision_threshold", "min_tp")


def _none_if_nan(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _group_kpi(r: dict[str, Any]) -> GroupKpi:
    return GroupKpi(
        group_name=r["group_name"], support=r["support"], predicted=r["predicted"], tp=r["tp"], fp=r["fp"],
        fn=r["fn"], recall=_none_if_nan(r["recall"]), precision=_none_if_nan(r["precision"]),
        min_tp=_none_if_nan(r["min_tp"]), alarm=bool(r["alarm"]), reason=str(r["reason"]),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- retraining


def add_feedback_labels(
    lake: Lake, dataset: DatasetVersion, config: FeedbackDataConfig, *, run_id: str
) -> FeedbackDataset:
    """The base dataset version plus every accepted feedback label: a new dataset version (its rows
    committed to ``reviewed_images/dataset_version=…`` once), or the base one when there is none.

    Cheap when nothing changed: the id comes from the decisions, and a committed version is reused
    without reading a pixel.
    """
    from zalando.data.feedback_data import (
        accepted_decisions,
        collect_feedback_items,
        decision_keys,
        feedback_version_id,
        holdout_mask,
    )
    from zalando.ui.store import LakeStore

    store = LakeStore(lake)
    base = dataset.dataset_version
    decisions = accepted_decisions(store.read_feedback())
    if not decisions:
        log.info("no accepted feedback label: dataset version %s as it is", base)
        return FeedbackDataset(dataset=dataset, base_dataset_version=base)
    version = feedback_version_id(base, decision_keys(decisions), config)
    extra = store.feedback_dataset_extra(version)
    missing: list[tuple[str, str]] = []
    if extra is None:
        items, missing = collect_feedback_items(store, decisions)
        if len(items) == 0:
            log.warning("no accepted feedback image could be read: dataset version %s as it is", base)
            return FeedbackDataset(dataset=dataset, base_dataset_version=base, missing=len(missing))
        version = feedback_version_id(base, items.keys(), config)
        extra = store.feedback_dataset_extra(version)
        if extra is None:
            held = int(holdout_mask(items.batch_ids, items.image_ids, config.holdout).sum())
            extra = {
                "base_dataset_version": base,
                "config": config.model_dump(),
                "stats": dataset.model_copy(update={"dataset_version": version}).model_dump(),
                "items": len(items),
                "train_items": len(items) - held,
                "holdout_items": held,
                "batches": sorted(set(items.batch_ids)),
                "missing": [f"{b}/{i}" for b, i in missing[:100]],
                "missing_count": len(missing),
            }
            store.commit_feedback_dataset(version, items.to_table(config), run_id=run_id, extra=extra)
            return _feedback_dataset(dataset, version, extra, store.feedback_dataset_key(version), False)
    return _feedback_dataset(dataset, version, extra, store.feedback_dataset_key(version), True)


def _feedback_dataset(
    dataset: DatasetVersion, version: str, extra: dict[str, Any], key: str, reused: bool
) -> FeedbackDataset:
    out = FeedbackDataset(
        dataset=dataset.model_copy(update={"dataset_version": version}),
        base_dataset_version=dataset.dataset_version,
        items=int(extra.get("items", 0)),
        train_items=int(extra.get("train_items", 0)),
        holdout_items=int(extra.get("holdout_items", 0)),
        missing=int(extra.get("missing_count", 0)),
        key=key,
        reused=reused,
    )
    log.info(
        "dataset version %s: %s + %d feedback images (%d to train on, %d held out)%s",
        version, out.base_dataset_version, out.items, out.train_items, out.holdout_items,
        " (reused)" if reused else "",
    )  # fmt: skip
    return out


def load_training_arrays(lake: Lake, version: str) -> dict[str, Any]:
    """The arrays of any dataset version: a split's (``zalando.data.split.load_dataset_arrays``), or
    a feedback version's (its base split's, extended with its feedback rows; see
    :func:`zalando.data.feedback_data.extend_dataset_arrays`)."""
    from zalando.data.feedback_data import FeedbackItems, extend_dataset_arrays
    from zalando.data.split import load_dataset_arrays
    from zalando.ui.store import LakeStore

    found = LakeStore(lake).read_feedback_dataset(version)
    if found is None:
        return load_dataset_arrays(lake, version)
    table, extra = found
    base = load_dataset_arrays(lake, str(extra["base_dataset_version"]))
    arrays, got = extend_dataset_arrays(
        base, FeedbackItems.from_table(table), FeedbackDataConfig(**extra["config"])
    )
    if got != version:
        raise DataError(
            f"dataset version {version}: its feedback rows hash to {got}; the partition was changed"
        )
    return arrays
