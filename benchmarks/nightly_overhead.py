"""How long a `nightly` run takes through the real stack, and how much of it is orchestration.

Starts the local stack (infra/stack.py) in a temporary work folder on free ports, registers the
deployments, runs `nightly/nightly` with the given profile (default `quick`) on the mini data set
(or --data), twice (the second run hits the caches), reads every flow and task run from the Prefect
API and prints where the time went; then stops the stack. Never fails a build.

    .venv/bin/python benchmarks/nightly_overhead.py [--profile quick] [--experiments fashion_cnn,...]

Orchestration overhead = wall time of `prefect deployment run --watch` minus the time spent inside
task runs: CLI and worker polling, the flow-run process start (imports), Prefect's own bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT.parent / "shared" / "data" / "fashion-mnist-mini"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--experiments", default="", help="comma-separated (default: the profile's)")
    parser.add_argument("--data", default=str(MINI))
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from zalando.s3server import free_port_block

    work = Path(tempfile.mkdtemp(prefix="zalando-nightly-bench-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZALANDO_", "PREFECT_"))}
    env.update(
        ZALANDO_WORK_DIR=str(work),
        ZALANDO_PREFECT_PORT=str(port),
        ZALANDO_S3_PORT=str(free_port_block()),
        ZALANDO_DATA_SOURCE=args.data,
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    api = f"http://127.0.0.1:{port}/api"
    stack = [sys.executable, str(ROOT / "infra" / "stack.py")]

    def step(*a: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([*stack, *a], env=env, cwd=ROOT, check=True, capture_output=True, text=True)
        return time.perf_counter() - t0

    rows: list[tuple[str, str]] = []
    try:
        rows.append(("make up", f"{step('up'):.1f} s"))
        rows.append(("make deploy", f"{step('deploy'):.1f} s"))
        # a `quick` model always alarms on its predicted group mix: keep the drift -> retrain
        # automation from queueing retrain runs between the measured nightly runs
        for auto in _post(api, "/automations/filter", {}):
            req = urllib.request.Request(
                f"{api}/automations/{auto['id']}",
                data=json.dumps({"enabled": False}).encode(),
                headers={"Content-Type": "application/json"},
                method="PATCH",
            )
            urllib.request.urlopen(req, timeout=30).close()
        params = ["--param", f"profile={args.profile}"]
        if args.experiments:
            params += ["--param", f"experiments={json.dumps(args.experiments.split(','))}"]
        for i in range(args.runs):
            wall = step("trigger", *params, "--timeout", "3600")
            runs = _post(api, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 20})
            top = next(r for r in runs if r["name"].startswith("nightly"))
            ids, todo = [top["id"]], [top["id"]]
            while todo:
                kids = _post(
                    api, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [todo.pop()]}}}
                )
                todo += [k["id"] for k in kids]
                ids += [k["id"] for k in kids]
            tasks = _post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
            # subflow runs appear as task runs of their parent: count real tasks only
            real = [t for t in tasks if not (t["state"].get("state_details") or {}).get("child_flow_run_id")]
            in_tasks = sum(t.get("total_run_time") or 0.0 for t in real)
            cached = sum(t["state"]["name"] == "Cached" for t in real)
            label = f"nightly #{i + 1} ({args.profile})"
            rows.append((f"{label}: wall (trigger -> Completed)", f"{wall:.1f} s"))
            rows.append((f"{label}: flow run (Running -> Completed)", f"{top['total_run_time']:.1f} s"))
            rows.append((f"{label}: inside {len(real)} task runs ({cached} cached)", f"{in_tasks:.1f} s"))
            rows.append(
                (
                    f"{label}: orchestration overhead",
                    f"{wall - in_tasks:.1f} s ({(wall - in_tasks) / wall:.0%})",
                )
            )
            slowest = sorted(real, key=lambda t: -(t.get("total_run_time") or 0))[:4]
            rows.append(
                (
                    f"{label}: slowest tasks",
                    ", ".join(f"{t['name']} {t['total_run_time']:.1f}s" for t in slowest),
                )
            )
    finally:
        step("down")
    width = max(len(k) for k, _ in rows)
    print(f"{'step'.ljust(width)}  time")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    print(
        f"(load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; shared machine, numbers disturbed)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
