"""The real local stack for end-to-end tests: `infra/stack.py up` on free ports in a temporary work
folder (Prefect server, SeaweedFS, a process worker), deployments from prefect.yaml, one `retrain`
run triggered like a user would, and `down` at the end.

Everything is session-scoped: the Prefect server takes 15-20 s to start on our machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MINI_DIR, REPO, TEST_ACCESS_KEY, TEST_SECRET_KEY
from zalando.s3server import free_port_block

STACK = [sys.executable, str(REPO / "infra" / "stack.py")]
RETRAIN_EXPERIMENTS = ["fashion_cnn"]


def _free_port() -> int:
    """A free port for a server, below the ephemeral ports (a client's source port cannot take it)."""
    return free_port_block(1)


@dataclass
class LiveStack:
    env: dict[str, str]
    work_dir: Path
    port: int

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stack(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*STACK, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, PREFECT_API_URL=self.api, PREFECT_HOME=str(self.work_dir / "prefect"))
        exe = str(Path(sys.executable).parent / "prefect")
        return subprocess.run(
            [exe, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    @staticmethod
    def _open(req: urllib.request.Request | str) -> bytes:
        """urlopen, retrying 503 like Prefect's own client does: the server answers 503 while its SQLite
        database is locked by a flow run's writes (seen when a PATCH met the retrain run's last writes)."""
        for attempt in range(6):
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.read()
            except urllib.error.HTTPError as e:
                if e.code != 503 or attempt == 5:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def post(self, path: str, body: dict[str, Any] | list[Any] | None = None) -> Any:
        req = urllib.request.Request(
            f"{self.api}{path}",
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return json.loads(self._open(req) or b"null")

    def patch(self, path: str, body: dict[str, Any]) -> None:
        req = urllib.request.Request(
            f"{self.api}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="PATCH",
        )
        self._open(req)

    def get(self, path: str) -> Any:
        return json.loads(self._open(f"{self.api}{path}"))

    def settings(self):  # the Settings the worker's flow runs see: the stack's env, nothing of ours
        from zalando.settings import Settings

        keys = {k[len("ZALANDO_") :].lower(): v for k, v in self.env.items() if k.startswith("ZALANDO_")}
        keys.pop("prefect_port", None)
        keys.pop("home", None)
        # Settings also reads os.environ: a session fixture of another tier (flow_env sets
        # ZALANDO_S3_ENDPOINT to the tests' own S3 server) must not point us at another server
        ours = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("ZALANDO_")}
        try:
            return Settings(**keys)
        finally:
            os.environ.update(ours)


def _log_tails(work_dir: Path) -> str:
    out = []
    for name in ("prefect-server", "worker"):
        p = work_dir / "stack" / f"{name}.log"
        if p.exists():
            out.append(f"--- {name}.log\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(out)


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    work = tmp_path_factory.mktemp("stack")
    port = _free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ZALANDO_", "PREFECT_"))
    }  # nothing of the developer's own stack leaks in
    env.update(
        ZALANDO_WORK_DIR=str(work),
        ZALANDO_PREFECT_PORT=str(port),
        ZALANDO_S3_PORT=str(free_port_block()),
        ZALANDO_LAKE_URI="s3://zalando-e2e/lake",
        ZALANDO_S3_ACCESS_KEY=TEST_ACCESS_KEY,
        ZALANDO_S3_SECRET_KEY=TEST_SECRET_KEY,
        ZALANDO_DATA_SOURCE=str(MINI_DIR),
        ZALANDO_PROFILE="quick",
        ZALANDO_TORCH_THREADS="1",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        CODECARBON_LOG_LEVEL="error",
    )
    live = LiveStack(env=env, work_dir=work, port=port)
    up = live.stack("up")
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}\n{_log_tails(work)}"
        yield live
    finally:
        down = live.stack("down", timeout=90)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="session")
def deployed(live_stack: LiveStack) -> LiveStack:
    res = live_stack.stack("deploy", timeout=180)
    assert res.returncode == 0, f"deploy failed:\n{res.stdout}\n{res.stderr}"
    return live_stack


@dataclass
class FlowRunResult:
    id: str
    name: str
    state: str
    seconds: float
    trigger_output: str


@pytest.fixture(scope="session")
def retrain_run(deployed: LiveStack) -> FlowRunResult:
    """`prefect deployment run training/retrain` (through `infra/stack.py trigger`), waited for."""
    t0 = time.monotonic()
    res = deployed.stack(
        "trigger",
        "--deployment",
        "training/retrain",
        "--param",
        "profile=quick",
        "--param",
        f"experiments={json.dumps(RETRAIN_EXPERIMENTS)}",
        "--param",
        "reason=e2e test",
        "--timeout",
        "200",
        timeout=230,
    )
    seconds = time.monotonic() - t0
    # the retrain deployment's runs only: scheduled deployments (nightly, feedback/kpis) have future
    # runs that sort first by expected start time
    retrain = [d["id"] for d in deployed.post("/deployments/filter", {}) if d["name"] == "retrain"]
    runs = deployed.post(
        "/flow_runs/filter",
        {"deployments": {"id": {"any_": retrain}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 5},
    )
    runs = [r for r in runs if r["parameters"].get("reason") == "e2e test"]
    assert runs, f"no retrain flow run found:\n{res.stdout}\n{res.stderr}\n{_log_tails(deployed.work_dir)}"
    run = runs[0]
    return FlowRunResult(
        id=run["id"],
        name=run["name"],
        state=run["state"]["type"],
        seconds=seconds,
        trigger_output=f"{res.stdout}\n{res.stderr}\n{_log_tails(deployed.work_dir)}",
    )
