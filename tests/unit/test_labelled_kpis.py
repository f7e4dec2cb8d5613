"""Labelled KPIs from reviewers' decisions (issue 15): the study's alarm on true positives, thresholds
per group (settings, then a run's own), the step that measures a batch and commits its table, which
batches still need measuring, and `zalando labels import` measuring at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.ui_support import VERSION, scored_batch
from zalando.errors import ConfigError
from zalando.feedback import UNUSABLE, Decision, Proposal, record_decisions
from zalando.kpis import (
    REVIEWED_MIN_SUPPORT,
    REVIEWED_MIN_TP,
    KpiThresholds,
    reviewed_groups,
    reviewed_kpis,
    reviewed_thresholds,
)
from zalando.labels import GROUP_NAMES
from zalando.lake import Lake
from zalando.lake.keys import CATALOG_FILE
from zalando.settings import Settings
from zalando.steps.feedback import KPI_SCHEMA, batches_with_new_feedback, measure_labelled_kpis
from zalando.ui.store import LakeStore

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _decision(
    image: str, label: str, predicted: str, *, batch: str = "2026-03-01-shop", minute: int = 0
) -> Decision:
    return Decision(
        image_id=image, batch_id=batch, model_version=VERSION, predicted_group=predicted, label=label,
        reviewer="r", decided_at=T0 + timedelta(minutes=minute), source="import",
    )  # fmt: skip


def _decisions(true_pred: list[tuple[str, str]]) -> list[Decision]:
    return [_decision(f"img-{i:05d}", t, p) for i, (t, p) in enumerate(true_pred)]


# ---------------------------------------------------------------------------------------------- thresholds


def test_reviewed_thresholds_alarm_on_true_positives_only_by_default() -> None:
    th = reviewed_thresholds()
    assert th.recall == {} and th.precision == {}
    assert th.min_tp == REVIEWED_MIN_TP == {g: 10 for g in GROUP_NAMES}
    assert th.min_support == REVIEWED_MIN_SUPPORT == 20
    # the generic thresholds (a random labelled sample) keep the study's recall/precision floors
    assert KpiThresholds().recall["One piece"] == pytest.approx(0.91)


def test_reviewed_thresholds_change_group_by_group_layer_after_layer() -> None:
    settings_layer = {"min_tp": {"footwear": 30, "Bags": 4}}
    run_layer = {"min_tp": {"Bags": 6}, "min_support": 5, "recall": {"one_piece": 0.5}}
    th = reviewed_thresholds(settings_layer, None, run_layer)
    assert th.min_tp == {**REVIEWED_MIN_TP, "Footwear": 30, "Bags": 6}
    assert th.min_support == 5 and th.recall == {"One piece": 0.5} and th.precision == {}


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"min_tp": {"shoes": 3}}, "group 'shoes': unknown"),
        ({"max_tp": 3}, "max_tp: Extra inputs are not permitted"),
        ({"min_support": -1}, "min_support"),
        ({"min_tp": {"Bags": "many"}}, "min_tp.Bags"),
        (["min_tp"], "expected a mapping"),
    ],
)
def test_bad_kpi_threshold_settings_name_the_field(layer: object, message: str) -> None:
    with pytest.raises(ConfigError, match="KPI threshold settings") as err:
        reviewed_thresholds(layer)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_the_kpi_threshold_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZALANDO_KPI_THRESHOLDS", '{"min_tp": {"Footwear": 30}, "min_support": 8}')
    settings = Settings(lake_uri="s3://b/l")
    th = reviewed_thresholds(settings.kpi_thresholds)
    assert th.min_tp["Footwear"] == 30 and th.min_tp["Bags"] == 10 and th.min_support == 8
    assert settings.feedback_weight == 2.0 and settings.feedback_holdout == 0.2


# ---------------------------------------------------------------------------------------------- the alarm


def test_true_groups_are_the_reviewers_labels_without_unusable() -> None:
    ds = _decisions([("Footwear", "Bags"), (UNUSABLE, "Bags"), ("Bags", "Bags"), ("One piece", "Upper part")])
    g = reviewed_groups(ds)
    assert g.y_true == [3, 4, 2] and g.y_pred == [4, 4, 0] and g.unusable == 1
    assert reviewed_kpis(_decisions([(UNUSABLE, "Bags")])) is None and reviewed_kpis([]) is None


def test_low_recall_on_doubtful_items_does_not_alarm_while_true_positives_hold() -> None:
    """Reviewed items are the doubtful ones: half of 100 Footwear items right is recall .5, but 50
    true positives are above the floor of 10, so no alarm."""
    ds = _decisions([("Footwear", "Footwear")] * 50 + [("Footwear", "Bags")] * 50 + [("Bags", "Bags")] * 30)
    df = reviewed_kpis(ds).set_index("group_name")
    assert df.loc["Footwear", "recall"] == pytest.approx(0.5) and df.loc["Footwear", "tp"] == 50
    assert df.loc["Bags", "precision"] == pytest.approx(30 / 80)
    assert not df["alarm"].any()


def test_true_positives_below_the_floor_alarm_with_enough_reviewed_items() -> None:
    ds = _decisions([("Footwear", "Footwear")] * 5 + [("Footwear", "Bags")] * 20 + [("Bags", "Bags")] * 12)
    df = reviewed_kpis(ds).set_index("group_name")
    assert df.loc["Footwear", "alarm"] and df.loc["Footwear", "reason"] == "TP 5 < 10"
    assert df.loc["Footwear", "support"] == 25 and df.loc["Footwear", "fn"] == 20
    # Bags: TP 12 but only 12 reviewed Bags (< min_support 20): reported, never alarms
    assert not df.loc["Bags", "alarm"] and df.loc["Bags", "tp"] == 12
    # the same Footwear numbers under a per-group floor of 4: no alarm
    th = reviewed_thresholds({"min_tp": {"Footwear": 4}})
    assert not reviewed_kpis(ds, th)["alarm"].any()
    # an explicit recall floor alarms too
    th = reviewed_thresholds({"min_tp": {"Footwear": 4}, "recall": {"Footwear": 0.5}})
    assert reviewed_kpis(ds, th).set_index("group_name").loc["Footwear", "reason"] == "recall 0.200 < 0.50"


# ---------------------------------------------------------------------------------------------- the step


@pytest.fixture
def store(tmp_path: Path) -> LakeStore:
    return LakeStore(Lake.local(tmp_path / "lake"))


@pytest.fixture
def batch(store: LakeStore) -> str:
    return scored_batch(store.lake, 60)


def label(store: LakeStore, batch: str, labels: dict[str, str]) -> None:
    proposals = [
        Proposal(where=f"row {i}", image_id=img, batch_id=batch, label=lab, reviewer="tester")
        for i, (img, lab) in enumerate(labels.items())
    ]
    result = record_decisions(store, proposals, source="import")
    assert not result.rejected, result.rejected


def footwear_missed(store: LakeStore, batch: str, n: int = 25) -> dict[str, str]:
    """``n`` items the model did not call Footwear, labelled Footwear: Footwear TP 0 of ``n``."""
    predicted = store.batch_predictions(batch).predicted
    picked = [i for i, g in sorted(predicted.items()) if g != "Footwear"][:n]
    assert len(picked) == n
    return dict.fromkeys(picked, "Footwear")


def test_measure_commits_the_kpi_table_and_alarms_on_footwear(store: LakeStore, batch: str) -> None:
    labels = footwear_missed(store, batch)
    unusable = next(i for i in sorted(store.batch_predictions(batch).predicted) if i not in labels)
    label(store, batch, {**labels, unusable: UNUSABLE})

    out = measure_labelled_kpis(store.lake, batch, None, None, run_id="t")
    assert out.model_version == VERSION and out.reviewed == 25 and out.unusable == 1
    assert out.alarm and out.alarm_groups == ["Footwear"] and not out.alarm_sent
    foot = next(g for g in out.groups if g.group_name == "Footwear")
    assert (foot.support, foot.tp, foot.fn, foot.min_tp, foot.recall) == (25, 0, 25, 10, 0.0)
    assert next(g for g in out.groups if g.group_name == "Bags").recall is None  # no reviewed Bags

    (record,) = store.read_kpis(batch)
    assert record.key == out.key == f"kpis/batch_id={batch}/model_version={VERSION}"
    assert out.uri == store.lake.uri(out.key)
    assert [r["group_name"] for r in record.rows] == list(GROUP_NAMES)
    assert store.lake.read_partition(out.key).schema.equals(KPI_SCHEMA)
    assert record.extra["feedback_state"] == store.feedback_state(batch)
    assert record.extra["alarm"] and not record.extra["alarm_sent"] and record.extra["reviewed"] == 25
    assert record.extra["thresholds"]["min_tp"]["Footwear"] == 10


def test_batches_with_new_feedback_until_measured_and_the_alarm_sent(store: LakeStore, batch: str) -> None:
    other = scored_batch(store.lake, 30, source="other")
    assert batches_with_new_feedback(store.lake) == []
    label(store, batch, footwear_missed(store, batch))
    label(store, other, dict.fromkeys(sorted(store.batch_predictions(other).predicted)[:3], "Bags"))
    assert batches_with_new_feedback(store.lake) == sorted([batch, other])

    measure_labelled_kpis(store.lake, other)  # no alarm (3 items): done
    measure_labelled_kpis(store.lake, batch)  # alarm measured without sending it: still to do
    assert batches_with_new_feedback(store.lake) == [batch]
    assert measure_labelled_kpis(store.lake, batch, emits_alarm=True).alarm_sent
    assert batches_with_new_feedback(store.lake) == []

    predicted = store.batch_predictions(other).predicted
    label(store, other, {sorted(predicted)[10]: "Bottom part"})  # a new decision: measure again
    assert batches_with_new_feedback(store.lake) == [other]


def test_a_batch_without_usable_decisions_is_skipped(store: LakeStore, batch: str) -> None:
    assert measure_labelled_kpis(store.lake, batch).skipped == "no feedback"
    first = sorted(store.batch_predictions(batch).predicted)[0]
    label(store, batch, {first: UNUSABLE})
    out = measure_labelled_kpis(store.lake, batch)
    assert out.skipped and "1 unusable" in out.skipped and out.key is None
    assert store.read_kpis(batch) == []


def test_labels_import_measures_the_kpis_at_once(
    store: LakeStore, batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando.cli import app

    monkeypatch.setenv("ZALANDO_LAKE_URI", store.lake.uri_root)
    # the CLI opens the catalog the fixture's Lake.local made (not one in the work folder)
    monkeypatch.setenv("ZALANDO_ICEBERG_CATALOG_URI", f"sqlite:///{store.lake.root}/{CATALOG_FILE}")
    monkeypatch.setenv("ZALANDO_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("ZALANDO_KPI_THRESHOLDS", '{"min_tp": {"Footwear": 12}}')
    csv_file = tmp_path / "labels.csv"
    rows = footwear_missed(store, batch)
    csv_file.write_text("image_id,batch_id,label\n" + "".join(f"{i},{batch},footwear\n" for i in rows))
    res = CliRunner().invoke(app, ["labels", "import", str(csv_file)])
    assert res.exit_code == 0, res.output
    assert "25 recorded" in res.output and f"labelled KPIs of batch {batch}" in res.output
    assert "TP 0 < 12" in res.output and "KPI ALARM (Footwear)" in res.output
    assert "next `feedback/kpis` run sends zalando.kpi.alarm" in res.output
    (record,) = store.read_kpis(batch)
    assert record.extra["alarm"] and not record.extra["alarm_sent"]
    assert record.extra["thresholds"]["min_tp"]["Footwear"] == 12
    assert batches_with_new_feedback(store.lake) == [batch]  # the scheduled flow sends the alarm

    res = CliRunner().invoke(app, ["labels", "import", "--no-kpis", str(csv_file)])
    assert res.exit_code == 0 and "labelled KPIs" not in res.output and "25 already recorded" in res.output


def test_the_first_decision_per_image_is_the_one_counted() -> None:
    """The step counts one decision per image (the first); reviewed_kpis counts what it is given."""
    ds = [_decision(f"img-{i}", "Footwear", "Bags") for i in range(25)]
    ds.append(_decision("img-0", "Footwear", "Bags", minute=5))  # a repeat, later: counted once
    df = reviewed_kpis(ds).set_index("group_name")
    assert df.loc["Footwear", "support"] == 26  # reviewed_kpis counts what it is given
    from zalando.feedback import first_decisions

    df = reviewed_kpis(list(first_decisions(ds).values())).set_index("group_name")
    assert df.loc["Footwear", "support"] == 25 and np.isnan(df.loc["Upper part", "recall"])
