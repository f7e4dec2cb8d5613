"""Labelled KPIs: when a batch has labels, the study's alarm.

A group's true positives (recall) or precision falling below a threshold alarms; the thresholds
default to the study's per-group numbers minus a margin for one night's noise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from zalando.errors import DataError
from zalando.labels import GROUP_NAMES, NUM_GROUPS, group_index
from zalando.study import STUDY_BEST

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
