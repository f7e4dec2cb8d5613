"""Training on a real Dask cluster: `dask scheduler` and two `dask worker --nthreads 1 --resources
experiment=1` processes on 127.0.0.1 (tests/dask_support.py), started with the ZALANDO_* settings of
the session's SeaweedFS lake, under the session's Prefect test harness, `quick` profile, mini data.

Two experiments train in parallel, one per worker, with the same metrics as the local runner; a
worker killed mid-training loses nothing: its experiment finishes on the other one, and the night
completes.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.exceptions import ParameterTypeError

from flows.nightly import nightly
from flows.training import EXPERIMENT_RESOURCE, _check_experiment_workers, training
from tests.dask_support import DaskCluster, local_cluster
from tests.integration.test_flows import _task_runs
from zalando.errors import ConfigError
from zalando.lake import Lake
from zalando.models.bundle import load_bundle
from zalando.settings import load_settings
from zalando.steps.training import read_metric_tables

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
EXPERIMENTS = ["fashion_cnn_small", "fashion_cnn"]
METRIC_COLUMNS = {
    "per_group": ["split", "group_name", "recall", "precision", "npv", "f1", "support"],
    "summary": ["split", "accuracy", "macro_f1"],
}


@pytest.fixture(scope="module")
def dask_lake(
    prefect_harness: None, flow_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lake]:
    """A lake prefix of this module's own (other modules share the session's S3 server), with a work
    folder, so an embedded Iceberg catalog, of its own (the workers share it: one machine)."""
    old = {k: os.environ[k] for k in ("ZALANDO_LAKE_URI", "ZALANDO_WORK_DIR")}
    os.environ["ZALANDO_LAKE_URI"] = f"s3://zalando-dask/{uuid.uuid4().hex[:10]}"
    os.environ["ZALANDO_WORK_DIR"] = str(tmp_path_factory.mktemp("dask-work"))
    try:
        yield Lake.from_settings(load_settings())
    finally:
        os.environ.update(old)


@pytest.fixture(scope="module")
def cluster(dask_lake: Lake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """Two training workers, each started as an operator would on its machine: the lake's ZALANDO_*
    settings exported (endpoint, keys, work folder), `--nthreads 1 --resources experiment=1`."""
    env = {k: v for k, v in os.environ.items() if k.startswith("ZALANDO_")}
    assert {"ZALANDO_S3_ENDPOINT", "ZALANDO_S3_ACCESS_KEY", "ZALANDO_S3_SECRET_KEY"} <= set(env)
    env.pop("ZALANDO_TORCH_THREADS")  # a worker's --nthreads says how many threads torch gets
    args = ("--resources", f"{EXPERIMENT_RESOURCE}=1")
    with local_cluster(tmp_path_factory.mktemp("dask"), ("w1", "w2"), env=env, worker_args=args) as c:
        yield c


def _workers(cluster: DaskCluster) -> dict[str, dict[str, Any]]:
    """The scheduler's view of every live worker, by name (address, nthreads, resources)."""
    with cluster.client(set_as_default=False) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
    return {str(w["name"]): {**w, "address": addr} for addr, w in workers.items()}


def _logs(cluster: DaskCluster) -> str:
    """The end of the scheduler's and every worker's output (for assertion messages)."""
    return "\n".join(f"--- {n}\n{cluster.log(n)[-3000:]}" for n in ["scheduler", *cluster.workers])


@pytest.fixture(scope="module")
def dask_run(cluster: DaskCluster) -> dict[str, Any]:
    t0 = time.monotonic()
    state = training(
        profile="quick",
        experiments=EXPERIMENTS,
        runner="dask",
        dask_address=cluster.address,
        return_state=True,
    )
    seconds = time.monotonic() - t0
    assert state.is_completed(), f"{state.message}\n{_logs(cluster)}"
    return {"result": state.result(), "flow_run_id": state.state_details.flow_run_id, "seconds": seconds}


def _metrics(lake: Lake, run_id: str, experiment: str) -> dict[str, list[dict[str, Any]]]:
    """One model's committed rows of the per_group and summary metric tables."""
    frames = read_metric_tables(lake, run_id, [experiment], names=tuple(METRIC_COLUMNS))
    out = {}
    for table, columns in METRIC_COLUMNS.items():
        frame = frames[table][columns]
        rows = frame.astype(object).where(frame.notna(), None).to_dict("records")  # NaN != NaN: None
        out[table] = sorted(rows, key=lambda r: tuple(str(r[c]) for c in columns[:2]))
    return out


def test_the_cluster_is_two_training_workers(cluster: DaskCluster) -> None:
    info = _workers(cluster)
    assert sorted(info) == ["w1", "w2"]
    assert all(w["nthreads"] == 1 and w["resources"] == {EXPERIMENT_RESOURCE: 1} for w in info.values())
    assert len({w["address"] for w in info.values()}) == 2
    assert all(p.poll() is None and p.pid != os.getpid() for p in cluster.workers.values())


def test_two_experiments_train_in_parallel_on_two_workers(
    dask_lake: Lake, cluster: DaskCluster, dask_run: dict[str, Any]
) -> None:
    out = dask_run["result"]
    assert set(out["models"]) == set(EXPERIMENTS) and not out["failed"], out
    workers = {w["address"] for w in _workers(cluster).values()}
    assert set(out["trained_on"]) == set(EXPERIMENTS)
    assert set(out["trained_on"].values()) == workers, (out["trained_on"], workers)  # one on each

    # the bundles and metric tables are in the lake, as with the local runner
    for experiment, version in out["models"].items():
        assert dask_lake.is_committed(f"models/{experiment}/{version}")
        summary = _metrics(dask_lake, out["run_id"], experiment)["summary"]
        assert {r["split"] for r in summary} >= {"test"}, summary
        bundle = load_bundle(dask_lake, experiment, version)
        assert bundle.card["run_id"] == out["run_id"] and bundle.card["training"]["epochs_run"] == 1
    assert out["champion"] in out["models"].values()

    # one train task per experiment, in the `experiment-training` subflow, run at the same time
    runs = {t.name: t for t in _task_runs(dask_run["flow_run_id"])}
    trains = [runs[f"train-{e}"] for e in EXPERIMENTS]
    assert all(t.state.is_completed() and t.run_count == 1 for t in trains), [t.state for t in trains]
    assert max(t.start_time for t in trains) < min(t.end_time for t in trains), [
        (t.name, t.start_time, t.end_time) for t in trains
    ]
    assert all(runs[f"evaluate-{e}"].state.is_completed() for e in EXPERIMENTS)
    # torch trained with the worker's one thread (its environment names none: all cores otherwise)
    logs = _task_logs([t.id for t in trains], "torch thread")
    assert len(logs) == 2 and all("with 1 torch thread(s)" in m for m in logs), logs


def _task_logs(task_run_ids: list[Any], contains: str, timeout: float = 30) -> list[str]:
    """Log messages of the task runs (workers send their logs in batches: wait for them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    deadline, found = time.monotonic() + timeout, []
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=task_run_ids)))
            found = [log.message for log in logs if contains in log.message]
            if len(found) >= len(task_run_ids):
                break
            time.sleep(1)
    return found


def test_the_runner_is_a_typed_parameter(prefect_harness: None) -> None:
    with pytest.raises(ParameterTypeError, match="runner"):
        training(profile="quick", runner="spark")  # type: ignore[arg-type]


def test_dask_metrics_equal_the_local_runner(dask_lake: Lake, dask_run: dict[str, Any]) -> None:
    """The same seeds on the thread pool (force: the cache would reuse the Dask run's models) give
    the same numbers, table for table."""
    on_dask = dask_run["result"]
    local = training(profile="quick", experiments=EXPERIMENTS, force=True)
    assert set(local["trained_on"].values()) == {"local"}
    assert local["dataset_version"] == on_dask["dataset_version"]
    for experiment in EXPERIMENTS:
        assert local["models"][experiment] != on_dask["models"][experiment]  # retrained, not cached
        ours = _metrics(dask_lake, on_dask["run_id"], experiment)
        theirs = _metrics(dask_lake, local["run_id"], experiment)
        assert ours == theirs, experiment


def test_a_scheduler_without_training_workers_fails_at_once(cluster: DaskCluster) -> None:
    """A worker offering no `experiment` resource would never get a training task: the flow checks
    the scheduler before it submits one, and fails naming the command that starts a training worker."""
    with local_cluster(cluster.folder / "plain", ("p1",)) as plain:
        with pytest.raises(ConfigError, match="none of the 1 Dask worker.* offers the `experiment` resource"):
            _check_experiment_workers(plain.address)
    assert _check_experiment_workers(cluster.address) == ["w1 (1 threads)", "w2 (1 threads)"]


def test_a_worker_killed_mid_training_loses_nothing(
    dask_lake: Lake, cluster: DaskCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL the worker training `slow_cnn` once its first epoch checkpoint is written: Dask gives the
    task to the other worker, which resumes from that checkpoint (the shared work folder), and the
    night (training, then scoring on the same cluster) completes. Runs last: one worker is left."""
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(
        "experiments:\n  - name: slow_cnn\n    extends: fashion_cnn_small\n"
        "profiles:\n  quick:\n    max_epochs: 8\n"
    )
    monkeypatch.setenv("ZALANDO_EXPERIMENTS_FILE", str(experiments))  # read where the plan is made
    checkpoints = Path(os.environ["ZALANDO_WORK_DIR"]) / "checkpoints" / "slow_cnn"
    before = _workers(cluster)
    killed: dict[str, Any] = {}

    def killer() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if list(checkpoints.glob("*/last.pt")):
                with cluster.client(set_as_default=False) as client:
                    busy = [addr for addr, keys in client.processing().items() if keys]
                (name,) = [n for n, w in before.items() if w["address"] in busy]
                cluster.kill_worker(name)
                killed.update(name=name, address=before[name]["address"], at=time.monotonic())
                return
            time.sleep(0.05)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(killer,), daemon=True)
    thread.start()
    state = nightly(
        profile="quick",
        experiments=["slow_cnn"],
        runner="dask",
        dask_address=cluster.address,
        return_state=True,
    )
    thread.join(timeout=10)
    assert killed, f"no checkpoint of slow_cnn appeared under {checkpoints}\n{_logs(cluster)}"
    assert state.is_completed(), f"{state.message}\n{_logs(cluster)}"
    out = state.result()
    trained = out["training"]
    survivor = next(w["address"] for n, w in before.items() if n != killed["name"])
    assert trained["trained_on"] == {"slow_cnn": survivor} and not trained["failed"], trained
    card = load_bundle(dask_lake, "slow_cnn", trained["models"]["slow_cnn"]).card
    # killed mid-training: the survivor resumed after an epoch (0-based; None = started afresh)
    assert card["training"]["resumed_from_epoch"] is not None, card["training"]
    assert card["training"]["epochs_run"] == 8
    assert out["scoring"]["scored"] == 500

    # Prefect saw one task run, which completed (run twice: once on each worker)
    runs = {t.name: t for t in _task_runs(state.state_details.flow_run_id)}
    assert runs["train-slow_cnn"].state.is_completed(), runs["train-slow_cnn"].state
    assert sorted(_workers(cluster)) == sorted(set(before) - {killed["name"]})
