"""Labelled KPIs: per-group TP / recall / precision alarms on constructed label arrays."""

from __future__ import annotations

import numpy as np
import pytest

from zalando.drift import any_alarm
from zalando.errors import DataError
from zalando.kpis import KpiThresholds, labelled_kpis


def test_labelled_kpis_alarm_when_true_positives_fall() -> None:
    truth = np.repeat(np.arange(5), 100)
    good = truth.copy()
    df = labelled_kpis(truth, good)
    assert not df["alarm"].any() and (df["tp"] == 100).all() and (df["recall"] == 1.0).all()

    bad = truth.copy()
    bad[np.flatnonzero(truth == 2)[:20]] = 0  # 20 dresses called Upper part: One piece recall .80
    df = labelled_kpis(truth, bad).set_index("group_name")
    assert df.loc["One piece", "tp"] == 80 and df.loc["One piece", "recall"] == pytest.approx(0.8)
    assert df.loc["One piece", "alarm"] and "recall 0.800 < 0.91" in df.loc["One piece", "reason"]
    assert df.loc["Upper part", "precision"] == pytest.approx(100 / 120)
    assert df.loc["Upper part", "alarm"] and "precision" in df.loc["Upper part", "reason"]
    assert not df.loc[["Bottom part", "Footwear", "Bags"], "alarm"].any()
    assert any_alarm(df.reset_index())


def test_labelled_kpis_thresholds_and_support() -> None:
    truth = np.repeat(np.arange(5), [100, 100, 5, 100, 100])
    pred = truth.copy()
    pred[truth == 2] = 0  # One piece entirely missed, but only 5 images: below min_support
    df = labelled_kpis(truth, pred).set_index("group_name")
    assert not df.loc["One piece", "alarm"] and df.loc["One piece", "tp"] == 0
    th = KpiThresholds(min_tp={"footwear": 101}, min_support=0)
    df = labelled_kpis(truth, pred, th).set_index("group_name")
    assert df.loc["Footwear", "alarm"] and "TP 100 < 101" in df.loc["Footwear", "reason"]
    assert df.loc["One piece", "alarm"]
    with pytest.raises(DataError, match="y_pred_group: expected integer group ids"):
        labelled_kpis(truth, pred + 5)
