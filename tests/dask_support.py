"""A real Dask cluster for the integration tests: separate processes on 127.0.0.1, as a deployment runs them.

``dask scheduler --host 127.0.0.1 --port P --no-dashboard`` and one ``dask worker tcp://127.0.0.1:P
--nthreads 1 --host 127.0.0.1 --no-dashboard --name wN`` per worker (each a nanny and its worker process),
started from the shared virtualenv's ``dask`` command with this tree on ``PYTHONPATH``, so the workers
import the same ``zalando`` as the tests. :func:`local_cluster` waits until every worker is registered
and, on the way out, stops them all (terminate, wait, kill on timeout), leaving no process behind.
:meth:`DaskCluster.kill_worker` loses a worker mid-task the way a machine is lost (SIGKILL to the nanny
and its worker at once, no goodbye to the scheduler).

Use it through the ``dask_cluster`` fixture (two workers, w1 and w2, module-scoped), or
``with local_cluster(folder, workers=("a", "b", "c")) as cluster:`` for another shape.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from zalando.s3server import free_port_block

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0  # 2 busy cores: a worker with its nanny takes 5-20 s to register
STOP_TIMEOUT_S = 15.0


def dask_command() -> list[str]:
    """The ``dask`` command beside this interpreter (the shared venv's), else ``python -m distributed.cli``."""
    exe = Path(sys.executable).with_name("dask")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dask"]


def free_port() -> int:
    """A free port for a server, below the ephemeral ports (a client's source port cannot take it)."""
    return free_port_block(1)


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment with this tree first on PYTHONPATH, for every cluster process."""
    env = dict(os.environ)
    paths = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("DASK_DISTRIBUTED__ADMIN__LOG_LENGTH", "1000")
    env.update(extra or {})
    return env


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The process and every descendant still alive (a nanny's worker, the worker's own children)."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _end(procs: list[psutil.Process], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, SIGKILL whatever is left, and reap it."""
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@dataclass
class DaskCluster:
    """A running scheduler and its named workers; ``address`` is what a Client (or a DaskTaskRunner) takes."""

    address: str
    folder: Path
    env: dict[str, str]
    nthreads: int
    scheduler: subprocess.Popen
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    _clients: list[Any] = field(default_factory=list)

    # --- use -------------------------------------------------------------------------------------------

    def client(self, **kw: Any) -> Any:
        """A distributed.Client on the cluster (closed when the cluster stops)."""
        from distributed import Client

        client = Client(self.address, timeout="30s", **kw)
        self._clients.append(client)
        return client

    def worker_names(self) -> dict[str, str]:
        """{worker address: name} of the workers the scheduler knows now."""
        with self._temporary_client() as c:
            return {addr: str(w["name"]) for addr, w in c.scheduler_info(n_workers=-1)["workers"].items()}

    def log(self, name: str) -> str:
        """The captured output of ``scheduler`` or a worker."""
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    # --- workers ---------------------------------------------------------------------------------------

    def start_worker(self, name: str, *args: str) -> subprocess.Popen:
        """Start one more worker called ``name`` (extra ``dask worker`` flags in ``args``); not waited for."""
        if name in self.workers and self.workers[name].poll() is None:
            raise ValueError(f"worker {name!r} is already running")
        cmd = [
            *dask_command(), "worker", self.address, "--nthreads", str(self.nthreads), "--host", "127.0.0.1",
            "--no-dashboard", "--name", name, "--local-directory", str(self.folder / name),
            "--death-timeout", "60", *args,
        ]  # fmt: skip
        self.workers[name] = _spawn(cmd, self.folder / f"{name}.log", self.env)
        return self.workers[name]

    def wait_for_workers(self, names: Sequence[str], timeout: float = START_TIMEOUT_S) -> None:
        """Until every one of ``names`` is registered with the scheduler (a worker that exits fails fast)."""
        deadline = time.monotonic() + timeout
        with self._temporary_client() as c:
            c.wait_for_workers(1, timeout=timeout)
            while True:
                known = {str(w["name"]) for w in c.scheduler_info(n_workers=-1)["workers"].values()}
                if set(names) <= known:
                    return
                for n in names:
                    if self.workers[n].poll() is not None:
                        raise RuntimeError(
                            f"dask worker {n} exited ({self.workers[n].returncode}):\n{self.log(n)[-3000:]}"
                        )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"workers {sorted(set(names) - known)} did not register in {timeout:.0f} s"
                    )
                time.sleep(0.2)

    def kill_worker(self, name: str) -> None:
        """Lose ``name`` as a machine is lost: SIGKILL to its nanny and worker together, then reap them."""
        procs = _tree(self.workers[name])
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.workers[name].wait(timeout=10)

    # --- stop ------------------------------------------------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Close the clients, then end the workers and the scheduler (terminate, wait, kill)."""
        for c in self._clients:
            try:
                c.close(timeout=5)
            except Exception:  # noqa: BLE001 - a client of a dead cluster may not close cleanly
                pass
        self._clients.clear()
        workers = [p for proc in self.workers.values() for p in _tree(proc)]
        _end(workers, timeout)
        _end(_tree(self.scheduler), timeout)
        for proc in [*self.workers.values(), self.scheduler]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def pids(self) -> list[int]:
        """Every process of the cluster still alive (nannies, workers, the scheduler)."""
        return [
            p.pid for proc in [self.scheduler, *self.workers.values()] for p in _tree(proc) if p.is_running()
        ]

    @contextmanager
    def _temporary_client(self) -> Iterator[Any]:
        from distributed import Client

        with Client(self.address, timeout="30s") as c:
            yield c


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(log.parent))


def start_cluster(
    folder: Path,
    workers: Sequence[str] = ("w1", "w2"),
    *,
    nthreads: int = 1,
    env: dict[str, str] | None = None,
    worker_args: Sequence[str] = (),
    timeout: float = START_TIMEOUT_S,
) -> DaskCluster:
    """Start a scheduler on a free port and the named workers, and wait until all are registered.

    ``env`` is added to this process's environment for every cluster process (the workers read their
    ``ZALANDO_*`` settings from it: set them here, not after the start); ``worker_args`` go to every
    ``dask worker`` (``--resources threads=1``, ``--no-nanny``, ...).
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    full_env = worker_env(env)
    cmd = [
        *dask_command(), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
        "--idle-timeout", "900",  # if the tests die without stopping it, it goes by itself
    ]  # fmt: skip
    cluster = DaskCluster(
        address, folder, full_env, nthreads, _spawn(cmd, folder / "scheduler.log", full_env)
    )
    try:
        _wait_for_port(port, cluster.scheduler, timeout, folder / "scheduler.log")
        for name in workers:
            cluster.start_worker(name, *worker_args)
        cluster.wait_for_workers(workers, timeout=timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"dask scheduler exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"dask scheduler did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextmanager
def local_cluster(folder: Path, workers: Sequence[str] = ("w1", "w2"), **kw: Any) -> Iterator[DaskCluster]:
    """A cluster for the ``with`` block; everything it started is stopped when the block ends."""
    cluster = start_cluster(folder, workers, **kw)
    try:
        yield cluster
    finally:
        cluster.stop()  # the logs stay in ``folder``


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """A scheduler and two one-thread workers, w1 and w2, on 127.0.0.1, for one test module.

    A test that kills a worker should start its own with :func:`local_cluster` (or restart it with
    ``start_worker`` + ``wait_for_workers``), so the next test finds both.
    """
    with local_cluster(tmp_path_factory.mktemp("dask")) as cluster:
        yield cluster
