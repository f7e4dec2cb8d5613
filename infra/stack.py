"""The local stack without Docker: Prefect server, embedded S3 (SeaweedFS), a process worker and
the warm scorer (infra/scorer.py, which `zalando score` hands its batches to).

    python infra/stack.py up        # start what is not running yet, in the background
    python infra/stack.py deploy    # work pool + every deployment of prefect.yaml (+ the drift automation)
    python infra/stack.py trigger   # run the `nightly` deployment now and wait for its end
    python infra/stack.py status
    python infra/stack.py down      # stop exactly what `up` started, nothing else

State lives under the work folder (``ZALANDO_WORK_DIR``, default ``.zalando/``): ``prefect/`` is
PREFECT_HOME (database, results, profiles: ~/.prefect is never touched), ``stack/`` holds logs,
PID files and ``stack.json`` (what `up` started). Every server binds to 127.0.0.1.

Ports: ``ZALANDO_PREFECT_PORT`` (default 4200), ``ZALANDO_S3_PORT`` (default 8333) and
``ZALANDO_SCORER_PORT`` (default: a free one, written with the scorer's token to
``stack/scorer.json``). An S3 endpoint given in ``ZALANDO_S3_ENDPOINT`` (MinIO, AWS) is used as is and
no S3 server is started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zalando import local_stack  # noqa: E402
from zalando.local_stack import PREFECT_SERVER, SCORER, http_ok  # noqa: E402
from zalando.s3server import free_port_block, pid_alive  # noqa: E402

POOL = "zalando"
GPU_POOL = "gpu"  # prefect.yaml's training/paper-gpu runs there
SERVER_TIMEOUT_S = 120.0
WORKER_TIMEOUT_S = 90.0
SCORER_TIMEOUT_S = 180.0  # imports torch, prefect and pyiceberg and loads the champion on 2 busy cores


class StackError(RuntimeError):
    """A component could not be started or stopped; the message says which and why."""


@dataclass
class Stack:
    """The processes `make up` manages, all derived from the environment and the work folder."""

    work_dir: Path
    prefect_port: int
    env: dict[str, str]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Stack:
        environ = dict(os.environ if environ is None else environ)
        work = Path(environ.get("ZALANDO_WORK_DIR", ".zalando"))
        if not work.is_absolute():
            work = (REPO / work).resolve()
        port = int(environ.get("ZALANDO_PREFECT_PORT", "4200"))
        return cls(work_dir=work, prefect_port=port, env=environ)

    # ------------------------------------------------------------------ paths and environment
    @property
    def state_dir(self) -> Path:
        return local_stack.state_dir(self.work_dir)

    @property
    def prefect_home(self) -> Path:
        return local_stack.prefect_home(self.work_dir)

    @property
    def api_url(self) -> str:
        return local_stack.api_url(self.prefect_port)

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"

    def prefect_env(self) -> dict[str, str]:
        """Environment for every Prefect process of the stack (server, worker, CLI calls)."""
        env = dict(self.env)
        env.update(
            PREFECT_HOME=str(self.prefect_home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.prefect_port),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_CLI_PROMPT="false",
            PREFECT_CLI_COLORS="false",
            PREFECT_WORKER_QUERY_SECONDS=env.get("PREFECT_WORKER_QUERY_SECONDS", "5"),
            ZALANDO_WORK_DIR=str(self.work_dir),
            # where the deployments' pull step (set_working_directory) finds the code
            ZALANDO_HOME=str(REPO),
            PYTHONUNBUFFERED="1",
        )
        return env

    def settings(self):  # -> zalando.settings.Settings (imported lazily: no work at import time)
        from zalando.settings import Settings

        with _patched_environ(self.prefect_env()):
            return Settings()

    def _prefect(self) -> list[str]:
        return [str(Path(sys.executable).parent / "prefect")]

    # ------------------------------------------------------------------ bookkeeping
    def _pid_file(self, name: str) -> Path:
        return local_stack.pid_file(self.work_dir, name)

    def _log_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def _running(self, name: str) -> int | None:
        """PID of our process `name` when it is alive and still the program we started."""
        return local_stack.running_pid(self.work_dir, name)

    def _load_started(self) -> list[str]:
        return local_stack.read_started(self.work_dir)

    def _save_started(self, started: list[str]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        local_stack.stack_file(self.work_dir).write_text(json.dumps({"started": started}, indent=2))

    def _spawn(self, name: str, args: list[str]) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log_file(name), "ab") as logf:
            proc = subprocess.Popen(
                args,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.prefect_env(),
                cwd=REPO,
                start_new_session=True,  # its own process group: `down` stops it and its children
            )
        self._pid_file(name).write_text(json.dumps({"pid": proc.pid, "cmd": args, "started_at": time.time()}))
        return proc.pid

    def _stop(self, name: str, timeout: float = 20.0) -> bool:
        pid = self._running(name)
        if pid is None:
            self._pid_file(name).unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.2)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self._pid_file(name).unlink(missing_ok=True)
        return True

    def _log_tail(self, name: str, lines: int = 5) -> str:
        try:
            text = self._log_file(name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    # ------------------------------------------------------------------ components
    def start_s3(self) -> bool:
        """Start the embedded S3 server when the settings call for one. True when this call started it."""
        from zalando.lake import Lake
        from zalando.s3server import server_for

        settings = self.settings()
        if not settings.embedded_s3:
            return False
        server = server_for(settings)
        server.state_dir.mkdir(parents=True, exist_ok=True)
        started = server.start()
        Lake.from_settings(settings).ensure_ready()  # bucket exists before any flow runs
        return started

    def stop_s3(self) -> bool:
        from zalando.s3server import server_for

        return server_for(self.settings()).stop()

    def start_server(self) -> bool:
        if self._running(PREFECT_SERVER):
            self._wait_server()
            return False
        if http_ok(f"{self.api_url}/health") or not _port_free(self.prefect_port):
            raise StackError(
                f"Prefect server: port {self.prefect_port} is already used by another program; "
                "set ZALANDO_PREFECT_PORT to a free port"
            )
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        self._spawn(
            PREFECT_SERVER,
            [*self._prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)],
        )
        self._wait_server()
        return True

    def _wait_server(self) -> None:
        self._wait_healthy(PREFECT_SERVER, "Prefect server", f"{self.api_url}/health", SERVER_TIMEOUT_S)

    def _wait_healthy(self, name: str, what: str, health_url: str, timeout_s: float) -> None:
        """Until ``health_url`` answers 200; a StackError when component ``name`` exits or it takes
        longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if http_ok(health_url):
                return
            if self._running(name) is None:
                raise StackError(f"{what} exited at start: {self._log_tail(name)}")
            time.sleep(0.5)
        raise StackError(
            f"{what} did not answer on {health_url} within {timeout_s:.0f}s; see {self._log_file(name)}"
        )

    def start_worker(self) -> bool:
        if self._running("worker"):
            return False
        self._spawn(
            "worker",
            [
                *self._prefect(),
                "worker",
                "start",
                "--pool",
                POOL,
                "--type",
                "process",
                "--name",
                f"zalando-local-{self.prefect_port}",
                "--limit",
                "1",
            ],
        )
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._worker_online():
                return True
            if self._running("worker") is None:
                raise StackError(f"Prefect worker exited at start: {self._log_tail('worker')}")
            time.sleep(1.0)
        raise StackError(
            f"Prefect worker did not come online within {WORKER_TIMEOUT_S:.0f}s; see {self._log_file('worker')}"
        )

    def _worker_online(self) -> bool:
        req = urllib.request.Request(
            f"{self.api_url}/work_pools/{POOL}/workers/filter",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=3) as r:
                workers = json.loads(r.read())
        except (OSError, ValueError):
            return False
        return any(w.get("status") == "ONLINE" for w in workers)

    def start_scorer(self) -> bool:
        """The warm scorer on 127.0.0.1, with a new token in scorer.json (mode 0600)."""
        if self._running(SCORER):
            self._wait_scorer()
            return False
        port = int(self.env.get("ZALANDO_SCORER_PORT") or free_port_block(1))
        if not _port_free(port):
            raise StackError(
                f"scorer: port {port} is already used by another program; set ZALANDO_SCORER_PORT to a free port"
            )
        state = local_stack.scorer_file(self.work_dir)
        state.parent.mkdir(parents=True, exist_ok=True)
        state.unlink(missing_ok=True)
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"port": port, "token": secrets.token_urlsafe(32)}, f)
        self._spawn(SCORER, [sys.executable, str(REPO / "infra" / "scorer.py"), "--state", str(state)])
        self._wait_scorer()
        return True

    def _scorer_url(self) -> str:
        return f"http://127.0.0.1:{json.loads(local_stack.scorer_file(self.work_dir).read_text())['port']}"

    def _wait_scorer(self) -> None:
        self._wait_healthy(SCORER, "scorer", f"{self._scorer_url()}/health", SCORER_TIMEOUT_S)

    def stop_scorer(self) -> bool:
        stopped = self._stop(SCORER)
        local_stack.scorer_file(self.work_dir).unlink(missing_ok=True)
        return stopped

    # ------------------------------------------------------------------ commands
    def up(self) -> None:
        started = self._load_started()
        steps = [
            ("s3", self.start_s3),
            (PREFECT_SERVER, self.start_server),
            ("worker", self.start_worker),
            (SCORER, self.start_scorer),
        ]
        for name, start in steps:
            if start() and name not in started:
                started.append(name)
            self._save_started(started)
        print(f"stack up: Prefect UI {self.ui_url}  API {self.api_url}")
        print(f"          S3 {self.settings().effective_s3_endpoint}  lake {self.settings().lake_uri}")
        print(f"          scorer {self._scorer_url()} (`zalando score` hands it its batches)")
        print(f"          logs and PID files in {self.state_dir}")

    def down(self) -> None:
        started = self._load_started()
        stops = {"s3": self.stop_s3, SCORER: self.stop_scorer}
        for name in (SCORER, "worker", PREFECT_SERVER, "s3"):
            if name not in started:
                continue
            stopped = stops[name]() if name in stops else self._stop(name)
            print(f"{name}: {'stopped' if stopped else 'was not running'}")
            started.remove(name)
            self._save_started(started)
        if not started:
            local_stack.stack_file(self.work_dir).unlink(missing_ok=True)

    def status(self) -> int:
        from zalando.s3server import server_for

        settings = self.settings()
        s3 = server_for(settings).status() if settings.embedded_s3 else f"external {settings.s3_endpoint}"
        server = "running" if self._running(PREFECT_SERVER) else "stopped"
        if server == "running" and not http_ok(f"{self.api_url}/health"):
            server = "starting"
        worker = "running" if self._running("worker") else "stopped"
        scorer = "running" if local_stack.running_scorer(self.work_dir, timeout=2.0) else "stopped"
        if scorer == "stopped" and self._running(SCORER):
            scorer = "starting"
        print(f"s3:             {s3}")
        print(f"prefect-server: {server} ({self.ui_url})")
        print(f"worker:         {worker} (pool {POOL})")
        print(f"scorer:         {scorer}")
        return 0 if server == "running" and worker == "running" and scorer == "running" else 1

    def run_cli(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> int:
        rc = subprocess.call([*self._prefect(), *args], env=env or self.prefect_env(), cwd=REPO)
        if check and rc != 0:
            raise StackError(f"`prefect {' '.join(args)}` failed with exit code {rc}")
        return rc

    def deploy(self) -> None:
        if not http_ok(f"{self.api_url}/health"):
            raise StackError(f"no Prefect server answers on {self.api_url}; run `make up` first")
        for pool in (POOL, GPU_POOL):  # GPU_POOL: for workers on CUDA machines (none started here)
            if not http_ok(f"{self.api_url}/work_pools/{pool}"):
                self.run_cli("work-pool", "create", pool, "--type", "process")
        env = self.prefect_env()
        # Leave ZALANDO_HOME unresolved in the pull step: the worker's own value is used at run time,
        # so the deployments work from wherever the checkout (or the container) is.
        env.pop("ZALANDO_HOME", None)
        self.run_cli("--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml"), env=env)

    def trigger(self, deployment: str, params: list[str], timeout: int) -> int:
        args = ["deployment", "run", deployment, "--watch", "--watch-timeout", str(timeout)]
        for p in params:
            args += ["--param", p]
        return self.run_cli(*args, check=False)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def _patched_environ(env: dict[str, str]):
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/stack.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "up", help="start S3, the Prefect server, a process worker and the scorer in the background"
    )
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="show what runs")
    sub.add_parser("deploy", help="register the deployments of prefect.yaml")
    trig = sub.add_parser("trigger", help="run a deployment now and wait for it")
    trig.add_argument(
        "--deployment", default="nightly/nightly", help="FLOW/DEPLOYMENT (default nightly/nightly)"
    )
    trig.add_argument("--param", action="append", default=[], help="KEY=VALUE, repeatable")
    trig.add_argument("--timeout", type=int, default=3600, help="seconds to wait (default 3600)")
    args = parser.parse_args(argv)

    stack = Stack.from_env()
    try:
        if args.command == "up":
            stack.up()
        elif args.command == "down":
            stack.down()
        elif args.command == "status":
            return stack.status()
        elif args.command == "deploy":
            stack.deploy()
        elif args.command == "trigger":
            return stack.trigger(args.deployment, args.param, args.timeout)
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a ZalandoError from the S3 server or the lake: one line, no trace
        if type(e).__module__.startswith("zalando"):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
