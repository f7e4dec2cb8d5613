"""How fast a demo catalogue is scored: query, fetch, scoring, upsert, products/s end to end, peak RSS.

Starts a private PostgreSQL (zalando/catalogue/server.py) and, with ``--lake s3`` (the default), a
private SeaweedFS, both in a temporary folder on free ports. For each size it loads a demo catalogue
from the Fashion-MNIST test split (PNGs in the lake, ``s3://`` or ``file://`` URLs), then runs the
catalogue-scoring pieces twice in a fresh process each (so the peak RSS is the run's own):

1. **first run**: every product is new. Query + previous scores in one snapshot, incremental
   selection, fetch (``zalando.catalogue.fetch``, ``--concurrency`` threads) shard by shard, decode
   (``zalando.images.decode_image``) and predict, the text check, one write-back transaction;
2. **re-run, nothing changed**: the same, where every image is fetched again for its digest and
   skipped, so nothing is scored or written.

Scoring: ``--bundle`` (a file lake or bundle folder, as benchmarks/photo_inputs.py takes; its champion
or newest bundle) or ``--train-quick`` (photo_inputs' quick model) scores with the torch predictor;
without either a placeholder stands in (every product 'Upper part', confidence 0) until the
``catalogue_scoring`` flow exists and this calls it. Never fails a build.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT.parent / "shared" / "data" / "fashion-mnist"
BENCH_KEY = "bench-catalogue-secret-91c2"

# (images (n, 28, 28) uint8) -> (group index per image, confidence per image)
ScoreFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ------------------------------------------------------------------------------------ one run (a process)


def _scorer(bundle: str | None, threads: int) -> tuple[ScoreFn, str, float]:
    """The scoring hook, the model version it writes, and the seconds loading it took."""
    t = time.perf_counter()
    if bundle is None:

        def placeholder(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return np.zeros(len(images), np.int64), np.zeros(len(images), np.float32)

        return placeholder, "placeholder", 0.0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from photo_inputs import load_predictor  # benchmarks/photo_inputs.py: the champion or newest bundle

    torch.set_num_threads(threads)
    predictor, name = load_predictor(Path(bundle), threads)

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, _ = predictor.predict(images)
        return probs.argmax(1), probs.max(1)

    return score, name.rsplit("/", 1)[-1], time.perf_counter() - t


def _decode(to_score: list[Any]) -> tuple[list[Any], list[np.ndarray], list[int]]:
    """(fetched images that decode, their pixels, ids of the rest): a fetch problem or a decode
    rejection (a decompression bomb, a corrupt PNG) is quarantined."""
    from zalando.images import ImageRejected, decode_image

    ok, pixels, rejected = [], [], []
    for f in to_score:
        try:
            if f.ok:
                pixels.append(decode_image(f.data, name=str(f.product_id)))
                ok.append(f)
                continue
        except ImageRejected:
            pass
        rejected.append(f.product_id)
    return ok, pixels, rejected


def _prediction(f: Any, group: str, confidence: float, version: str, batch_id: str, at: Any) -> Any:
    """The write-back row of one scored image (the flow reads these from the lake's committed predictions)."""
    from zalando.catalogue.writeback import PredictionRow

    return PredictionRow(
        product_id=f.product_id,
        group=group,
        confidence=min(max(confidence, 0.0), 1.0),
        model_version=version,
        batch_id=batch_id,
        scored_at=at,
        image_id=f.image_id,
        image_url=f.url,
        image_sha256=f.sha256,
    )


def run_once(cfg: dict[str, Any]) -> dict[str, Any]:
    """One catalogue batch, query to write-back, timed step by step (runs in its own process)."""
    from datetime import UTC, datetime

    from zalando.catalogue.db import connect
    from zalando.catalogue.fetch import ImageFetcher
    from zalando.catalogue.incremental import drop_unchanged, read_previous, reconcile, select_for_scoring
    from zalando.catalogue.query import catalogue_snapshot
    from zalando.catalogue.text import summarize_text_checks
    from zalando.catalogue.writeback import PredictionRow, write_back
    from zalando.labels import GROUP_NAMES
    from zalando.lake import Lake
    from zalando.settings import Settings

    settings = Settings(**cfg["settings"])
    lake = Lake.from_settings(settings)
    score, version, load_s = _scorer(cfg["bundle"], cfg["threads"])
    fetcher = ImageFetcher.from_settings(settings, lake)
    t_all = time.perf_counter()
    times = {"query_s": 0.0, "fetch_s": 0.0, "decode_s": 0.0, "scoring_s": 0.0, "upsert_s": 0.0}
    scored: list[PredictionRow] = []
    quarantined: list[int] = []
    skipped: list[int] = []
    texts: list[tuple[str | None, str]] = []
    with connect(cfg["conninfo"]) as conn:
        t = time.perf_counter()
        with catalogue_snapshot(conn) as snap:
            rows = list(snap.rows())
            previous = read_previous(snap)
        candidates, skipped_early = select_for_scoring(rows, previous, version)
        skipped += [s.product_id for s in skipped_early]
        times["query_s"] = time.perf_counter() - t
        at = datetime.now(UTC)
        for start in range(0, len(candidates), cfg["shard"]):
            chunk = candidates[start : start + cfg["shard"]]
            t = time.perf_counter()
            fetched = fetcher.fetch_all([c.row for c in chunk])
            times["fetch_s"] += time.perf_counter() - t
            to_score, unchanged = drop_unchanged(chunk, fetched)
            skipped += [s.product_id for s in unchanged]
            t = time.perf_counter()
            ok, pixels, rejected = _decode(to_score)
            quarantined += rejected
            times["decode_s"] += time.perf_counter() - t
            t = time.perf_counter()
            if ok:
                groups, confidence = score(np.stack(pixels))
                rows_of = {c.row.product_id: c.row for c in chunk}
                for f, g, c in zip(ok, groups.tolist(), confidence.tolist(), strict=True):
                    scored.append(_prediction(f, GROUP_NAMES[g], c, version, cfg["batch_id"], at))
                    texts.append((rows_of[f.product_id].description, GROUP_NAMES[g]))
            times["scoring_s"] += time.perf_counter() - t
        t = time.perf_counter()
        result = write_back(conn, cfg["batch_id"], scored)
        times["upsert_s"] = time.perf_counter() - t
    total = time.perf_counter() - t_all
    rec = reconcile([r.product_id for r in rows], [p.product_id for p in scored], quarantined, skipped)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    text = summarize_text_checks(texts)
    return {
        **times,
        "total_s": total,
        "model_load_s": load_s,
        "products": rec.products,
        "scored": rec.scored,
        "quarantined": rec.quarantined,
        "skipped": rec.skipped,
        "written": result.written,
        "products_per_s": rec.products / total,
        "peak_rss_mb": int(hwm.split()[1]) / 1024,
        "text_disagrees": (
            f"{text.disagreeing} ({100 * text.share_of_products:.1f}% of scored)"
            if cfg["bundle"]
            else "n/a (placeholder scores)"
        ),
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
        lake = Lake.from_settings(Settings(**lake_settings))
        lake.ensure_ready()
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
            for run, batch_id in (("first run", f"bench-{n}-1"), ("re-run, nothing changed", f"bench-{n}-2")):
                cfg = {
                    "settings": lake_settings,
                    "conninfo": conninfo,
                    "bundle": bundle,
                    "threads": args.threads,
                    "shard": args.shard,
                    "batch_id": batch_id,
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
        "size", "run", "query_s", "fetch_s", "decode_s", "scoring_s", "upsert_s", "total_s", "products_per_s",
        "peak_rss_mb", "scored", "quarantined", "skipped", "written", "text_disagrees",
    ]  # fmt: skip
    print(f"\nlake: {args.lake}; fetch concurrency {args.concurrency}; shard {args.shard}; "
          f"scoring: {bundle or 'placeholder'}")  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
