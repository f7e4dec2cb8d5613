"""Issue 15 on the real stack: `zalando labels import` on a constructed batch whose Footwear true
positives fall below the threshold runs the `feedback` flow against the live Prefect server, its
`zalando.kpi.alarm` event meets the automation from prefect.yaml, and a `retrain` run is created.

The batch lives in a lake prefix of its own (with an Iceberg catalog of its own), and the work pool is paused while the alarm is raised,
so the triggered run is only scheduled (then cancelled): the stack's own lake and runs stay as the
other e2e tests expect them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from pydantic import SecretStr

from tests.conftest import REPO
from tests.e2e.conftest import LiveStack
from tests.e2e.test_deployment import _deployments
from tests.ui_support import scored_batch
from zalando.lake import Lake
from zalando.ui.store import LakeStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_kpi_automation_and_the_feedback_deployment_are_registered(deployed: LiveStack) -> None:
    deps = _deployments(deployed)
    kpis = deps["feedback/kpis"]
    crons = [(s["schedule"].get("cron"), s["schedule"].get("timezone")) for s in kpis["schedules"]]
    assert crons == [("0 6 * * *", "UTC")] and kpis["parameters"] == {"profile": "cpu"}
    autos = {a["name"]: a for a in deployed.post("/automations/filter", {})}
    kpi = autos["zalando-kpi-alarm-retrain"]
    assert kpi["enabled"] and kpi["trigger"]["expect"] == ["zalando.kpi.alarm"]
    assert [(a["type"], a.get("deployment_id")) for a in kpi["actions"]] == [
        ("run-deployment", deps["training/retrain"]["id"])
    ]
    assert "zalando-drift-alarm-retrain" in autos  # the drift alarm's automation stays


def test_a_kpi_alarm_from_labels_import_creates_a_retrain_run(deployed: LiveStack) -> None:
    lake_uri = f"s3://zalando-e2e/kpi-{uuid.uuid4().hex[:8]}"
    # its own Iceberg catalog (one catalog serves one lake); the stack's S3 and work folder stay
    catalog_uri = f"sqlite:///{deployed.work_dir / ('iceberg-' + lake_uri.rsplit('/', 1)[-1] + '.db')}"
    lake = Lake.from_settings(
        deployed.settings().model_copy(
            update={"lake_uri": lake_uri, "iceberg_catalog_uri": SecretStr(catalog_uri)}
        )
    )
    lake.ensure_ready()
    batch = scored_batch(lake, 40, source=f"e2e-kpi-{uuid.uuid4().hex[:6]}")
    predicted = LakeStore(lake).batch_predictions(batch).predicted
    missed = [i for i, g in sorted(predicted.items()) if g != "Footwear"][:25]
    labels = deployed.work_dir / f"labels-{batch}.csv"
    labels.write_text("image_id,batch_id,label\n" + "".join(f"{i},{batch},Footwear\n" for i in missed))

    retrain_id = _deployments(deployed)["training/retrain"]["id"]
    env = dict(
        deployed.env,
        ZALANDO_LAKE_URI=lake_uri,
        ZALANDO_ICEBERG_CATALOG_URI=catalog_uri,
        PREFECT_API_URL=deployed.api,
        PREFECT_HOME=str(deployed.work_dir / "prefect-cli"),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    deployed.patch("/work_pools/zalando", {"is_paused": True})
    try:
        res = subprocess.run(
            [sys.executable, "-m", "zalando.cli", "labels", "import", str(labels)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
        assert "25 recorded" in res.stdout and "KPI ALARM (Footwear): zalando.kpi.alarm sent" in res.stdout, (
            res.stdout
        )
        (record,) = LakeStore(lake).read_kpis(batch)
        assert record.extra["alarm_sent"] and record.extra["alarm_groups"] == ["Footwear"]

        reason = f"kpi alarm on zalando.batch.{batch}"
        deadline, runs = time.monotonic() + 90, []
        while time.monotonic() < deadline and not runs:
            time.sleep(2)
            runs = [
                r
                for r in deployed.post("/flow_runs/filter", {"deployments": {"id": {"any_": [retrain_id]}}})
                if r["parameters"].get("reason") == reason
            ]
        assert runs, "the KPI alarm automation did not create a retrain flow run within 90 s"
        assert runs[0]["parameters"]["profile"] == "quick"  # the profile the import ran with
        # the feedback flow ran against the live server: its run and artifact are there
        fb_runs = [
            r
            for r in deployed.post(
                "/flow_runs/filter", {"flows": {"name": {"any_": ["feedback"]}}, "limit": 50}
            )
            if r["parameters"].get("batch_id") == batch
        ]
        assert fb_runs and fb_runs[0]["state"]["type"] == "COMPLETED", fb_runs
        for run in runs:
            deployed.post(
                f"/flow_runs/{run['id']}/set_state",
                {"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True},
            )
    finally:
        deployed.patch("/work_pools/zalando", {"is_paused": False})
