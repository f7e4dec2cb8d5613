"""The CLI finds the local stack (`infra/stack.py up`) of its work folder and uses its Prefect server.

The "Prefect server" here is a tiny http.server answering ``/api/health``, started by the stack's own
``start_server`` (its command swapped for the stand-in), so the PID file and stack.json are the ones
`up` writes. Dead, silent, hung and foreign processes fall back to a temporary server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import load_stack_module
from zalando import cli, cli_common, cli_score, local_stack
from zalando.errors import ZalandoError
from zalando.local_stack import PREFECT_SERVER, running_prefect
from zalando.s3server import free_port_block, pid_alive
from zalando.settings import Settings

# a stand-in for `prefect server start --host H --port N`: answers GET /api/health with 200 "true"
FAKE_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

port = int(sys.argv[sys.argv.index("--port") + 1])


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/api/health"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"true" if ok else b"")

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""
PREFECT_ENV = (
    "PREFECT_API_URL",
    "PREFECT_HOME",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
    *cli_common.HEARTBEAT_SETTINGS,
)


def _stack_module() -> Any:
    return load_stack_module("zalando_stack_detect")


@pytest.fixture
def clean_prefect_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PREFECT_* variable of the developer's shell; whatever `flow_env` sets is undone afterwards."""
    for name in PREFECT_ENV:
        monkeypatch.setenv(name, "")  # recorded, so the teardown restores the original (or its absence)
        monkeypatch.delenv(name)


@pytest.fixture
def live_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A stack whose `prefect-server` `up` started and that answers /api/health on a free port."""
    mod = _stack_module()
    monkeypatch.setattr(mod.Stack, "_prefect", lambda self: [sys.executable, "-c", FAKE_SERVER, "prefect"])
    stack = mod.Stack.from_env(
        {"ZALANDO_WORK_DIR": str(tmp_path / "work"), "ZALANDO_PREFECT_PORT": str(free_port_block(1))}
    )
    assert stack.start_server()
    pid = stack._running(PREFECT_SERVER)
    assert pid is not None
    stack._save_started(["s3", PREFECT_SERVER, "worker"])  # what `up` records
    try:
        yield stack
    finally:
        stack._stop(PREFECT_SERVER)
        if pid_alive(pid):  # a test rewrote the PID file (another program's pid): stop ours by its pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])


def _record_server(work: Path, pid: int, port: int) -> None:
    """stack.json and prefect-server.pid as `up` writes them, for a process the test chose."""
    local_stack.state_dir(work).mkdir(parents=True, exist_ok=True)
    local_stack.stack_file(work).write_text(json.dumps({"started": [PREFECT_SERVER]}))
    cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    local_stack.pid_file(work, PREFECT_SERVER).write_text(
        json.dumps({"pid": pid, "cmd": cmd, "started_at": time.time()})
    )


def test_a_running_stack_is_found_with_its_api_and_prefect_home(live_stack: Any) -> None:
    found = running_prefect(live_stack.work_dir)
    assert found is not None
    assert found.api_url == live_stack.api_url == f"http://127.0.0.1:{live_stack.prefect_port}/api"
    assert found.home == live_stack.prefect_home == live_stack.work_dir / "prefect"


def test_flow_env_points_prefect_at_the_stack(live_stack: Any, clean_prefect_env: None) -> None:
    said = cli_common.flow_env(Settings(work_dir=live_stack.work_dir))
    assert os.environ["PREFECT_API_URL"] == live_stack.api_url
    assert os.environ["PREFECT_HOME"] == str(live_stack.prefect_home)
    assert said.startswith(live_stack.api_url) and "local stack" in said


def test_an_explicit_prefect_api_url_wins_over_the_stack(
    live_stack: Any, clean_prefect_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    said = cli_common.flow_env(Settings(work_dir=live_stack.work_dir))
    assert os.environ["PREFECT_API_URL"] == "http://prefect.example:4200/api"
    assert "PREFECT_HOME" not in os.environ
    assert said == "http://prefect.example:4200/api (PREFECT_API_URL)"


def test_without_a_stack_a_temporary_server_keeps_the_work_folder_home(
    tmp_path: Path, clean_prefect_env: None
) -> None:
    said = cli_common.flow_env(Settings(work_dir=tmp_path / "work"))
    assert "PREFECT_API_URL" not in os.environ
    assert os.environ["PREFECT_HOME"] == str((tmp_path / "work" / "prefect").resolve())
    assert (tmp_path / "work" / "prefect").is_dir()
    assert said.startswith("a temporary server")


def test_the_commands_flow_runs_send_no_heartbeats_unless_configured(
    tmp_path: Path, clean_prefect_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import Settings as PrefectSettings

    cli_common.flow_env(Settings(work_dir=tmp_path))
    assert PrefectSettings().flows.heartbeat_frequency is None  # no thread to join at each run's end
    monkeypatch.delenv("PREFECT_FLOWS")
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    cli_common.flow_env(Settings(work_dir=tmp_path))
    assert "PREFECT_FLOWS" not in os.environ and PrefectSettings().flows.heartbeat_frequency == 60


def test_a_stack_json_whose_server_died_is_ignored(tmp_path: Path, clean_prefect_env: None) -> None:
    dead = _spawn("prefect")
    dead.kill()
    dead.wait()
    work = tmp_path / "work"
    _record_server(work, dead.pid, free_port_block(1))
    assert running_prefect(work) is None
    assert cli_common.flow_env(Settings(work_dir=work)).startswith("a temporary server")
    assert "PREFECT_API_URL" not in os.environ


def test_a_live_process_that_does_not_answer_is_ignored(tmp_path: Path) -> None:
    silent = _spawn("prefect")  # alive, a "prefect" command line, but nothing listens on its port
    try:
        _record_server(tmp_path, silent.pid, free_port_block(1))
        assert running_prefect(tmp_path) is None
    finally:
        silent.kill()
        silent.wait()


def test_a_server_that_hangs_costs_at_most_the_health_timeout(tmp_path: Path) -> None:
    hung = _spawn("prefect")
    with socket.socket() as listener:  # accepts connections (the kernel's backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        try:
            _record_server(tmp_path, hung.pid, listener.getsockname()[1])
            t0 = time.monotonic()
            assert running_prefect(tmp_path, timeout=0.3) is None
            assert time.monotonic() - t0 < 2.0
        finally:
            hung.kill()
            hung.wait()


def test_a_reused_pid_of_another_program_is_ignored(live_stack: Any) -> None:
    other = _spawn()  # alive, but its command line has nothing of Prefect
    try:
        info = json.loads(local_stack.pid_file(live_stack.work_dir, PREFECT_SERVER).read_text())
        _record_server(live_stack.work_dir, other.pid, int(info["cmd"][-1]))
        assert running_prefect(live_stack.work_dir) is None  # the port still answers: the pid decides
    finally:
        other.kill()
        other.wait()


def test_a_server_that_up_did_not_start_is_not_the_stack(live_stack: Any) -> None:
    live_stack._save_started(["s3"])  # e.g. `down` stopped the server part, or another tool started it
    assert running_prefect(live_stack.work_dir) is None
    local_stack.stack_file(live_stack.work_dir).unlink()
    assert running_prefect(live_stack.work_dir) is None
    local_stack.stack_file(live_stack.work_dir).write_text("{not json")
    assert running_prefect(live_stack.work_dir) is None


def test_zalando_score_runs_its_flow_on_the_stack_and_says_so(
    live_stack: Any,
    clean_prefect_env: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZALANDO_WORK_DIR", str(live_stack.work_dir))
    monkeypatch.setenv("ZALANDO_LAKE_URI", (tmp_path / "lake").as_uri())
    monkeypatch.setattr(cli_score, "setup_logging", lambda verbose: None)  # keep pytest's log handlers
    seen: list[str | None] = []
    told: list[str | None] = []

    def score_one(lake: Any, settings: Any, location: str, **kw: Any) -> dict[str, Any]:
        seen.append(os.environ.get("PREFECT_API_URL"))  # what the flow's Prefect client would use
        told.append(kw.get("prefect_api"))  # what score_one logs once the input checks pass
        raise ZalandoError("stop here: the flow is not the point")

    monkeypatch.setattr(cli_score, "score_one", score_one)
    r = CliRunner().invoke(cli.app, ["score", "inbox/batch_date=2026-05-01", "--model-version", "v1"])
    assert r.exit_code == 2 and "stop here" in r.output, r.output
    assert seen == [live_stack.api_url]
    assert told == [f"{live_stack.api_url} (the local stack's server)"]


def test_labels_import_sends_its_kpis_through_the_stacks_server(
    live_stack: Any, clean_prefect_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the stack up, the KPI measurement of `labels import` runs the `feedback` flow on the stack's
    server, so its alarm event reaches the automation (without it: the step, the alarm sent later)."""
    import flows.feedback
    from zalando import cli_review

    seen: list[str | None] = []

    def labelled_kpis(batch_id: str, profile: Any) -> dict[str, Any]:
        seen.append(os.environ.get("PREFECT_API_URL"))
        return {"batches": {}}

    monkeypatch.setattr(flows.feedback, "labelled_kpis", labelled_kpis)
    settings = Settings(work_dir=live_stack.work_dir)
    assert cli_review._measure_kpis(settings, None, ["b1", "b2"]) == []
    assert seen == [live_stack.api_url, live_stack.api_url]


def test_a_server_port_block_lies_below_the_kernels_ephemeral_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outgoing connection's source port must not land in a block chosen for a server (it took the
    e2e stack's filer port once, between the check and the bind)."""
    from zalando import s3server

    low, _ = s3server.ephemeral_ports()
    blocks = [free_port_block() for _ in range(30)]
    assert all(20000 <= p and p + 11 <= low for p in blocks), (low, blocks)
    # the range is the kernel's: another one is honoured, and one that leaves no room falls back
    ranges = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(s3server, "EPHEMERAL_RANGE_FILE", ranges)
    ranges.write_text("25000\t60999\n")
    assert all(p + 11 <= 25000 for p in (free_port_block() for _ in range(30)))
    ranges.write_text("20005 60999\n")
    assert all(20000 <= p < 60000 for p in (free_port_block() for _ in range(5)))
    ranges.write_text("garbage")
    assert s3server.ephemeral_ports() == (32768, 60999)


def test_a_process_just_started_is_recognised_by_its_command_line() -> None:
    """Right after Popen returns, /proc/<pid>/cmdline can still be empty (the kernel sets the new
    program's arguments after closing the close-on-exec files): `up` took its own fresh scorer and
    Prefect server for dead ("exited at start", with an empty log)."""
    empty = 0
    for _ in range(300):
        proc = subprocess.Popen(
            ["/bin/sleep", "5"], start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        try:
            cmdline = local_stack.process_cmdline(proc.pid)
            empty += "sleep" not in cmdline
        finally:
            proc.kill()
            proc.wait()
    assert empty == 0, f"{empty} of 300 fresh processes read without their command line"
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    assert local_stack.process_cmdline(gone.pid) == ""  # a process that is gone: at once, no retries
