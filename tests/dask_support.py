"""A real Dask cluster for tests: `dask scheduler` and N `dask worker` processes on 127.0.0.1.

Each is a separate process, started with the command line an operator would type, in the
environment it is given (the ZALANDO_* settings of the lake: workers read their data there) and
with this checkout on PYTHONPATH (the workers import `tasks/` to run a Prefect task). Workers run
without a nanny, so a killed worker stays dead, as a lost machine would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _dask_command() -> str:
    """The `dask` command of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "dask"
    if not candidate.is_file():
        raise RuntimeError(f"no `dask` command next to {sys.executable}: is distributed installed?")
    return str(candidate)


@dataclass
class DaskCluster:
    """A running scheduler and its workers (by name), with their logs."""

    address: str
    log_dir: Path
    scheduler: subprocess.Popen[bytes]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @contextlib.contextmanager
    def client(self, timeout: float = 30) -> Iterator[Any]:
        """A client of the scheduler (never the process-wide default)."""
        from distributed import Client

        with Client(self.address, timeout=timeout, set_as_default=False) as client:
            yield client

    def worker_info(self) -> dict[str, dict[str, Any]]:
        """The scheduler's view of every live worker, by name (address, pid, nthreads, resources)."""
        with self.client() as client:
            workers = client.scheduler_info(n_workers=-1)["workers"]
        return {str(w["name"]): {"address": addr, **w} for addr, w in workers.items()}

    def processing(self) -> dict[str, list[str]]:
        """The task keys each worker is running now, by worker address."""
        with self.client() as client:
            return {addr: list(keys) for addr, keys in client.processing().items()}

    def kill_worker(self, name: str) -> None:
        """SIGKILL one worker process, as if its machine died; waits until it is gone."""
        proc = self.workers[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def logs(self, tail: int = 3000) -> str:
        """The end of every process's log (for assertion messages)."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name}\n{text[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.workers.values(), self.scheduler]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _start(cmd: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own handle
        return subprocess.Popen(cmd, cwd=REPO, env=dict(env), stdout=out, stderr=subprocess.STDOUT)


def _wait_for_scheduler(
    proc: subprocess.Popen[bytes], scheduler_file: Path, timeout: float, log: Path
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return str(json.loads(scheduler_file.read_text())["address"])
        time.sleep(0.2)
    raise RuntimeError(f"dask scheduler not up after {timeout}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def dask_cluster(
    log_dir: Path,
    n_workers: int = 2,
    *,
    nthreads: int = 1,
    resources: Mapping[str, float] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 180,
) -> Iterator[DaskCluster]:
    """`dask scheduler` plus `n_workers` × `dask worker ADDRESS --nthreads N [--resources …]`.

    Workers are named w1, w2, …; ``env`` is added to this process's environment (PYTHONPATH
    starts with this checkout). Everything is stopped on exit, killed workers included.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    dask = _dask_command()
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH")) if p)
    scheduler_file = log_dir / "scheduler.json"
    scheduler_log = log_dir / "scheduler.log"
    scheduler = _start(
        [
            dask,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
            "--idle-timeout",
            "900",  # a safety net: a scheduler left behind by a killed test run goes away
        ],
        full_env,
        scheduler_log,
    )
    cluster = DaskCluster(address="", log_dir=log_dir, scheduler=scheduler)
    try:
        try:
            cluster.address = _wait_for_scheduler(scheduler, scheduler_file, timeout, scheduler_log)
            for i in range(1, n_workers + 1):
                name = f"w{i}"
                cmd = [dask, "worker", cluster.address, "--name", name, "--nthreads", str(nthreads)]
                cmd += ["--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--memory-limit", "0"]
                cmd += ["--local-directory", str(log_dir / name), "--death-timeout", "60"]
                if resources:
                    cmd += ["--resources", ",".join(f"{k}={v}" for k, v in resources.items())]
                cluster.workers[name] = _start(cmd, full_env, log_dir / f"{name}.log")
            with cluster.client(timeout=timeout) as client:
                client.wait_for_workers(n_workers, timeout=timeout)
        except Exception as exc:  # the start-up failed: say why, from the processes' own logs
            raise RuntimeError(f"the Dask cluster did not start: {exc}\n{cluster.logs()}") from exc
        yield cluster
    finally:
        cluster.stop()
