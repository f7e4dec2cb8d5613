"""The drift alarm loop on the real local stack: a clean batch raises no alarm, a drifted one does,
and the automation from prefect.yaml starts a `retrain` flow run.

    make up && make deploy          # (after a `make run`, so a champion exists)
    .venv/bin/python benchmarks/drift_alarm_demo.py [--drift invert|rotate|one-group]

It writes a drifted copy of the Fashion-MNIST test split into the lake (``batches/drift-<kind>/``),
runs the `batch_scoring/score` deployment on the clean test split and on the drifted copy, prints both
drift tables from ``monitoring/``, then waits (bounded) for the `training/retrain` run that the
automation creates, and prints the latest gate decisions from the registry.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zalando.data.arrays import images_from_table, images_to_arrow  # noqa: E402
from zalando.data.ingest import load_raw  # noqa: E402
from zalando.lake import Lake, new_run_id  # noqa: E402
from zalando.settings import load_settings  # noqa: E402


def drifted_batch(lake: Lake, kind: str) -> str:
    """Write a drifted copy of the test split; returns its lake key."""
    test = load_raw(lake, "test", columns=["image_id", "image", "group"])
    images = images_from_table(test)
    ids = test.column("image_id").to_pylist()
    if kind == "invert":
        images = 255 - images
    elif kind == "rotate":
        images = np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))
    elif kind == "one-group":
        keep = test.column("group").to_numpy() == 3  # Footwear only
        images, ids = images[keep], [i for i, k in zip(ids, keep, strict=True) if k]
    key = f"batches/drift-{kind}"
    table = pa.table({"image_id": pa.array([f"{kind}-{i}" for i in ids]), "image": images_to_arrow(images)})
    lake.commit_partition(key, {"part-00000": table}, new_run_id(), {"drift": kind})
    return key


async def run_score(batch_uri: str | None, batch_date: str) -> dict:
    from prefect.deployments import run_deployment

    params = {"batch_date": batch_date, "force": True}
    if batch_uri:
        params["batch_uri"] = batch_uri
    fr = await run_deployment("batch_scoring/score", parameters=params, timeout=1800)
    return {"id": str(fr.id), "name": fr.name, "state": fr.state.type.value if fr.state else "?"}


async def retrain_runs_since(since: datetime) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain"]))
        )
    return [
        {
            "id": str(r.id),
            "name": r.name,
            "state": r.state.type.value if r.state else "?",
            "created": r.created,
            "reason": r.parameters.get("reason"),
        }
        for r in runs
        if r.created and r.created >= since
    ]


def drift_table(lake: Lake, batch_date: str, batch_id_part: str) -> str:
    from zalando.lake.commit import scan

    df = scan(lake.catalog(), "monitoring", {"batch_date": batch_date}).to_pandas()
    df = df[df["batch_id"].str.contains(batch_id_part, regex=False)]
    if df.empty:
        return "(no drift table)"
    batch_id = sorted(df["batch_id"])[-1]
    df = df[df["batch_id"] == batch_id]
    cols = [c for c in ("statistic", "value", "threshold", "p_value", "alarm") if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df[cols].itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return f"monitoring rows of batch {batch_id}\n" + "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drift", choices=["invert", "rotate", "one-group"], default="invert")
    ap.add_argument("--wait", type=int, default=300, help="seconds to wait for the retrain run")
    args = ap.parse_args()
    os.environ.setdefault(
        "PREFECT_API_URL", f"http://127.0.0.1:{os.environ.get('ZALANDO_PREFECT_PORT', '4200')}/api"
    )
    settings = load_settings()
    lake = Lake.from_settings(settings)
    lake.ensure_ready()
    batch_date = datetime.now(UTC).date().isoformat()
    started = datetime.now(UTC)

    clean = asyncio.run(run_score(None, batch_date))
    print(f"clean batch (test split): flow run {clean['name']} -> {clean['state']}")
    print(drift_table(lake, batch_date, "fashion-mnist-test"))

    key = drifted_batch(lake, args.drift)
    t_drift = datetime.now(UTC)
    drifted = asyncio.run(run_score(key, batch_date))
    print(f"\ndrifted batch ({args.drift}, {key}): flow run {drifted['name']} -> {drifted['state']}")
    print(drift_table(lake, batch_date, f"drift-{args.drift}"))

    deadline = time.monotonic() + args.wait
    retrains: list[dict] = []
    while time.monotonic() < deadline:
        retrains = asyncio.run(retrain_runs_since(started))
        if any(r["created"] >= t_drift for r in retrains):
            break
        time.sleep(3)
    print("\nretrain flow runs created since the demo started (by the drift automation):")
    for r in retrains:
        print(f"  {r['name']} state={r['state']} created={r['created']:%H:%M:%S} reason={r['reason']!r}")
    if not retrains:
        print("  none within the wait: the alarm did not start retrain")

    from zalando.registry import decision_log

    log = decision_log(lake)
    print("\nlatest gate decisions (registry/decisions):")
    print(
        log.tail(5)[
            ["at", "action", "model_version", "experiment", "champion_after", "actor", "reason"]
        ].to_string(index=False)
    )
    ok = (
        clean["state"] == "COMPLETED"
        and drifted["state"] == "COMPLETED"
        and any(r["created"] >= t_drift for r in retrains)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
