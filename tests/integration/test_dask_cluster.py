"""The test cluster itself: separate scheduler and worker processes on 127.0.0.1 that import this tree's
``zalando``, run tasks side by side on different workers, survive a worker killed mid-task, and leave no
process behind."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.dask_support import DaskCluster, local_cluster
from tests.dask_support import dask_cluster as dask_cluster  # the fixture, re-exported for this module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]


def _where_and_when(seconds: float) -> tuple[str, float, float]:
    from distributed import get_worker

    start = time.time()
    time.sleep(seconds)
    return str(get_worker().name), start, time.time()


def _zalando_file() -> str:
    import zalando

    return zalando.__file__


def _once_slow(marker: str) -> str:
    """The first run notes its worker in ``marker`` and hangs (to be killed); a rerun returns at once."""
    from distributed import get_worker

    name = str(get_worker().name)
    path = Path(marker)
    if not path.exists():
        path.write_text(name)
        time.sleep(600)
    return name


def test_workers_are_separate_processes_that_import_this_tree(dask_cluster: DaskCluster) -> None:
    assert sorted(dask_cluster.worker_names().values()) == ["w1", "w2"]
    client = dask_cluster.client()
    files = client.run(_zalando_file)
    assert len(files) == 2 and all(f == str(REPO / "zalando" / "__init__.py") for f in files.values())
    pids = client.run(lambda: __import__("os").getpid())
    ours = {psutil.Process().pid}
    assert len(set(pids.values())) == 2 and not ours & set(pids.values())


def test_two_tasks_run_at_the_same_time_on_different_workers(dask_cluster: DaskCluster) -> None:
    client = dask_cluster.client()
    pinned = client.gather(
        [client.submit(_where_and_when, 0.0, workers=[n], pure=False) for n in ("w1", "w2")]
    )
    assert [p[0] for p in pinned] == ["w1", "w2"]
    # unpinned: one thread per worker, so the scheduler puts the second task on the other worker
    (a, a0, a1), (b, b0, b1) = client.gather(
        [client.submit(_where_and_when, 3.0, pure=False) for _ in range(2)]
    )
    assert {a, b} == {"w1", "w2"}
    assert max(a0, b0) < min(a1, b1)  # they overlapped


def test_a_task_on_a_killed_worker_finishes_on_the_other(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "dask") as cluster:
        client = cluster.client()
        marker = tmp_path / "first-run-on"
        future = client.submit(_once_slow, str(marker), workers=["w1"], allow_other_workers=True, pure=False)
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.1)
        assert marker.read_text() == "w1"
        cluster.kill_worker("w1")
        assert future.result(timeout=120) == "w2"
        assert cluster.workers["w1"].poll() is not None
        assert sorted(cluster.worker_names().values()) == ["w2"]
        pids = cluster.pids()
        assert pids  # the scheduler and w2 (its nanny and worker) still run
    assert not [
        p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]


def _env(name: str) -> str | None:
    import os

    return os.environ.get(name)


def test_stopping_leaves_no_process_behind(tmp_path: Path) -> None:
    kw = dict(workers=("solo",), env={"ZALANDO_PROFILE": "quick"}, worker_args=("--resources", "threads=1"))
    with local_cluster(tmp_path / "dask", **kw) as cluster:
        pids = cluster.pids()
        assert len(pids) >= 3  # scheduler, nanny, worker
        client = cluster.client()
        assert client.submit(sum, [1, 2, 3], resources={"threads": 1}).result(timeout=60) == 6
        assert list(client.run(_env, "ZALANDO_PROFILE").values()) == ["quick"]
        (info,) = client.scheduler_info()["workers"].values()
        assert info["resources"] == {"threads": 1}
    assert not [
        p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
