"""How fast a demo catalogue is scored: query, fetch, scoring, upsert, products/s end to end, peak RSS.

Starts a private PostgreSQL (zalando/catalogue/server.py) and, with ``--lake s3`` (the default), a
private SeaweedFS, both in a temporary folder on free ports. For each size it loads a demo catalogue
from the Fashion-MNIST test split (PNGs in the lake, ``s3://`` or ``file://`` URLs), then runs the
chained catalogue scoring (:mod:`zalando.catalogue.scoring`, what the ``catalogue`` flow's tasks call:
plan, every shard in this process, commit) twice, each in a fresh process (so the peak RSS is the run's):

1. **first run**: every product is new. Repair, query + previous scores in one snapshot, incremental
   selection, the products file; per shard: fetch (``--concurrency`` at once), decode, predict with
   the engine, data files and marker; reconcile, register, the lake commit, the write-back;
2. **re-run, nothing changed**: the same, where every image is fetched again for its digest and
   skipped: nothing is scored or written back.

Scoring: the champion of the benchmark's lake, installed from ``--bundle`` (a file lake or bundle folder,
as benchmarks/photo_inputs.py takes: its champion or newest bundle) or ``--train-quick`` (photo_inputs'
quick model); without either, a tiny random-weight fashion_cnn (real engine and timings; its groups
and text_disagrees share mean nothing). Never fails a build.

    nice -n 10 .venv/bin/python benchmarks/catalogue_scoring.py --sizes 2000,50000 --bundle .zalando/bench/photo-inputs-lake
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT.parent / "shared" / "data" / "fashion-mnist"
BENCH_KEY = "bench-catalogue-secret-91c2"

# ------------------------------------------------------------------------------------ the champion


def install_champion(lake: Any, bundle: str | None) -> str:
    """Put the scoring model into the benchmark's lake as its champion; returns its model version.

    ``bundle``: a file lake (its champion, else its newest bundle) or a bundle folder, as
    benchmarks/photo_inputs.py takes; None: a tiny random-weight fashion_cnn (real engine, real
    timings; its groups, and so the text_disagrees share, mean nothing).
    """
    from zalando import registry
    from zalando.models import load_bundle, save_bundle

    if bundle is None:
        sys.path.insert(0, str(ROOT))
        from tests.scoring_support import make_champion

        return make_champion(lake, seed=1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from photo_inputs import load_predictor  # resolves a file lake or a bundle folder

    from zalando.lake import Lake

    _, name = load_predictor(Path(bundle), 1)
    experiment, version = name.split("/")
    src = Path(bundle).resolve()
    src_lake = Lake.local(src if (src / "models").is_dir() else src.parents[2])
    b = load_bundle(src_lake, experiment, version)
    key = save_bundle(lake, b)
    registry.register_model(
        lake, model_version=version, experiment=experiment, metrics={}, spec=b.spec.model_dump(mode="json"),
        dataset_version=b.dataset_version, code_version="benchmark", bundle_key=key,
    )  # fmt: skip
    registry.promote(lake, version, reason="benchmarks/catalogue_scoring.py", actor="benchmark")
    return version


# ------------------------------------------------------------------------------------ one run (a process)


def run_once(cfg: dict[str, Any]) -> dict[str, Any]:
    """One catalogue batch through the chained code (zalando.catalogue.scoring: plan, shards, commit),
    timed stage by stage, in its own process (so the peak RSS is the run's own)."""
    import torch

    from zalando.catalogue.db import connect
    from zalando.catalogue.fetch import ImageFetcher
    from zalando.catalogue.scoring import commit_catalogue_batch, plan_catalogue_batch, score_catalogue_shard
    from zalando.lake import Lake
    from zalando.scoring.champion import load_champion_predictor
    from zalando.scoring.shard import ScoringOptions
    from zalando.settings import Settings

    torch.set_num_threads(cfg["threads"])
    settings = Settings(**cfg["settings"])
    lake = Lake.from_settings(settings)
    cat = lake.catalog()
    options = ScoringOptions()
    t_all = time.perf_counter()
    with connect(cfg["conninfo"]) as conn:
        t = time.perf_counter()
        plan = plan_catalogue_batch(
            cat, conn, database="bench", full=cfg["full"], batch_date=None, shard_size=cfg["shard"],
            runtime=cfg["runtime"], threads=cfg["threads"],
        )  # fmt: skip
        plan_s = time.perf_counter() - t
        predictor = load_champion_predictor(
            lake, plan.runtime, model_version=plan.model_version, threads=cfg["threads"]
        )
        fetcher = ImageFetcher.from_settings(settings, lake, options.image_prep)
        t = time.perf_counter()
        results = [
            score_catalogue_shard(lake, s, predictor, plan.model_version, fetcher, options)
            for s in plan.shards
        ]
        shards_s = time.perf_counter() - t
        result = commit_catalogue_batch(cat, conn, plan, options, results)
    total = time.perf_counter() - t_all
    tm = lambda k: sum(r.timings.get(k, 0.0) for r in results)  # noqa: E731
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {
        "query_s": plan.query_s,
        "plan_s": plan_s,  # the query, the model check, the products file, the shards
        "fetch_s": tm("fetch"),
        "decode_s": tm("read_decode") - tm("fetch"),
        "scoring_s": tm("predict"),
        "shard_write_s": tm("write"),
        "shards_s": shards_s,
        "lake_commit_s": result.timings.get("finalize", result.seconds),
        "upsert_s": result.write_back.seconds,
        "total_s": total,
        "products": result.products,
        "scored": result.scored,
        "quarantined": result.quarantined,
        "skipped": result.skipped_products,
        "written": result.write_back.written,
        "products_per_s": result.products / total,
        "peak_rss_mb": int(hwm.split()[1]) / 1024,
        "runtime": plan.runtime,
        "text_disagrees": f"{result.text.disagreeing} ({100 * result.text.share_of_products:.1f}% of scored)",
        "reasons": result.reasons,
    }


# ------------------------------------------------------------------------------------ the driver


def _run_in_process(cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, "--run-once", json.dumps(cfg)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise SystemExit(f"the run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _start_s3(base: Path) -> Any:
    from zalando.s3server import S3Server, free_port_block

    server = S3Server(state_dir=base / "s3", port=free_port_block(), access_key="bench", secret_key=BENCH_KEY)
    server.start(timeout=90)
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,50000", help="comma-separated product counts")
    parser.add_argument("--data", default=str(FULL), help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--lake", choices=("s3", "file"), default="s3", help="where the demo's PNGs live")
    parser.add_argument("--bundle", default=None, help="a file lake or bundle folder (photo_inputs.py's)")
    parser.add_argument("--train-quick", action="store_true", help="train photo_inputs' quick model first")
    parser.add_argument("--concurrency", type=int, default=8, help="images fetched at once")
    parser.add_argument("--shard", type=int, default=1000, help="products fetched and scored together")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--runtime", default="auto", help="auto (measured at planning), onnx, torch")
    parser.add_argument("--run-once", default=None, help=argparse.SUPPRESS)  # internal: one run, JSON in/out
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.run_once:
        print(json.dumps(run_once(json.loads(args.run_once))))
        return 0

    from zalando.catalogue.db import connect, conninfo_for, ensure_database
    from zalando.catalogue.demo import load_demo
    from zalando.catalogue.schema import init_schema
    from zalando.catalogue.server import server_for
    from zalando.data.idx import read_idx_images, read_idx_labels
    from zalando.lake import Lake
    from zalando.s3server import free_port_block
    from zalando.settings import Settings

    bundle = args.bundle
    if args.train_quick:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from photo_inputs import QUICK_LAKE, train_quick

        train_quick(Path(args.data), 8000, 3, args.threads, 0)
        bundle = str(QUICK_LAKE)
    images = read_idx_images(str(Path(args.data) / "t10k-images-idx3-ubyte.gz"))
    labels = read_idx_labels(str(Path(args.data) / "t10k-labels-idx1-ubyte.gz"))
    base = Path(tempfile.mkdtemp(prefix="zpg-bench-", dir="/tmp"))
    base.chmod(0o711)  # as root the server runs as postgres, who must enter it
    pg = server_for(
        Settings(work_dir=base / "work", catalog_port=free_port_block(size=1), catalog_db="bench")
    )
    s3 = None
    results = []
    try:
        pg.start(timeout=120)
        ensure_database(pg)
        lake_settings: dict[str, Any] = {"lake_uri": f"file://{base / 'lake'}", "batch_roots": [str(base)]}
        if args.lake == "s3":
            s3 = _start_s3(base)
            lake_settings = {
                "lake_uri": "s3://bench/lake",
                "s3_endpoint": s3.endpoint,
                "s3_access_key": "bench",
                "s3_secret_key": BENCH_KEY,
            }
        lake_settings["catalog_fetch_concurrency"] = args.concurrency
        lake_settings["work_dir"] = str(base / "lake-work")  # the lake's Iceberg catalog, this run's own
        lake = Lake.from_settings(Settings(**lake_settings))
        lake.ensure_ready()
        champion = install_champion(lake, bundle)
        print(f"# champion {champion} ({bundle or 'tiny random-weight fashion_cnn'})", flush=True)
        conninfo = conninfo_for(Settings(catalog_port=pg.port, catalog_db="bench"))
        with connect(conninfo) as conn:
            init_schema(conn)
        for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
            with connect(conninfo) as conn:
                t = time.perf_counter()
                summary = load_demo(conn, lake, images, labels, n_products=n, seed=42)
                load_s = time.perf_counter() - t
            print(
                f"# {n} products: demo loaded in {load_s:.1f}s ({summary.objects_written} PNGs written)",
                flush=True,
            )
            for run in ("first run", "re-run, nothing changed"):
                cfg = {
                    "settings": lake_settings,
                    "conninfo": conninfo,
                    "threads": args.threads,
                    "shard": args.shard,
                    "runtime": args.runtime,
                    "full": False,
                }
                row = {"size": n, "run": run, **_run_in_process(cfg)}
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if s3 is not None:
            s3.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    cols = [
        "size", "run", "query_s", "plan_s", "fetch_s", "decode_s", "scoring_s", "shard_write_s", "lake_commit_s",
        "upsert_s", "total_s", "products_per_s", "peak_rss_mb", "scored", "quarantined", "skipped", "written",
        "text_disagrees",
    ]  # fmt: skip
    print(f"\nlake: {args.lake}; fetch concurrency {args.concurrency}; shard {args.shard}; "
          f"runtime {results[0]['runtime'] if results else '?'}; threads {args.threads}; "
          f"champion: {bundle or 'tiny random-weight fashion_cnn'}")  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
