"""Two quick experiments trained on a two-process Dask cluster against Prefect's thread pool, on one machine.

    nice -n 10 .venv/bin/python benchmarks/dask_training.py [--experiments fashion_cnn_small,fashion_cnn]

Starts a SeaweedFS lake and a temporary Prefect server, then runs the `training` flow (profile
`quick`, the mini data set) four times, each on a fresh lake prefix so nothing is cached: twice on
the thread pool (one experiment at a time, torch on every core; the first run also pays this
process's imports), then on `dask scheduler` + two `dask worker --nthreads 1 --resources
experiment=1` processes, cold (each worker imports Prefect, the tasks and torch on its first task)
and warm. It prints the wall times, the `experiment-training` subflow and its train tasks, and what
Dask costs here: starting the cluster, the bytes of a training task's inputs and result that pass
through the scheduler, and the round trip of an empty task through Dask, through Prefect on Dask
and on Prefect's thread pool. Never fails a build.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MINI = ROOT.parent / "shared" / "data" / "fashion-mnist-mini"
ACCESS, SECRET = "bench", "bench-secret-5d2a"


def _flow_runs_below(client: Any, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter

    runs, todo = [], [flow_run_id]
    while todo:
        kids = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [todo.pop()]}))
        runs += kids
        todo += [k.id for k in kids]
    return runs


def _timings(flow_run_id: Any) -> dict[str, Any]:
    """The experiment-training subflow's run time and each train task's (start, end, run time)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        subflows = _flow_runs_below(client, flow_run_id)
        train_flow = next(r for r in subflows if client.read_flow(r.flow_id).name == "experiment-training")
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[train_flow.id])))
    trains = [t for t in tasks if t.name.startswith("train-")]
    return {
        "subflow_s": (train_flow.end_time - train_flow.start_time).total_seconds(),
        "tasks": {t.name: (t.start_time, t.end_time, t.total_run_time.total_seconds()) for t in trains},
    }


def _run(label: str, rows: list[tuple[str, str]], experiments: list[str], **kw: Any) -> dict[str, Any]:
    from flows.training import training

    os.environ["ZALANDO_LAKE_URI"] = f"s3://bench-dask/{uuid.uuid4().hex[:10]}"  # nothing cached
    t0 = time.perf_counter()
    state = training(profile="quick", experiments=experiments, return_state=True, **kw)
    wall = time.perf_counter() - t0
    if not state.is_completed():
        rows.append((label, f"FAILED: {state.message}"))
        return {}
    out = state.result()
    t = _timings(state.state_details.flow_run_id)
    starts = [s for s, _, _ in t["tasks"].values()]
    ends = [e for _, e, _ in t["tasks"].values()]
    span = (max(ends) - min(starts)).total_seconds()
    rows.append((f"{label}: training flow wall", f"{wall:.1f} s"))
    rows.append((f"{label}: experiment-training subflow", f"{t['subflow_s']:.1f} s"))
    rows.append((f"{label}: first train start -> last train end", f"{span:.1f} s"))
    rows.append(
        (f"{label}: subflow - train span (runner, imports, hand-offs)", f"{t['subflow_s'] - span:.1f} s")
    )
    for name, (_, _, run_s) in sorted(t["tasks"].items()):
        where = out["trained_on"].get(name.removeprefix("train-"), "?")
        rows.append((f"{label}: {name} (on {where})", f"{run_s:.1f} s"))
    return {"wall": wall, "span": span, **t}


def _payload_bytes(experiments: list[str]) -> tuple[int, int]:
    """cloudpickle bytes of one train task's inputs (config, resolved spec, dataset version) and result."""
    import cloudpickle

    from tasks.common import RunConfig
    from zalando.settings import load_settings
    from zalando.steps.training import TrainedModel, plan_experiments

    settings = load_settings(profile="quick")
    cfg = RunConfig.from_settings(settings, run_id="20260101T000000Z-abcdef")
    planned = plan_experiments(settings, experiments[:1])[0]
    inputs = len(cloudpickle.dumps((cfg, planned, "dv-0123456789abcdef")))
    result = TrainedModel(
        experiment=planned.experiment,
        model_version="20260101T000000Z-01234567",
        bundle_key=f"models/{planned.experiment}/20260101T000000Z-01234567",
        dataset_version="dv-0123456789abcdef",
        temperature=1.2,
        train_energy={"kwh": 0.001, "co2_kg": 0.0004, "images": 256, "seconds": 3.0},
        wall_s=3.0,
        epochs_run=1,
        best_val_loss=0.5,
        trained_on="tcp://127.0.0.1:40000",
    )
    return inputs, len(cloudpickle.dumps(result))


def _round_trips(address: str, n: int = 20) -> tuple[float, float, float]:
    """Median ms of an empty task: through Dask alone, through Prefect on Dask, on Prefect's thread pool."""
    import operator

    from distributed import Client
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    with Client(address, set_as_default=False) as client:
        dask_ms = []
        for i in range(n):
            t0 = time.perf_counter()
            client.submit(operator.add, i, 1, pure=False).result()
            dask_ms.append((time.perf_counter() - t0) * 1000)

    @task
    def noop(i: int) -> int:
        return i

    def per_task_ms(runner: Any) -> float:
        @flow(task_runner=runner)
        def many() -> list[int]:
            return [f.result() for f in noop.map(range(n))]

        many()  # warm-up: first use imports and connects
        t0 = time.perf_counter()
        many()
        return (time.perf_counter() - t0) * 1000 / n

    return (
        statistics.median(dask_ms),
        per_task_ms(DaskTaskRunner(address=address)),
        per_task_ms(ThreadPoolTaskRunner(max_workers=2)),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", default="fashion_cnn_small,fashion_cnn")
    args = parser.parse_args()
    experiments = args.experiments.split(",")

    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.training import EXPERIMENT_RESOURCE
    from tests.dask_support import local_cluster
    from zalando.s3server import S3Server, free_port_block

    rows: list[tuple[str, str]] = [("machine", f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")]
    with tempfile.TemporaryDirectory(prefix="zalando-bench-dask-") as tmp:
        work = Path(tmp)
        server = S3Server(work / "s3", free_port_block(), ACCESS, SECRET)
        server.start(timeout=90)
        os.environ.update(
            ZALANDO_S3_ENDPOINT=server.endpoint,
            ZALANDO_S3_ACCESS_KEY=ACCESS,
            ZALANDO_S3_SECRET_KEY=SECRET,
            ZALANDO_DATA_SOURCE=str(MINI),
            ZALANDO_WORK_DIR=str(work / "work"),
            ZALANDO_PROFILE="quick",
            ZALANDO_LAKE_URI="s3://bench-dask/start",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            CODECARBON_LOG_LEVEL="error",
        )
        os.environ.pop("ZALANDO_TORCH_THREADS", None)  # the thread pool's torch uses every core
        try:
            home = work / "prefect"
            with temporary_settings({PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}):
                with prefect_test_harness(server_startup_timeout=180):
                    _run("thread pool, first run in this process", rows, experiments)
                    local = _run("thread pool", rows, experiments)
                    env = {k: v for k, v in os.environ.items() if k.startswith("ZALANDO_")}
                    t0 = time.perf_counter()
                    args = ("--resources", f"{EXPERIMENT_RESOURCE}=1")
                    with local_cluster(work / "dask", ("w1", "w2"), env=env, worker_args=args) as c:
                        rows.append(
                            (
                                "Dask: start scheduler + 2 worker processes",
                                f"{time.perf_counter() - t0:.1f} s",
                            )
                        )
                        cold = _run(
                            "Dask, cold workers", rows, experiments, runner="dask", dask_address=c.address
                        )
                        warm = _run(
                            "Dask, warm workers", rows, experiments, runner="dask", dask_address=c.address
                        )
                        dask_ms, prefect_dask_ms, pool_ms = _round_trips(c.address)
                    inputs, result = _payload_bytes(experiments)
                    rows.append(("through the scheduler per train task", f"{inputs} B in, {result} B out"))
                    rows.append(("empty task round trip, Dask client.submit", f"{dask_ms:.1f} ms"))
                    rows.append(
                        ("empty Prefect task on Dask (per task, 20 mapped)", f"{prefect_dask_ms:.1f} ms")
                    )
                    rows.append(("empty Prefect task on the thread pool (per task)", f"{pool_ms:.1f} ms"))
                    if local and warm:
                        rows.append(
                            (
                                "train span, thread pool / Dask warm / Dask cold",
                                f"{local['span']:.1f} / {warm['span']:.1f} / {cold.get('span', float('nan')):.1f} s",
                            )
                        )
        finally:
            server.stop()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
