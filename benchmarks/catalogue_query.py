"""How long the catalogue query takes on demo catalogues, and how often the text lexicon disagrees.

Starts a private PostgreSQL (zalando/catalogue/server.py) in a temporary folder on a free port, then
for each size loads a demo catalogue from the Fashion-MNIST test split (PNGs into a file:// lake in
the same folder) and times: planning the demo, writing its PNGs, loading the rows (COPY), and the
query (count + every row streamed from one snapshot, typed rows, lexicon applied) --repeat times,
and the query's execution time inside PostgreSQL (EXPLAIN ANALYZE).
Also reports the peak RSS of a fresh process that only streams every row (streaming: it should not
grow with the catalogue) and how often `text_disagrees` fires against the demo's truth (the group a perfect model
would predict): only the deliberately wrong descriptions should. Stops the server. Never fails a build.

    .venv/bin/python benchmarks/catalogue_query.py [--sizes 2000,50000] [--repeat 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT.parent / "shared" / "data" / "fashion-mnist"


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec
_QUERY_ALONE = """
import os
from zalando.catalogue.db import connect
from zalando.catalogue.query import iter_products
with connect(os.environ["BENCH_CONNINFO"]) as conn:
    n = sum(1 for _ in iter_products(conn))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) / 1024)
"""


def _query_alone(conninfo: str) -> float:
    """Peak RSS (MB) of a fresh process that only connects and streams every row."""
    env = {**os.environ, "BENCH_CONNINFO": conninfo, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _QUERY_ALONE], capture_output=True, text=True, env=env, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,50000", help="comma-separated product counts")
    parser.add_argument("--repeat", type=int, default=3, help="query runs per size (median reported)")
    parser.add_argument("--data", default=str(FULL), help="folder with the Fashion-MNIST IDX files")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from zalando.catalogue.db import connect, conninfo_for, ensure_database
    from zalando.catalogue.demo import build_demo, load_demo
    from zalando.catalogue.lexicon import text_disagrees
    from zalando.catalogue.query import PRODUCT_QUERY, catalogue_snapshot
    from zalando.catalogue.schema import init_schema
    from zalando.catalogue.server import server_for
    from zalando.data.idx import read_idx_images, read_idx_labels
    from zalando.lake import Lake
    from zalando.s3server import free_port_block
    from zalando.settings import Settings

    images = read_idx_images(str(Path(args.data) / "t10k-images-idx3-ubyte.gz"))
    labels = read_idx_labels(str(Path(args.data) / "t10k-labels-idx1-ubyte.gz"))
    base = Path(tempfile.mkdtemp(prefix="zpg-bench-", dir="/tmp"))
    base.chmod(0o711)  # as root the server runs as postgres, who must enter it
    settings = Settings(work_dir=base / "work", catalog_port=free_port_block(size=1), catalog_db="bench")
    server = server_for(settings)
    rows_out = []
    try:
        t0 = time.perf_counter()
        server.start(timeout=120)
        ensure_database(server)
        print(f"server up in {time.perf_counter() - t0:.1f}s on {server.address}", flush=True)
        lake = Lake.local(base / "lake")
        with connect(conninfo_for(settings)) as conn:
            init_schema(conn)
            for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
                t = time.perf_counter()
                build_demo(labels, n_products=n, seed=42)
                plan_s = time.perf_counter() - t
                t = time.perf_counter()
                summary = load_demo(conn, lake, images, labels, n_products=n, seed=42)
                load_s = time.perf_counter() - t
                truth = {
                    pid: (group, defect)
                    for pid, group, defect in conn.execute(
                        'SELECT product_id, "group", defect FROM demo_truth'
                    )
                }
                conn.rollback()
                times, flagged, described, flagged_wrong = [], 0, 0, 0
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    with catalogue_snapshot(conn) as snap:
                        total = snap.count_products()
                        seen = 0
                        for row in snap.rows("us"):
                            seen += 1
                            if row.description:
                                group, defect = truth[row.product_id]
                                described += 1
                                if text_disagrees(row.description, group):
                                    flagged += 1
                                    flagged_wrong += defect == "wrong_description"
                    times.append(time.perf_counter() - t)
                assert seen == total == n
                plan = conn.execute(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + PRODUCT_QUERY, {"country": "us", "limit": None}
                ).fetchone()[0][0]  # type: ignore[index]
                conn.rollback()
                alone = _query_alone(conninfo_for(settings))
                rows_out.append(
                    {
                        "products": n,
                        "images": summary.images,
                        "plan_s": plan_s,
                        "load_s (PNGs + COPY)": load_s,
                        "PNGs written": summary.objects_written,
                        "query_s (median)": statistics.median(times),
                        "of it in PostgreSQL_s": plan["Execution Time"] / 1000,
                        "rows/s": n / statistics.median(times),
                        "peak RSS, query alone MB": alone,
                        "text_disagrees": f"{flagged // args.repeat} of {described // args.repeat} "
                        f"({100 * flagged / max(described, 1):.1f}%), {flagged_wrong // args.repeat} of them "
                        f"wrong by design (of {summary.defects['wrong_description']})",
                    }
                )
                print(rows_out[-1], flush=True)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    cols = list(rows_out[0]) if rows_out else []
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows_out:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    print(f"\npeak RSS of this process (the 50k demo plan dominates it): {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
