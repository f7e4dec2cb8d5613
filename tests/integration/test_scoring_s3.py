"""Batch scoring against a real SeaweedFS S3 server with a real (tiny) champion bundle, into the
lake's Iceberg tables (SQLite catalog in the work folder, warehouse in the lake's bucket).

The demo batch (mini test split) end to end, identical rows through Dask, every bad input
reconciled, image-file batches, a scoring process killed mid-batch then finished exactly once, and
DuckDB reading the predictions table on S3 while a batch is mid-write.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.conftest import MINI_DIR, TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.scoring_support import (
    article,
    batch_predictions,
    batch_quarantine,
    huge_png_header,
    jpeg_bytes,
    make_champion,
    mnist_like,
    png_bytes,
    raw_parquet,
    table_parquet,
)
from zalando.data.idx import read_idx_images, read_idx_labels
from zalando.data.ingest import put_raw_split, raw_split_files
from zalando.labels import GROUP_KEYS
from zalando.lake import Lake
from zalando.lake.catalog import LakeCatalog, RetryPolicy, open_catalog
from zalando.lake.commit import scan
from zalando.lake.keys import shard_markers_prefix
from zalando.scoring import (
    BatchPlan,
    ScoringOptions,
    batch_summary,
    clear_predictor_cache,
    finalize_batch,
    is_batch_committed,
    load_champion_predictor,
    prepare_batch,
    run_shard,
    score_batch,
    score_shard,
)
from zalando.scoring.batch import find_demo_batch
from zalando.scoring.commit import batch_record
from zalando.settings import Settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def scored_lake(s3_lake: Lake) -> tuple[Lake, str]:
    import torch

    torch.set_num_threads(1)
    clear_predictor_cache()
    return s3_lake, make_champion(s3_lake)


@pytest.fixture
def cat(s3_settings: Settings, s3_lake: Lake) -> LakeCatalog:
    return open_catalog(
        s3_settings, lake=s3_lake, retry=RetryPolicy(attempts=6, base_delay=0.05, max_delay=1.0)
    )


def _env(s3_settings: Settings) -> dict[str, str]:
    """The environment a scoring subprocess reads its settings from: this lake and this catalog."""
    return {
        **os.environ,
        "ZALANDO_LAKE_URI": s3_settings.lake_uri,
        "ZALANDO_S3_ENDPOINT": s3_settings.s3_endpoint or "",
        "ZALANDO_S3_ACCESS_KEY": s3_settings.s3_access_key,
        "ZALANDO_S3_SECRET_KEY": s3_settings.s3_secret_key.get_secret_value(),
        "ZALANDO_WORK_DIR": str(s3_settings.work_dir),
        "OMP_NUM_THREADS": "1",
    }


def _ingest_mini_test(lake: Lake) -> int:
    images = read_idx_images(str(MINI_DIR / "t10k-images-idx3-ubyte.gz"))
    labels = read_idx_labels(str(MINI_DIR / "t10k-labels-idx1-ubyte.gz"))
    ids = [f"test-{i:05d}" for i in range(len(images))]
    put_raw_split(lake, "test", ids, images, labels, digest="ingest-mini")
    return len(images)


def _without_time(table: pa.Table) -> pa.Table:
    return table.drop_columns(["scored_at"]).sort_by("image_id")


def test_demo_batch_on_s3_and_identical_rows_through_dask(
    scored_lake: tuple[Lake, str], cat: LakeCatalog, s3_settings: Settings
) -> None:
    lake, version = scored_lake
    n = _ingest_mini_test(lake)
    demo = find_demo_batch(lake)
    r = score_batch(cat, demo, batch_date="2026-05-01", shard_size=128, runtime="onnx", threads=1)
    assert r.batch_id == "2026-05-01-fashion-mnist-test" and r.model_version == version
    assert (r.records, r.scored, r.quarantined) == (n, n, 0)
    assert r.predictions_table == "zalando.predictions" and r.data_files == r.shards
    row = batch_record(cat, r.batch_id, version)
    assert row is not None
    ((key, _, _),) = raw_split_files(lake, "test")  # the batch read exactly the table's file
    assert row["inputs"]["files"][0]["sha256"] == hashlib.sha256(lake.read_bytes(key)).hexdigest()
    assert row["records"] == n and row["runtimes"] == "onnx"
    local = batch_predictions(cat, r.batch_id)
    assert local.num_rows == n and len(set(local.column("image_id").to_pylist())) == n
    assert sum(r.group_counts.values()) == n
    for g, key in enumerate(GROUP_KEYS):  # the per-group view: a filter of the same rows
        view = scan(cat, "predictions", {"batch_id": r.batch_id, "pred_group": g}, columns=["pred_group"])
        assert view.num_rows == r.group_counts[key]

    # the same batch through a Dask cluster (threads), forced: identical rows but for scored_at
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):

        def on_dask(plan: BatchPlan) -> list:
            futures = client.map(
                run_shard,
                plan.shards,
                model_version=plan.model_version,
                settings=s3_settings,
                runtime=plan.runtime,
                threads=1,
                pure=False,
            )
            return client.gather(futures)

        r2 = score_batch(
            cat,
            demo,
            batch_date="2026-05-01",
            shard_size=128,
            force=True,
            map_shards=on_dask,
            runtime="onnx",  # "auto" may measure torch faster under load: the comparison needs one runtime
            threads=1,
        )
    assert (r2.records, r2.scored, r2.shards_skipped) == (n, n, 0)
    dask_rows = batch_predictions(cat, r2.batch_id)
    assert _without_time(dask_rows).equals(_without_time(local))


def test_an_admitted_int8_champion_scores_the_demo_batch_on_s3_and_its_worker_is_torch_free(
    s3_lake: Lake, cat: LakeCatalog, s3_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A champion built as training builds it (model.int8.onnx, verdicts on validation) scores with
    onnx-int8: planned, committed, and loaded from S3 by a worker that never imports torch."""
    import torch

    from zalando import admission
    from zalando.admission import RuntimeCheckData

    torch.set_num_threads(1)
    clear_predictor_cache()
    monkeypatch.setattr(admission, "MAX_ACCURACY_DROP", 1.0)  # a random-weight model: int8 admitted for sure
    x = read_idx_images(str(MINI_DIR / "train-images-idx3-ubyte.gz"))
    y = read_idx_labels(str(MINI_DIR / "train-labels-idx1-ubyte.gz"))
    checks = RuntimeCheckData.from_training({"x_train": x[:1000], "x_val": x[1000:], "y_val": y[1000:]})
    version = make_champion(s3_lake, runtime_checks=checks)
    n = _ingest_mini_test(s3_lake)
    r = score_batch(cat, find_demo_batch(s3_lake), batch_date="2026-05-06", runtime="onnx-int8", threads=1)
    assert (r.model_version, r.records, r.scored, r.quarantined) == (version, n, n, 0)
    row = batch_record(cat, r.batch_id, version)
    assert row is not None and row["runtimes"] == "onnx-int8"
    assert batch_predictions(cat, r.batch_id).num_rows == n

    code = (
        "import sys; from zalando.lake.catalog import open_catalog; from zalando.settings import load_settings\n"
        "from zalando.scoring import load_champion_predictor\n"
        "p = load_champion_predictor(open_catalog(load_settings()).lake, 'onnx-int8', threads=1)\n"
        "assert (p.runtime, p.checks['verify']) == ('onnx-int8', 'light'), p.checks\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(p.model_version)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(s3_settings), capture_output=True, text=True,
        timeout=180, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == version


def test_bad_inputs_on_s3_reconcile(scored_lake: tuple[Lake, str], cat: LakeCatalog) -> None:
    lake, version = scored_lake
    imgs = mnist_like(8, seed=5)
    files = {
        "good.parquet": raw_parquet([f"g{i}" for i in range(6)], imgs[:6]),
        "dup.parquet": raw_parquet(["g5", "g6"], imgs[6:8]),  # g5 again: a duplicate id across shards
        "values.parquet": table_parquet(
            pa.table(
                {
                    "image_id": ["nan", "range"],
                    "image": pa.array([[float("nan")] * 784, [-1.0] * 784], pa.list_(pa.float32())),
                }
            )
        ),
        "schema.parquet": table_parquet(pa.table({"image_id": ["s"], "img": [b"x"]})),
        "corrupt.parquet": b"PAR1" + os.urandom(64),
        "shape.parquet": table_parquet(
            pa.table({"image_id": ["short"], "image": pa.array([b"\x01" * 50], pa.binary())})
        ),
        "zero.png": b"",
        "readme.txt": b"not an image",
        "one.png": png_bytes(np.zeros((1, 1), np.uint8)),
        "huge.png": huge_png_header(),
    }
    for name, data in files.items():
        lake.write_bytes(f"incoming/bad/{name}", data)
    opts = ScoringOptions(sub_batch=4)
    r = score_batch(
        cat, "incoming/bad", batch_date="2026-05-02", shard_size=3, options=opts, runtime="onnx", threads=1
    )
    assert r.scored == 7  # g0..g6
    assert r.reasons == {
        "corrupt_parquet": 1,
        "duplicate_id": 1,
        "empty_file": 1,
        "nan_values": 1,
        "not_an_image": 1,
        "out_of_range": 1,
        "too_large": 1,
        "too_small": 1,
        "wrong_schema": 1,
        "wrong_shape": 1,
    }
    assert r.records == r.scored + r.quarantined == 17
    q = batch_quarantine(cat, r.batch_id, version)
    assert sorted(q.column("reason").to_pylist()) == sorted(k for k, v in r.reasons.items() for _ in range(v))
    assert batch_summary(cat, r.batch_id, version).quarantined == 10
    text = q.filter(pc.equal(q.column("reason"), "not_an_image")).to_pylist()[0]
    assert text["image"] is None and text["size"] == len(b"not an image")  # evidence, no payload


def test_image_file_batch_png_and_jpeg_light_and_dark(
    scored_lake: tuple[Lake, str], cat: LakeCatalog
) -> None:
    lake, _ = scored_lake
    for i, (fmt, light) in enumerate([("png", True), ("png", False), ("jpg", True), ("jpg", False)]):
        a = article((60 + 10 * i, 40), light_background=light, seed=i)
        data = png_bytes(a) if fmt == "png" else jpeg_bytes(a)
        lake.write_bytes(f"incoming/photos/item-{i}.{fmt}", data)
    r = score_batch(cat, "incoming/photos", batch_date="2026-05-03", runtime="onnx", threads=1)
    assert (r.records, r.scored, r.quarantined) == (4, 4, 0)
    ids = sorted(batch_predictions(cat, r.batch_id).column("image_id").to_pylist())
    assert ids == [f"item-{i}" for i in range(4)]
    stats = batch_record(cat, r.batch_id, r.model_version)["pixel_stats"]  # type: ignore[index]
    assert stats["mean"] < 0.45  # every picture ends up light-on-dark, the light ones inverted


_KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from zalando.lake.catalog import open_catalog
    from zalando.scoring import load_champion_predictor, score_batch
    from zalando.settings import load_settings

    cat = open_catalog(load_settings())
    champion = load_champion_predictor(cat.lake, "onnx", threads=1)

    class Slow:
        runtime = "onnx"
        def predict(self, images):
            time.sleep(0.25)
            return champion.predict(images)

    print("started", flush=True)
    score_batch(cat, "incoming/big", predictor=Slow(), model_version=champion.model_version,
                batch_date="2026-05-04", shard_size=20)
    print("finished", flush=True)
    """
)


def test_killed_mid_batch_rerun_completes_only_missing_shards(
    scored_lake: tuple[Lake, str], cat: LakeCatalog, s3_settings: Settings
) -> None:
    lake, version = scored_lake
    n = 400
    imgs = mnist_like(n, seed=9)
    ids = [f"k{i:04d}" for i in range(n)]
    lake.write_bytes("incoming/big/a.parquet", raw_parquet(ids[:200], imgs[:200], row_group_size=20))
    lake.write_bytes("incoming/big/b.parquet", raw_parquet(ids[200:], imgs[200:], row_group_size=20))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SCRIPT],
        cwd=ROOT,
        env=_env(s3_settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    batch_id = "2026-05-04-big"
    markers = shard_markers_prefix("2026-05-04", version, batch_id)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and len(lake.list_keys(markers)) < 4:
            assert proc.poll() is None, (
                proc.stdout.read().decode() if proc.stdout else "scoring process exited"
            )
            time.sleep(0.1)
        done_before = len(lake.list_keys(markers))
        assert 4 <= done_before < 20, f"{done_before} shards committed before the kill"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert not is_batch_committed(cat, batch_id, version)
    assert batch_predictions(cat, batch_id).num_rows == 0  # its shard files: written, never visible
    assert len(lake.list_keys("zalando/predictions/data/batch_date=2026-05-04")) >= done_before

    calls = []
    champion = load_champion_predictor(lake, "onnx", threads=1)

    class Counting:
        runtime = "onnx"

        def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            calls.append(len(images))
            return champion.predict(images)

    r = score_batch(
        cat,
        "incoming/big",
        predictor=Counting(),
        model_version=version,
        batch_date="2026-05-04",
        shard_size=20,
    )
    assert r.shards == 20 and r.shards_skipped >= done_before
    assert sum(calls) == (20 - r.shards_skipped) * 20  # only the missing shards were scored
    table = batch_predictions(cat, r.batch_id)
    assert table.num_rows == n and sorted(table.column("image_id").to_pylist()) == ids  # one row per image


def test_an_s3_batch_with_no_objects_or_in_another_bucket_is_refused(scored_lake: tuple[Lake, str]) -> None:
    from zalando.scoring import ScoringInputError

    lake, _ = scored_lake
    bucket = lake.root.split("/", 1)[0]
    for location in (f"s3://{bucket}/no-such-prefix", "incoming/no-such-prefix"):  # a typo in the URI
        with pytest.raises(ScoringInputError, match="no input files") as e:
            score_batch(lake.catalog(), location, batch_date="2026-05-05", runtime="onnx", threads=1)
        assert "no-such-prefix" in str(e.value) and "\n" not in str(e.value)
    assert lake.list_keys("predictions") == []
    lake.write_bytes("incoming/elsewhere/a.parquet", raw_parquet(["e0"], mnist_like(1)))
    with pytest.raises(ScoringInputError, match="ZALANDO_BATCH_BUCKETS") as e:
        score_batch(
            lake.catalog(), "s3://another-bucket/incoming/elsewhere", batch_date="2026-05-05", runtime="onnx"
        )
    assert bucket in str(e.value)


def test_batch_scoring_flow_reports_the_wall_time_of_the_batch_and_refuses_outside_roots(
    prefect_harness: None, flow_env: dict[str, str]
) -> None:
    """`seconds` in the flow's summary is the batch's time from planning to commit (it was the commit's)."""
    from datetime import date

    from flows.batch_scoring import batch_scoring
    from zalando.scoring import ScoringInputError
    from zalando.settings import load_settings

    lake = Lake.from_settings(load_settings())
    lake.ensure_ready()
    make_champion(lake, seed=3)
    lake.write_bytes("incoming/timed/a.parquet", raw_parquet([f"t{i}" for i in range(60)], mnist_like(60, 4)))
    t0 = time.perf_counter()
    summary = batch_scoring(
        batch_uri="incoming/timed", batch_date=date(2026, 5, 9), shard_size=10, runtime="onnx", monitor=False
    )
    wall = time.perf_counter() - t0
    markers = [
        lake.read_json(k)
        for k in lake.list_keys(
            shard_markers_prefix(date(2026, 5, 9), summary["model_version"], summary["batch_id"])
        )
    ]
    assert len(markers) == 6 and summary["scored"] == 60
    shard_seconds = sum(sum(m["timings"].values()) for m in markers)  # read + predict + write, per shard
    t = summary["timings"]
    assert set(t) >= {"plan", "shards", "finalize"} and shard_seconds <= t["shards"]  # one worker
    assert t["plan"] + t["shards"] + t["finalize"] <= summary["seconds"] + 1e-3
    assert shard_seconds + t["finalize"] <= summary["seconds"] <= wall, (shard_seconds, summary, wall)
    assert summary["images_per_s"] == pytest.approx(60 / summary["seconds"], rel=1e-3)
    with pytest.raises(ScoringInputError, match="ZALANDO_BATCH_ROOTS"):
        batch_scoring(batch_uri="file:///etc", batch_date=date(2026, 5, 9), runtime="onnx", monitor=False)


def test_duckdb_on_s3_sees_only_committed_batches_while_one_is_mid_write(
    cat: LakeCatalog, s3_settings: Settings, s3_lake: Lake
) -> None:
    """A second engine with the lake's S3 settings (the README's lines): while batch 2's shards are
    on S3 but not committed, exactly batch 1's rows; after its one commit, both."""
    from tests.lakehouse_support import duckdb_with_iceberg
    from tests.scoring_support import FakePredictor
    from zalando.lake.tables import load_table

    v = "20260101T000000Z-fake"
    for b, n in (("one", 30), ("two", 50)):
        s3_lake.write_bytes(
            f"incoming/{b}/a.parquet", raw_parquet([f"{b}-{i}" for i in range(n)], mnist_like(n))
        )
    one = score_batch(
        cat, "incoming/one", predictor=FakePredictor(), model_version=v, batch_date="2026-05-05"
    )
    plan = prepare_batch(
        cat, "incoming/two", model_version=v, batch_date="2026-05-05", shard_size=20, check_model=False
    )
    results = [score_shard(s3_lake, s, FakePredictor(), v) for s in plan.shards]
    con = duckdb_with_iceberg()
    host = (s3_settings.s3_endpoint or "").removeprefix("http://")
    con.execute(
        f"CREATE SECRET lake (TYPE s3, KEY_ID '{TEST_ACCESS_KEY}', SECRET '{TEST_SECRET_KEY}', "
        f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false, REGION '{s3_settings.s3_region}')"
    )

    def counts() -> list[tuple[str, int]]:
        metadata = load_table(cat, "predictions").metadata_location
        sql = f"SELECT batch_id, count(*) FROM iceberg_scan('{metadata}') GROUP BY 1 ORDER BY 1"
        return con.sql(sql).fetchall()

    assert sum(r.scored for r in results) == 50
    assert counts() == [(one.batch_id, 30)]
    two = finalize_batch(cat, plan.batch, plan.shards, v, results=results)
    assert counts() == [(one.batch_id, 30), (two.batch_id, 50)]
