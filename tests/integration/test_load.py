"""Load: ten scoring runs at once against one S3 server (and one Prefect server) all complete, each
with exactly its own rows.

* library level: ten separate OS processes, each scoring its own batch into the same lake under the
  same batch date, and so committing into the same Iceberg tables through one SQLite catalog at
  once (a deterministic torch-free predictor: this is about the storage and the commits, and ten
  torch imports would cost a minute of our two shared cores);
* Prefect level: ten ``batch_scoring`` flow runs at once, with the real (tiny) champion, against
  one Prefect server (the session's test server) and the same S3 server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.faults import RecordProperty, record_case
from tests.scoring_support import batch_predictions, make_champion, mnist_like, raw_parquet
from zalando.lake import Lake
from zalando.lake.catalog import LakeCatalog, open_catalog
from zalando.lake.commit import scan
from zalando.scoring.commit import batch_record
from zalando.settings import Settings, load_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RUNS = 10
ROWS = 120  # per batch: two input files, three shards of 40 (big enough to interleave, small and fast)
BATCH_DATE = "2026-07-01"


def write_batches(lake: Lake, prefix: str) -> dict[str, list[str]]:
    """RUNS batches of ROWS distinct images, ids unique across batches; location -> ids."""
    batches = {}
    for i in range(RUNS):
        ids = [f"{prefix}{i:02d}-{j:04d}" for j in range(ROWS)]
        imgs = mnist_like(ROWS, seed=100 + i)
        loc = f"inbox/{prefix}{i:02d}"
        lake.write_bytes(f"{loc}/a.parquet", raw_parquet(ids[: ROWS // 2], imgs[: ROWS // 2]))
        lake.write_bytes(f"{loc}/b.parquet", raw_parquet(ids[ROWS // 2 :], imgs[ROWS // 2 :]))
        batches[loc] = ids
    return batches


def assert_each_run_has_exactly_its_rows(
    cat: LakeCatalog, version: str, batches: dict[str, list[str]], batch_ids: dict[str, str]
) -> None:
    for loc, ids in batches.items():
        table = batch_predictions(cat, batch_ids[loc], version)
        got = table.column("image_id").to_pylist()
        assert sorted(got) == sorted(ids), f"{loc}: {len(got)} rows, {len(set(got) - set(ids))} foreign"
        assert set(table.column("batch_id").to_pylist()) == {batch_ids[loc]}
        row = batch_record(cat, batch_ids[loc], version)
        assert row is not None and row["records"] == row["scored"] == len(ids)
    everything = scan(cat, "predictions", {"batch_date": BATCH_DATE}).column("image_id").to_pylist()
    assert len(everything) == len(set(everything)) == RUNS * ROWS  # nothing lost, nothing duplicated


def save_drift_reference(lake: Lake, version: str) -> None:
    """The model's label-free drift reference (the training flow writes one per model)."""
    import numpy as np

    from zalando.drift import reference_profile
    from zalando.registry import save_reference
    from zalando.scoring import load_champion_predictor

    predictor = load_champion_predictor(lake, "torch", model_version=version, threads=1)
    images = mnist_like(200, seed=1)
    probs, embeddings = predictor.predict(images)
    reference = reference_profile(images, probs, embeddings, np.ones(5), sample_size=100, seed=0)
    save_reference(lake, version, reference, run_id="load-test")


_WORKER = textwrap.dedent(
    """
    import json, sys
    from tests.scoring_support import FakePredictor
    from zalando.lake.catalog import open_catalog
    from zalando.scoring import score_batch
    from zalando.settings import load_settings

    location, version, batch_date = sys.argv[1], sys.argv[2], sys.argv[3]
    cat = open_catalog(load_settings())
    r = score_batch(cat, location, model_version=version, batch_date=batch_date, shard_size=40,
                    predictor=FakePredictor())
    assert "torch" not in sys.modules
    print(json.dumps({"batch_id": r.batch_id, "scored": r.scored, "snapshot": r.snapshot_id}))
    """
)


def test_ten_scoring_processes_at_once_into_one_lake(
    s3_lake: Lake, s3_settings: Settings, record_property: RecordProperty
) -> None:
    version = "20260101T000000Z-fake"
    batches = write_batches(s3_lake, "p")
    env = {
        **os.environ,
        "ZALANDO_LAKE_URI": s3_settings.lake_uri,
        "ZALANDO_S3_ENDPOINT": s3_settings.s3_endpoint or "",
        "ZALANDO_S3_ACCESS_KEY": s3_settings.s3_access_key,
        "ZALANDO_S3_SECRET_KEY": s3_settings.s3_secret_key.get_secret_value(),
        "ZALANDO_WORK_DIR": str(s3_settings.work_dir),  # one catalog for all ten
        "OMP_NUM_THREADS": "1",
    }
    procs = {
        loc: subprocess.Popen(
            [sys.executable, "-c", _WORKER, loc, version, BATCH_DATE],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for loc in batches
    }
    results: dict[str, dict[str, Any]] = {}
    try:
        for loc, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"{loc}: exit {proc.returncode}: {err[-2000:]}"
            results[loc] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(r["scored"] == ROWS for r in results.values())
    cat = open_catalog(s3_settings, lake=s3_lake)
    assert_each_run_has_exactly_its_rows(
        cat, version, batches, {loc: r["batch_id"] for loc, r in results.items()}
    )
    assert len({r["snapshot"] for r in results.values()}) == RUNS  # ten commits, none lost to a race
    record_case(
        record_property,
        f"{RUNS} scoring processes at once, one S3 server, one batch date, one Iceberg catalog",
        f"all {RUNS} completed: {RUNS} predictions commits into one table (conflicts retried on the fresh snapshot)",
        lost=f"nothing: each batch exactly its own {ROWS} rows, {RUNS * ROWS} unique in all",
    )


@pytest.mark.slow
def test_ten_batch_scoring_flow_runs_at_once_on_one_prefect_server(
    prefect_harness: None, flow_env: dict[str, str], record_property: RecordProperty
) -> None:
    """Ten flow runs started together (threads of this process), one Prefect server, one S3 server."""
    import torch
    from prefect import tags
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags

    from flows.batch_scoring import batch_scoring

    torch.set_num_threads(1)
    lake = Lake.from_settings(load_settings())
    lake.ensure_ready()
    version = make_champion(lake, seed=7)
    save_drift_reference(lake, version)  # the flow also monitors drift, as a nightly run does
    batches = write_batches(lake, "f")
    tag = f"load-{uuid.uuid4().hex[:8]}"
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, BaseException] = {}
    start = threading.Barrier(RUNS)

    def one_run(loc: str) -> None:
        try:
            start.wait(timeout=60)
            with tags(tag):
                results[loc] = batch_scoring(
                    batch_uri=loc, batch_date=BATCH_DATE, model_version=version, shard_size=40
                )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[loc] = e

    threads = [threading.Thread(target=one_run, args=(loc,)) for loc in batches]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, {k: repr(v) for k, v in errors.items()}
    assert len(results) == RUNS and all(r["scored"] == ROWS for r in results.values())
    assert_each_run_has_exactly_its_rows(
        open_catalog(load_settings(), lake=lake),
        version,
        batches,
        {k: r["batch_id"] for k, r in results.items()},
    )

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["batch_scoring"])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
        )
    assert len(runs) == RUNS and all(r.state and r.state.is_completed() for r in runs)
    spans = [(r.start_time, r.end_time) for r in runs]
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    # they ran side by side, not one after another: how many at the peak depends on the machine's
    # load (the server starts them one API call at a time; on a busy machine early ones finish first)
    busy = sum((e - s).total_seconds() for s, e in spans)
    span = (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds()
    assert overlap >= 2 and busy > 1.2 * span, (
        f"the runs did not overlap: at most {overlap} at once, {busy:.1f} s of runs in {span:.1f} s"
    )
    print(
        f"{RUNS} flow runs in {time.monotonic() - t0:.1f}s, up to {overlap} at the same moment, {busy / span:.1f} on average"
    )
    record_case(
        record_property,
        f"{RUNS} batch_scoring flow runs at once, one Prefect server, one S3 server",
        f"all {RUNS} Completed in {time.monotonic() - t0:.0f}s, up to {overlap} running at the same moment",
        lost=f"nothing: each run exactly its own {ROWS} rows, {RUNS * ROWS} unique in all",
    )
