"""Benchmark: 1,000,000 images end to end (S3 Parquet -> committed predictions), 100k vs 1M, local vs Dask.

The images are the Fashion-MNIST test split replicated 100 times, each copy with its own small
random pixel noise (+-6 levels), so no cache or dedup shortcut helps. They are written to the S3
lake as a committed partition of 50,000-row Parquet files (10,000-row row groups) before any
timing starts. Each scoring run is its own process (so its peak RSS is its own; the Dask run sums
the RSS of its whole process tree, sampled every 0.2 s).

Targets (issue 6): 1M in <= 6 min end to end, peak RSS <= 1.5 GB, linear growth 100k -> 1M, the
Dask runner giving identical rows.

    .venv/bin/python benchmarks/score_1m.py [--n 1000000] [--small 100000] [--shard-size 20000] [--no-dask]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from _score_common import (
    ROOT,
    copy_champion_from_settings,
    install_champion,
    load_avg,
    s3_lake,
    setup_logging,
    test_split,
)  # noqa: I001

FILE_ROWS = 50_000
ROW_GROUP = 10_000


def write_replicated_batch(lake, key: str, n: int, seed: int = 0) -> float:
    """n perturbed copies of test images as a committed lake partition; returns seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zalando.data.arrays import images_to_arrow

    t0 = time.perf_counter()
    base, _ = test_split()
    rng = np.random.default_rng(seed)
    entries = {}
    for f, start in enumerate(range(0, n, FILE_ROWS)):
        rows = min(FILE_ROWS, n - start)
        idx = (np.arange(start, start + rows) % len(base)).astype(np.int64)
        noise = rng.integers(-6, 7, size=(rows, 28, 28), dtype=np.int16)
        imgs = np.clip(base[idx].astype(np.int16) + noise, 0, 255).astype(np.uint8)
        ids = pa.array(
            [f"r{(start + i) // len(base):03d}-{(start + i) % len(base):05d}" for i in range(rows)]
        )
        table = pa.table({"image_id": ids, "image": images_to_arrow(imgs)})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="zstd")
        data = buf.getvalue()
        name = f"part-{f:05d}.parquet"
        lake.write_bytes(f"{key}/{name}", data)
        entries[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": rows}
    lake.write_json(
        f"{key}/_MANIFEST.json",
        {
            "partition": key,
            "run_id": "bench-data",
            "created_at": datetime.now(UTC).isoformat(),
            "files": entries,
            "rows": n,
            "extra": {"what": f"{n} perturbed copies of the test split"},
        },
    )
    return time.perf_counter() - t0


class TreeRss:
    """Peak of the summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(self.every)

    def __enter__(self) -> TreeRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _process_cpu_seconds() -> float:
    return time.process_time()


def run_worker(args: argparse.Namespace) -> None:
    """One scoring run in this process; prints a JSON line with the numbers."""
    t_start = time.perf_counter()
    import resource

    from zalando.lake.catalog import open_catalog
    from zalando.scoring import BatchPlan, ScoringOptions, run_shard, score_batch
    from zalando.settings import load_settings

    settings = load_settings()
    cat = open_catalog(settings)
    opts = ScoringOptions(sub_batch=args.sub_batch)
    t_ready = time.perf_counter()
    cluster_s = 0.0
    if args.runner == "dask":
        from dask.distributed import Client, LocalCluster

        t = time.perf_counter()
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=None,
        )
        client = Client(cluster)
        cluster_s = time.perf_counter() - t

        def on_dask(plan: BatchPlan) -> list:
            futures = client.map(
                run_shard,
                plan.shards,
                model_version=plan.model_version,
                settings=settings,
                runtime=plan.runtime,
                threads=1,
                options=opts,
                pure=False,
            )
            return client.gather(futures)

        map_shards = on_dask
    else:
        map_shards = None

    def cpu_now() -> float:
        own = time.process_time()
        if args.runner != "dask":
            return own
        return own + sum(client.run(_process_cpu_seconds).values())

    cpu0 = cpu_now()
    t = time.perf_counter()
    r = score_batch(
        cat,
        args.location,
        source=args.source,
        batch_date="2026-02-01",
        shard_size=args.shard_size,
        options=opts,
        threads=None if args.runner == "dask" else args.threads,
        map_shards=map_shards,
    )
    wall = time.perf_counter() - t
    cpu = cpu_now() - cpu0
    if args.runner == "dask":
        client.close()
        cluster.close()
    print(
        "RESULT "
        + json.dumps(
            {
                "runner": args.runner,
                "records": r.records,
                "scored": r.scored,
                "wall_s": wall,
                "cpu_s": cpu,
                "startup_s": t_ready - t_start,
                "cluster_s": cluster_s,
                "timings": r.timings,
                "shards": r.shards,
                "data_files": r.data_files,
                "batch_id": r.batch_id,
                "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        ),
        flush=True,
    )


def spawn(settings, argv: list[str]) -> tuple[dict, float, float]:
    env = {
        **os.environ,
        "ZALANDO_LAKE_URI": settings.lake_uri,
        "ZALANDO_S3_ENDPOINT": settings.s3_endpoint,
        "ZALANDO_S3_ACCESS_KEY": settings.s3_access_key,
        "ZALANDO_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
        "ZALANDO_WORK_DIR": str(settings.work_dir),  # the same Iceberg catalog as the parent
    }
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *argv],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with TreeRss(proc.pid) as rss:
        out, _ = proc.communicate()
    total = time.perf_counter() - t
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"worker failed ({proc.returncode}):\n{out[-4000:]}")
    return json.loads(line[len("RESULT ") :]), total, rss.peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=20_000)
    ap.add_argument("--sub-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runner", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--location", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument(
        "--use-champion",
        action="store_true",
        help="copy in the champion of the lake the ZALANDO_* settings name",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    if args.worker:
        run_worker(args)
        return

    common = [
        "--shard-size",
        str(args.shard_size),
        "--sub-batch",
        str(args.sub_batch),
        "--threads",
        str(args.threads),
    ]
    common += ["--workers", str(args.workers)]
    rows = []
    with s3_lake() as (lake, settings):
        pointer = copy_champion_from_settings(lake) if args.use_champion else install_champion(lake)
        gen_small = write_replicated_batch(lake, "incoming/bench-small", args.small, seed=1)
        gen_big = write_replicated_batch(lake, "incoming/bench-big", args.n, seed=2)
        print(
            f"data written: {args.small:,} in {gen_small:.1f}s, {args.n:,} in {gen_big:.1f}s (setup, not timed)"
        )
        plan = [
            ("local", "incoming/bench-small", "small", args.small),
            ("local", "incoming/bench-big", "big", args.n),
        ]
        if not args.no_dask:
            plan.append(("dask", "incoming/bench-big", "big-dask", args.n))
        for runner, loc, source, n in plan:
            res, total, tree_peak = spawn(
                settings, [*common, "--runner", runner, "--location", loc, "--source", source]
            )
            assert res["scored"] == n, res
            rows.append((runner, n, res, total, tree_peak))
            print(
                f"{runner:5s} {n:>9,}: {res['wall_s']:.1f}s scoring ({n / res['wall_s']:,.0f} img/s), "
                f"CPU {res['cpu_s']:.0f}s, process {total:.1f}s, "
                f"peak RSS {tree_peak:,.0f} MB, {res.get('data_files', '-')} data files, {res['timings']}",
                flush=True,
            )
        same = None
        if not args.no_dask:
            import pyarrow.compute as pc

            cols = [
                "image_id",
                "pred_group",
                "prob_upper_part",
                "prob_bottom_part",
                "prob_one_piece",
                "prob_footwear",
                "prob_bags",
            ]
            from zalando.lake.catalog import open_catalog
            from zalando.lake.commit import scan

            cat = open_catalog(settings, lake=lake)
            a = scan(cat, "predictions", {"batch_id": rows[1][2]["batch_id"]}, columns=cols).sort_by(
                "image_id"
            )
            b = scan(cat, "predictions", {"batch_id": rows[2][2]["batch_id"]}, columns=cols).sort_by(
                "image_id"
            )
            same_ids = a.column("image_id").equals(b.column("image_id"))
            same_pred = a.column("pred_group").equals(b.column("pred_group"))
            diff = max(
                float(pc.max(pc.abs(pc.subtract(a.column(c), b.column(c)))).as_py() or 0.0) for c in cols[2:]
            )
            same = (same_ids, same_pred, diff, a.num_rows)

    print()
    print(
        f"## score_1m: S3 Parquet -> committed predictions ({pointer['experiment']} {pointer['model_version']})"
    )
    print()
    print(
        f"machine: {load_avg()} (other engineers share these cores); shard size {args.shard_size:,}, sub-batch {args.sub_batch}"
    )
    print()
    print(
        "| run | images | scoring wall | images/s | CPU s (/2 = wall with 2 free cores) | process total "
        "| peak RSS (tree) | plan / shards / finalize s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for runner, n, res, total, peak in rows:
        t = res["timings"]
        label = runner if runner == "local" else f"dask ({args.workers} procs x 1 thread)"
        print(
            f"| {label} | {n:,} | {res['wall_s']:.1f} s | {n / res['wall_s']:,.0f} | "
            f"{res['cpu_s']:.0f} ({res['cpu_s'] / 2:.0f} s) | {total:.1f} s | {peak:,.0f} MB | "
            f"{t.get('plan', 0):.1f} / {t.get('shards', 0):.1f} / {t.get('finalize', 0):.1f} |"
        )
    if len(rows) >= 2:
        (_, n1, r1, _, _), (_, n2, r2, _, _) = rows[0], rows[1]
        print()
        print(f"linearity: {n2 / n1:.0f}x images took {r2['wall_s'] / r1['wall_s']:.2f}x the time")
    if same is not None:
        ids_ok, pred_ok, diff, n = same
        print(
            f"dask vs local on {n:,} rows: same ids {ids_ok}, same predicted groups {pred_ok}, "
            f"max |prob diff| {diff:.2e} (ORT 1 thread per worker vs 2 threads)"
        )


if __name__ == "__main__":
    main()
