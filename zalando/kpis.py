"""Labelled KPIs: when a batch has labels, the study's alarm.

:func:`labelled_kpis` measures per group TP / FP / FN, recall and precision of any labelled sample.
Its generic :class:`KpiThresholds` alarm on recall or precision below the study's per-group numbers
minus a margin for one night's noise: right for a sample drawn at random from a batch.

Reviewers' labels are not such a sample: they lean towards doubtful items (the needs-review queue is
the low-confidence rows), so recall and precision measured on them are biased low. The alarm on
reviewed items (:func:`reviewed_thresholds`, :func:`reviewed_kpis`) is the study's own: a group's
true-positive count below a threshold, configurable per group; recall and precision are reported
beside it and alarm only when a threshold for them is set explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zalando.errors import ConfigError, DataError
from zalando.labels import GROUP_NAMES, NUM_GROUPS, group_index
from zalando.study import STUDY_BEST

if TYPE_CHECKING:
    from zalando.feedback import Decision

log = logging.getLogger(__name__)


def _default_kpi(metric: str) -> dict[str, float]:
    """Per group: the study's floor minus 0.05, since one night's batch is noisier than validation."""
    return {g: round(v[metric] - 0.05, 2) for g, v in STUDY_BEST.items()}


class KpiThresholds(BaseModel):
    """Per-group floors for a labelled batch (the study's alarm). Groups with fewer than
    ``min_support`` true images are reported but never alarm; ``min_tp`` is an optional absolute
    floor on true positives per group."""

    model_config = ConfigDict(extra="forbid")
    recall: dict[str, float] = Field(default_factory=lambda: _default_kpi("recall"))
    precision: dict[str, float] = Field(default_factory=lambda: _default_kpi("precision"))
    min_tp: dict[str, int] = Field(default_factory=dict)
    min_support: int = Field(default=20, ge=0)

    @field_validator("recall", "precision", "min_tp", mode="before")
    @classmethod
    def _normalise(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {GROUP_NAMES[group_index(k)]: f for k, f in v.items()}
        return v


KPI_COLUMNS = [
    "group", "group_name", "support", "predicted", "tp", "fp", "fn", "recall", "precision",
    "recall_threshold", "precision_threshold", "min_tp", "alarm", "reason",
]  # fmt: skip


def labelled_kpis(
    y_true_group: np.ndarray, y_pred_group: np.ndarray, thresholds: KpiThresholds | None = None
) -> pd.DataFrame:
    """Per group TP / FP / FN, recall and precision of a labelled batch, alarming below thresholds."""
    th = thresholds or KpiThresholds()
    t = np.asarray(y_true_group)
    pr = np.asarray(y_pred_group)
    if t.ndim != 1 or t.shape != pr.shape or len(t) == 0:
        raise DataError(
            f"y_true_group / y_pred_group: expected equal non-empty 1-d arrays, got {t.shape} and {pr.shape}"
        )
    for who, arr in (("y_true_group", t), ("y_pred_group", pr)):
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= NUM_GROUPS:
            raise DataError(f"{who}: expected integer group ids 0..{NUM_GROUPS - 1}")
    cm = np.bincount(t * NUM_GROUPS + pr, minlength=NUM_GROUPS**2).reshape(NUM_GROUPS, NUM_GROUPS)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
    rows = []
    for g, name in enumerate(GROUP_NAMES):
        r_thr, p_thr, tp_min = th.recall.get(name), th.precision.get(name), th.min_tp.get(name)
        why = []
        if support[g] >= max(th.min_support, 1):
            if r_thr is not None and recall[g] < r_thr:
                why.append(f"recall {recall[g]:.3f} < {r_thr:.2f}")
            if p_thr is not None and predicted[g] > 0 and precision[g] < p_thr:
                why.append(f"precision {precision[g]:.3f} < {p_thr:.2f}")
            if p_thr is not None and predicted[g] == 0:
                why.append("never predicted")
            if tp_min is not None and tp[g] < tp_min:
                why.append(f"TP {tp[g]} < {tp_min}")
        rows.append(
            {
                "group": g, "group_name": name, "support": int(support[g]), "predicted": int(predicted[g]),
                "tp": int(tp[g]), "fp": int(predicted[g] - tp[g]), "fn": int(support[g] - tp[g]),
                "recall": float(recall[g]), "precision": float(precision[g]),
                "recall_threshold": r_thr, "precision_threshold": p_thr, "min_tp": tp_min,
                "alarm": bool(why), "reason": "; ".join(why),
            }
        )  # fmt: skip
    df = pd.DataFrame(rows, columns=KPI_COLUMNS)
    if df["alarm"].any():
        log.warning(
            "KPI alarm: %s", "; ".join(f"{r.group_name}: {r.reason}" for r in df[df.alarm].itertuples())
        )
    return df


# ---------------------------------------------------------------------------------- reviewed items

REVIEWED_MIN_TP: dict[str, int] = {g: 10 for g in GROUP_NAMES}
"""The study's alarm on reviewed items, per group: fewer true positives than this alarms."""
REVIEWED_MIN_SUPPORT = 20
"""Reviewed items of a group (by the reviewers' label) below which it is reported but never alarms."""


def reviewed_thresholds(*layers: Mapping[str, Any] | None) -> KpiThresholds:
    """The thresholds of the alarm on reviewed items: true-positive counts only by default
    (:data:`REVIEWED_MIN_TP`, :data:`REVIEWED_MIN_SUPPORT`), no recall or precision floor.

    Each layer (the ``kpi_thresholds`` setting, a flow parameter) holds :class:`KpiThresholds` fields
    and changes the one before it; the per-group fields (``min_tp``, ``recall``, ``precision``)
    change group by group, so ``{"min_tp": {"Footwear": 30}}`` leaves the other groups' counts alone.
    A bad field or group is a :class:`ConfigError` naming it.
    """
    merged: dict[str, Any] = {"recall": {}, "precision": {}, "min_tp": dict(REVIEWED_MIN_TP)}
    merged["min_support"] = REVIEWED_MIN_SUPPORT
    try:
        for layer in layers:
            if layer is None:
                continue
            if not isinstance(layer, Mapping):
                raise ConfigError(f"expected a mapping of KpiThresholds fields, got {type(layer).__name__}")
            for name, value in layer.items():
                if name in ("recall", "precision", "min_tp") and isinstance(value, Mapping):
                    groups = KpiThresholds.model_validate({name: value}).model_dump()[name]
                    merged[name] = {**merged.get(name, {}), **groups}
                else:
                    merged[name] = value
        return KpiThresholds.model_validate(merged)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"KPI threshold settings: {errors}") from None
    except ConfigError as exc:  # an unknown group name
        raise ConfigError(f"KPI threshold settings: {str(exc).splitlines()[0]}") from None


class ReviewedGroups(BaseModel):
    """Reviewed items as group ids: the reviewers' labels (true) and the model's groups (predicted)."""

    y_true: list[int]
    y_pred: list[int]
    unusable: int  # decisions "not a fashion article / unusable": in neither array


def reviewed_groups(decisions: Sequence[Decision]) -> ReviewedGroups:
    """True groups = the reviewers' labels, predicted = the model's group each decision recorded.

    ``decisions`` are the ones that count (:func:`zalando.feedback.first_decisions`, one per image);
    ``unusable`` ones are counted and left out: they have no true group.
    """
    from zalando.feedback import UNUSABLE

    y_true, y_pred, unusable = [], [], 0
    for d in decisions:
        if d.label == UNUSABLE:
            unusable += 1
            continue
        y_true.append(group_index(d.label))
        y_pred.append(group_index(d.predicted_group))
    return ReviewedGroups(y_true=y_true, y_pred=y_pred, unusable=unusable)


def reviewed_kpis(
    decisions: Sequence[Decision], thresholds: KpiThresholds | None = None
) -> pd.DataFrame | None:
    """:func:`labelled_kpis` of reviewed items (with :func:`reviewed_thresholds` unless given);
    None when no decision carries a group (none, or all ``unusable``)."""
    groups = reviewed_groups(decisions)
    if not groups.y_true:
        return None
    return labelled_kpis(
        np.asarray(groups.y_true, dtype=np.int64),
        np.asarray(groups.y_pred, dtype=np.int64),
        thresholds or reviewed_thresholds(),
    )
