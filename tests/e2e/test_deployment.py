"""The whole loop for real: Prefect server + process worker on free ports, `prefect deploy` from
prefect.yaml, `retrain` triggered with `prefect deployment run`, then the lake and the Prefect API
are checked. See conftest.py for the stack fixtures."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest

from tests.e2e.conftest import RETRAIN_EXPERIMENTS, FlowRunResult, LiveStack
from zalando.data.ingest import load_raw
from zalando.labels import GROUP_NAMES
from zalando.lake import Lake
from zalando.lake import commit as lc
from zalando.registry import get_champion
from zalando.steps.training import read_metric_tables

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


def _deployments(stack: LiveStack) -> dict[str, dict]:
    flows = {f["id"]: f["name"] for f in stack.post("/flows/filter", {})}
    return {f"{flows[d['flow_id']]}/{d['name']}": d for d in stack.post("/deployments/filter", {})}


def test_prefect_yaml_registers_the_three_deployments(deployed: LiveStack) -> None:
    deps = _deployments(deployed)
    assert {"nightly/nightly", "training/retrain", "batch_scoring/score"} <= set(deps), sorted(deps)

    nightly = deps["nightly/nightly"]
    crons = [(s["schedule"].get("cron"), s["schedule"].get("timezone")) for s in nightly["schedules"]]
    assert crons == [("0 2 * * *", "UTC")]
    assert nightly["parameters"] == {
        "profile": "cpu",
        "runner": "local",
        "dask_address": None,
        "shadow": False,
    }
    assert deps["batch_scoring/score"]["parameters"] == {"shadow": False}  # issue 15: shadow scoring, off
    for name, d in deps.items():
        assert d["work_pool_name"] == ("gpu" if name == "training/paper-gpu" else "zalando"), name
        # the pull step points at the worker's ZALANDO_HOME, not at this checkout's absolute path
        assert d["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $ZALANDO_HOME }}"}}
        ]
    # typed parameters: the UI shows and validates them from this schema
    props = deps["training/retrain"]["parameter_openapi_schema"]["properties"]
    assert props["profile"]["enum"] == ["paper", "cpu", "quick"]
    assert props["experiments"]["anyOf"][0]["type"] == "array"

    pools = deployed.post("/work_pools/filter", {})
    assert [p["type"] for p in pools if p["name"] == "zalando"] == ["process"]


def test_drift_alarm_automation_targets_retrain(deployed: LiveStack) -> None:
    deps = _deployments(deployed)
    retrain_id = deps["training/retrain"]["id"]
    autos = deployed.post("/automations/filter", {})
    drift = [a for a in autos if a["name"] == "zalando-drift-alarm-retrain"]
    assert len(drift) == 1, [a["name"] for a in autos]
    auto = drift[0]
    assert auto["enabled"]
    assert auto["trigger"]["expect"] == ["zalando.drift.alarm"]
    assert [(a["type"], a.get("deployment_id")) for a in auto["actions"]] == [("run-deployment", retrain_id)]


def test_retrain_run_completes_and_fills_the_lake(deployed: LiveStack, retrain_run: FlowRunResult) -> None:
    assert retrain_run.state == "COMPLETED", retrain_run.trigger_output
    run = deployed.get(f"/flow_runs/{retrain_run.id}")
    assert run["parameters"]["experiments"] == RETRAIN_EXPERIMENTS

    # the lake: raw tables, a dataset version, the model bundle, metrics, the champion, the report
    lake = Lake.from_settings(deployed.settings())
    assert load_raw(lake, "train", columns=["image_id"]).num_rows > 0
    assert lc.scan(lake.catalog(), "dataset_versions").num_rows, "no dataset version committed"
    champion = get_champion(lake)
    assert champion is not None and champion["experiment"] == RETRAIN_EXPERIMENTS[0]
    assert lake.is_committed(champion["bundle_key"])
    reports = [k for k in lake.list_keys("reports") if k.endswith("/report.md")]
    assert len(reports) == 1, reports
    run_id = reports[0].split("/")[1].removeprefix("run_id=")
    assert len(read_metric_tables(lake, run_id, [RETRAIN_EXPERIMENTS[0]])["summary"]) == 2  # val, test

    # the flow run's task runs and artifacts, through the Prefect API
    # the train tasks run in the `experiment-training` subflow: its task runs count as the run's
    subflows = deployed.post(
        "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [retrain_run.id]}}}
    )
    run_ids = [retrain_run.id, *(f["id"] for f in subflows)]
    tasks = deployed.post("/task_runs/filter", {"flow_runs": {"id": {"any_": run_ids}}})
    names = {t["name"] for t in tasks}
    assert {f"train-{e}" for e in RETRAIN_EXPERIMENTS} | {
        f"evaluate-{e}" for e in RETRAIN_EXPERIMENTS
    } <= names
    assert all(t["state"]["type"] == "COMPLETED" for t in tasks), [
        (t["name"], t["state"]["type"]) for t in tasks
    ]
    arts = deployed.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [retrain_run.id]}}})
    by_key = {a["key"]: a for a in arts if a.get("key")}
    assert {
        "per-group-fashion-cnn",
        "champion-decision",
        "gate-checks",
        "run-report",
        "run-per-group",
    } <= set(by_key)
    decision = json.loads(by_key["champion-decision"]["data"])
    assert decision[0]["decision"] == "promoted" and decision[0]["model_version"] == champion["model_version"]
    per_group = json.loads(by_key["per-group-fashion-cnn"]["data"])
    assert sorted(r["group_name"] for r in per_group) == sorted(GROUP_NAMES)
    assert lake.uri(f"reports/run_id={run_id}/report.md") in by_key["run-report"]["data"]


def test_drift_alarm_event_schedules_a_retrain_run(deployed: LiveStack) -> None:
    """A `zalando.drift.alarm` event makes the automation create a `retrain` flow run.

    The work pool is paused first, so the triggered run is only scheduled, then cancelled.
    """
    deps = _deployments(deployed)
    retrain_id = deps["training/retrain"]["id"]
    deployed.patch("/work_pools/zalando", {"is_paused": True})
    try:
        batch = f"zalando.batch.e2e-{uuid.uuid4().hex[:6]}"
        deployed.post(
            "/events",
            [
                {
                    "id": str(uuid.uuid4()),
                    "occurred": datetime.now(UTC).isoformat(),
                    "event": "zalando.drift.alarm",
                    "resource": {"prefect.resource.id": batch},
                    "payload": {"profile": "quick", "statistics": ["embedding_mmd2"]},
                }
            ],
        )
        deadline = time.monotonic() + 90
        runs: list[dict] = []
        while time.monotonic() < deadline and not runs:
            time.sleep(2)
            runs = [
                r
                for r in deployed.post("/flow_runs/filter", {"deployments": {"id": {"any_": [retrain_id]}}})
                if r["parameters"].get("reason") == f"drift alarm on {batch}"
            ]
        assert runs, "the drift alarm automation did not create a retrain flow run within 90 s"
        run = runs[0]
        assert run["parameters"]["profile"] == "quick"
        deployed.post(
            f"/flow_runs/{run['id']}/set_state",
            {"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True},
        )
    finally:
        deployed.patch("/work_pools/zalando", {"is_paused": False})
