"""The feedback loop's flows (issue 15) under the session's Prefect test harness, on a real SeaweedFS:
reviewers' labels on a constructed batch whose Footwear true positives fall below the threshold make
the `feedback` flow emit `zalando.kpi.alarm`; a retrain after new labels trains on a new dataset
version (the train task misses its cache because the data changed), and an unchanged one hits it."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter

from flows.feedback import labelled_kpis
from flows.training import training
from tests.ui_support import VERSION, scored_batch
from zalando.feedback import Proposal, record_decisions
from zalando.lake import Lake
from zalando.settings import load_settings
from zalando.ui.store import LakeStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture
def fb_lake(
    prefect_harness: None, flow_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lake]:
    """A lake prefix of this test's own (other tests share the session's S3 server), with a work folder
    of its own: the embedded Iceberg catalog lives there, and one catalog serves one lake."""
    old = {k: os.environ[k] for k in ("ZALANDO_LAKE_URI", "ZALANDO_WORK_DIR")}
    os.environ["ZALANDO_LAKE_URI"] = f"s3://zalando-flows/{uuid.uuid4().hex[:10]}"
    os.environ["ZALANDO_WORK_DIR"] = str(tmp_path_factory.mktemp("fb-work"))
    try:
        lake = Lake.from_settings(load_settings())
        lake.ensure_ready()
        yield lake
    finally:
        os.environ.update(old)


def _label(store: LakeStore, batch: str, labels: dict[str, str]) -> None:
    proposals = [Proposal(where="t", image_id=i, batch_id=batch, label=lab) for i, lab in labels.items()]
    result = record_decisions(store, proposals, source="import", default_reviewer="integration")
    assert not result.rejected and len(result.accepted) == len(labels), result


def _events(name: str, resource: str, timeout: float = 30) -> list[dict[str, Any]]:
    deadline, events = time.monotonic() + timeout, []
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline and not events:
            resp = client.request(
                "POST", "/events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 50}
            )
            events = [e for e in resp.json()["events"] if e["resource"]["prefect.resource.id"] == resource]
            time.sleep(1)
    return events


def test_footwear_true_positives_below_threshold_emit_the_kpi_alarm(fb_lake: Lake) -> None:
    store = LakeStore(fb_lake)
    batch = scored_batch(fb_lake, 60, source="kpi-shop", batch_date="2026-03-04")
    predicted = store.batch_predictions(batch).predicted
    missed = [i for i, g in sorted(predicted.items()) if g != "Footwear"][
        :25
    ]  # Footwear called something else
    _label(store, batch, dict.fromkeys(missed, "Footwear"))

    state = labelled_kpis(thresholds={"min_tp": {"Footwear": 10}}, profile="quick", return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert out["alarms"] == {batch: ["Footwear"]}, out
    measured = out["batches"][batch]
    assert measured["reviewed"] == 25 and measured["alarm_sent"] and measured["model_version"] == VERSION
    # the group rows come back too: `zalando labels import` prints them as its KPI table
    foot_row = next(g for g in measured["groups"] if g["group_name"] == "Footwear")
    assert (foot_row["support"], foot_row["tp"], foot_row["alarm"]) == (25, 0, True)

    events = _events("zalando.kpi.alarm", f"zalando.batch.{batch}")
    assert events, "no zalando.kpi.alarm event reached the Prefect server"
    payload = events[0]["payload"]
    assert (
        payload["profile"] == "quick" and payload["batch_id"] == batch and payload["groups"] == ["Footwear"]
    )
    assert payload["model_version"] == VERSION and payload["reasons"] == {"Footwear": "TP 0 < 10"}
    assert payload["kpis_uri"] == measured["uri"]
    related = {r["prefect.resource.id"]: r.get("prefect.resource.role") for r in events[0]["related"]}
    assert related[f"zalando.model.{VERSION}"] == "model"  # beside Prefect's own (flow run, task run)

    (record,) = store.read_kpis(batch)
    foot = next(r for r in record.rows if r["group_name"] == "Footwear")
    assert (foot["support"], foot["tp"], foot["alarm"]) == (25, 0, True) and record.extra["alarm_sent"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    assert "labelled-kpis" in {a.key for a in arts}

    # nothing new since: the scheduled run measures nothing and raises nothing
    again = labelled_kpis(profile="quick")
    assert again["batches"] == {} and again["alarms"] == {}


def _train_states(flow_run_id: Any) -> dict[str, str]:
    """Task states of a training run, its `experiment-training` subflow runs' included (the train tasks
    run there)."""
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [flow_run_id]})  # type: ignore[arg-type]
        )
        ids = [flow_run_id, *(c.id for c in children)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}))  # type: ignore[arg-type]
    return {re.sub(r"-[0-9a-f]{3}$", "", t.name): t.state.name for t in runs}


def test_a_retrain_after_new_labels_trains_on_a_new_dataset_version(fb_lake: Lake) -> None:
    first = training(profile="quick", experiments=["fashion_cnn"], reason="feedback test", return_state=True)
    assert first.is_completed(), first.message
    base = first.result()["dataset_version"]

    store = LakeStore(fb_lake)
    batch = scored_batch(fb_lake, 80, source="learn-shop", batch_date="2026-03-05")
    ids = sorted(store.batch_predictions(batch).predicted)
    _label(
        store, batch, {i: ("Footwear", "Bags", "One piece", "Upper part")[n % 4] for n, i in enumerate(ids)}
    )

    second = training(profile="quick", experiments=["fashion_cnn"], reason="kpi alarm", return_state=True)
    assert second.is_completed(), second.message
    out = second.result()
    assert out["dataset_version"].startswith("dsf-") and out["dataset_version"] != base
    states = _train_states(second.state_details.flow_run_id)
    assert states["preprocess"] == "Cached" and states["add-feedback-labels"] == "Completed"
    assert states["train-fashion_cnn"] == "Completed", states  # a miss: the data changed, nothing forced
    extra = store.feedback_dataset_extra(out["dataset_version"])
    assert extra is not None and extra["base_dataset_version"] == base and extra["items"] == 80
    # the gates compared challenger and champion on the held-out feedback items too
    from zalando.registry import get_model

    metrics = get_model(fb_lake, out["models"]["fashion_cnn"])["metrics"]
    assert (
        metrics["feedback_items"] == extra["holdout_items"] > 0 and metrics["feedback_accuracy"] is not None
    )

    third = training(profile="quick", experiments=["fashion_cnn"], reason="no new labels", return_state=True)
    assert third.is_completed(), third.message
    assert third.result()["dataset_version"] == out["dataset_version"]
    assert _train_states(third.state_details.flow_run_id)["train-fashion_cnn"] == "Cached"
