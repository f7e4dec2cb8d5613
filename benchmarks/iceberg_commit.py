"""Benchmark: Iceberg commits on the lake (issue 13): append, partition overwrite, add_files, scan.

Against an embedded SeaweedFS started here on free ports (``--warehouse s3``, the default) or a
temporary file:// lake, with the SQLite catalog in a temporary work folder. Per step: median and
min wall seconds over ``--repeat`` rounds (after one warm-up round), and how many objects the step
added under the table's location (data + manifests + metadata). Today's manifest commit
(``Lake.commit_partition`` / ``read_partition``) of the same rows is the baseline.

    .venv/bin/python benchmarks/iceberg_commit.py [--warehouse s3|file] [--rows 10000] [--shards 10] [--repeat 5]

Prints a table; never fails a build. Numbers are disturbed by whatever else runs on the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ACCESS, SECRET = "bench", "bench-secret-0c1e"
TABLE = "predictions"
MODEL = "v-bench"


@contextlib.contextmanager
def warehouse(kind: str) -> Iterator[tuple[Any, Any]]:
    """(settings, lake) on a fresh SeaweedFS or a fresh local folder; removed afterwards."""
    from zalando.lake import Lake
    from zalando.s3server import S3Server, free_port_block
    from zalando.settings import Settings

    with tempfile.TemporaryDirectory(prefix="zalando-bench-iceberg-") as tmp:
        if kind == "file":
            settings = Settings(lake_uri=(Path(tmp) / "lake").as_uri(), work_dir=Path(tmp) / "work")
            yield settings, Lake.from_settings(settings)
            return
        server = S3Server(Path(tmp) / "s3", free_port_block(), ACCESS, SECRET)
        server.state_dir.mkdir(parents=True)
        server.start(timeout=90)
        try:
            settings = Settings(
                lake_uri="s3://bench/lake",
                s3_endpoint=server.endpoint,
                s3_access_key=ACCESS,
                s3_secret_key=SECRET,
                work_dir=Path(tmp) / "work",
            )
            lake = Lake.from_settings(settings)
            lake.ensure_ready()
            yield settings, lake
        finally:
            server.stop()


def prediction_rows(n: int, batch_id: str, batch_date: date, seed: int, first: int = 0) -> pa.Table:
    from zalando.lake.tables import PROB_COLUMNS, PRODUCT_COLUMNS, TABLES

    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(PROB_COLUMNS)), size=n).astype(np.float32)
    pred = probs.argmax(axis=1).astype(np.int8)
    cols: dict[str, Any] = {
        "image_id": pa.array([f"img-{i:07d}" for i in range(first, first + n)], pa.string()),
        "pred_group": pa.array(pred),
        "pred_group_name": pa.array(
            np.array(["Upper part", "Bottom part", "One piece", "Footwear", "Bags"])[pred]
        ),
    }
    for j, c in enumerate(PROB_COLUMNS):
        cols[c] = pa.array(probs[:, j])
    cols.update(
        confidence=pa.array(probs.max(axis=1)),
        model_version=pa.array([MODEL] * n, pa.string()),
        batch_id=pa.array([batch_id] * n, pa.string()),
        batch_date=pa.array([batch_date] * n, pa.date32()),
        scored_at=pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
        shadow=pa.array([False] * n),
    )
    cols.update({f.name: pa.nulls(n, f.type) for f in PRODUCT_COLUMNS})  # catalogue batches only
    return pa.table(cols, schema=TABLES[TABLE].schema)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def one_round(cat: Any, lake: Any, r: int, rows: int, shards: int) -> dict[str, tuple[float, int]]:
    """Every step once on a new batch; {step: (seconds, objects added under the table)}."""
    from zalando.lake import commit as lc
    from zalando.lake.tables import table_schema

    day = date(2026, 12, 1) + timedelta(days=r)
    batch = f"bench-{r:03d}"
    flt = {"batch_id": batch, "model_version": MODEL}
    data = prediction_rows(rows, batch, day, seed=r)
    out: dict[str, tuple[float, int]] = {}

    def step(name: str, fn: Callable[[], Any], prefix: str = "zalando/predictions") -> Any:
        before = len(lake.list_keys(prefix))
        seconds, result = timed(fn)
        out[name] = (seconds, len(lake.list_keys(prefix)) - before)
        return result

    step(f"append {rows} rows", lambda: lc.append(cat, TABLE, data))
    step(
        f"overwrite {rows} rows (batch_id + model_version)",
        lambda: lc.replace_partition(cat, TABLE, data, flt),
    )
    part = {"batch_date": day, "model_version": MODEL, "batch_id": batch}
    keys = [
        lc.data_file_key(cat, TABLE, run_id=f"run-{r}", shard_id=s, partition=part) for s in range(shards)
    ]
    per = rows // shards

    def write_shards() -> None:
        schema = table_schema(cat, TABLE)
        for s, key in enumerate(keys):
            lc.write_data_file(lake, key, data.slice(s * per, per), schema=schema)

    step(f"write {shards} shard files (not committed)", write_shards)
    step(
        f"add_files {shards} shard files, replacing the batch",
        lambda: lc.add_data_files(cat, TABLE, keys, replace=flt),
    )
    got = step("scan one batch by batch_id", lambda: lc.scan(cat, TABLE, {"batch_id": batch}))
    assert got.num_rows == per * shards, got.num_rows

    old = f"bench-today/predictions/batch_date={day}/model_version={MODEL}/batch_id={batch}"
    step(
        f"today: lake.commit_partition {rows} rows",
        lambda: lake.commit_partition(old, {"part-00000": data}, batch),
        "bench-today",
    )
    step("today: lake.read_partition of the batch", lambda: lake.read_partition(old), "bench-today")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", choices=["s3", "file"], default="s3")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )

    from zalando.lake import commit as lc
    from zalando.lake.catalog import open_catalog
    from zalando.lake.tables import ensure_table

    with warehouse(args.warehouse) as (settings, lake):
        t_open, cat = timed(lambda: open_catalog(settings, lake=lake))
        t_create, _ = timed(lambda: ensure_table(cat, TABLE))
        one_round(cat, lake, 0, args.rows, args.shards)  # warm-up: imports, first connections
        results: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for r in range(1, args.repeat + 1):
            for name, value in one_round(cat, lake, r, args.rows, args.shards).items():
                results[name].append(value)
        objects = len(lake.list_keys("zalando/predictions"))
        t_maintain, report = timed(
            lambda: lc.maintain(cat, snapshots_older_than=timedelta(0), orphans_older_than=timedelta(0))
        )
        after = len(lake.list_keys("zalando/predictions"))

    print(
        f"\nIceberg commits on a {args.warehouse} warehouse, SQLite catalog; {args.repeat} rounds after a warm-up"
    )
    print(f"open catalog {t_open:.3f} s, create table {t_create:.3f} s\n")
    print(f"{'step':58s} {'median s':>9s} {'min s':>8s} {'objects':>8s}")
    for name, values in results.items():
        secs = [v[0] for v in values]
        print(f"{name:58s} {statistics.median(secs):9.3f} {min(secs):8.3f} {values[0][1]:8d}")
    print(
        f"\nmaintain (expire every old snapshot, remove orphans): {t_maintain:.3f} s; "
        f"expired {sum(report.expired.values())} snapshots, removed {report.orphan_count} of {objects} objects, "
        f"{after} left"
    )


if __name__ == "__main__":
    main()
