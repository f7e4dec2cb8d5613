"""The scoring engine on a local lake (Iceberg tables, SQLite catalog) with a fake predictor: outputs,
exactly-once, bad input, backfill."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.scoring_support import (
    FakePredictor,
    batch_predictions,
    batch_quarantine,
    committed_files,
    huge_png_header,
    jpeg_bytes,
    local_catalog,
    mnist_like,
    png_bytes,
    raw_parquet,
    table_parquet,
    write_files,
)
from zalando.labels import GROUP_KEYS
from zalando.lake import Lake
from zalando.lake.catalog import LakeCatalog
from zalando.lake.commit import scan
from zalando.lake.keys import shard_marker_key
from zalando.lake.tables import TABLES
from zalando.scoring import (
    ScoringError,
    ScoringInputError,
    ScoringOptions,
    backfill,
    finalize_batch,
    is_batch_committed,
    prepare_batch,
    score_batch,
    score_shard,
)

V = "v-test"


@pytest.fixture
def cat(tmp_path: Path) -> LakeCatalog:
    return local_catalog(tmp_path)


@pytest.fixture
def lake(cat: LakeCatalog) -> Lake:
    return cat.lake


def _good_batch(root: Path, n: int = 40, files: int = 2, seed: int = 0) -> tuple[Path, list[str]]:
    imgs = mnist_like(n, seed)
    ids = [f"id-{seed}-{i:04d}" for i in range(n)]
    per = n // files
    write_files(
        root,
        {
            f"part-{k}.parquet": raw_parquet(
                ids[k * per : (k + 1) * per], imgs[k * per : (k + 1) * per], row_group_size=7
            )
            for k in range(files)
        },
    )
    return root, ids


def test_score_batch_commits_predictions_views_and_its_row_last(cat: LakeCatalog, tmp_path: Path) -> None:
    src, ids = _good_batch(tmp_path / "in")
    opts = ScoringOptions(sub_batch=8, confidence_threshold=0.5)
    r = score_batch(
        cat,
        src.as_uri(),
        predictor=FakePredictor(),
        model_version=V,
        batch_date="2026-03-01",
        source="shop",
        shard_size=10,
        options=opts,
    )
    assert (r.records, r.scored, r.quarantined, r.skipped) == (40, 40, 0, False)
    assert r.batch_id == "2026-03-01-shop" and r.predictions_table == "zalando.predictions"
    table = batch_predictions(cat, r.batch_id, V)
    assert table.schema.equals(TABLES["predictions"].schema)
    assert sorted(table.column("image_id").to_pylist()) == sorted(ids)
    assert set(table.column("batch_id").to_pylist()) == {r.batch_id}
    probs = np.stack([table.column(f"prob_{k}").to_numpy() for k in GROUP_KEYS], 1)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(table.column("pred_group").to_numpy(), probs.argmax(1))
    row = scan(cat, "batches", {"batch_id": r.batch_id, "model_version": V}).to_pylist()
    assert len(row) == 1
    counts = {k: row[0][k] for k in ("records", "scored", "quarantined", "low_confidence")}
    assert counts == {"records": 40, "scored": 40, "quarantined": 0, "low_confidence": r.low_confidence}
    assert len(json.loads(row[0]["inputs"])["files"]) == 2 and row[0]["scored"] == 40
    assert row[0]["predictions_snapshot_id"] == r.snapshot_id
    # one data file per shard, named by (date, model, batch, plan, shard), all in one snapshot
    files = committed_files(cat, "predictions", {"batch_id": r.batch_id})
    assert len(files) == r.shards == r.data_files
    prefix = (
        f"zalando/predictions/data/batch_date=2026-03-01/model_version={V}/batch_id=2026-03-01-shop/run_id="
    )
    assert all(f.startswith(prefix) for f in files)
    assert [f.rsplit("/", 1)[1] for f in files] == [f"part-{i:05d}.parquet" for i in range(r.shards)]
    # the per-group view is a filter of the one table: each group's rows are exactly those predicted so
    seen = 0
    for g, gkey in enumerate(GROUP_KEYS):
        rows = scan(cat, "predictions", {"batch_id": r.batch_id, "pred_group": g})
        assert all(p == g for p in rows.column("pred_group").to_pylist())
        assert rows.num_rows == r.group_counts[gkey]
        seen += rows.num_rows
    assert seen == 40
    # the review queue too: needs_review marks confidence below the threshold
    review = scan(cat, "predictions", {"batch_id": r.batch_id, "needs_review": True})
    assert review.num_rows == r.low_confidence and all(
        c < 0.5 for c in review.column("confidence").to_pylist()
    )
    assert scan(cat, "predictions", "confidence < 0.5").num_rows == r.low_confidence
    emb_keys = json.loads(row[0]["embeddings"])
    emb = pa.concat_tables([pq.read_table(io.BytesIO(cat.lake.read_bytes(k))) for k in emb_keys])
    assert emb.num_rows > 0 and emb.column("embedding").type.list_size == 4
    assert all(k.startswith(f"scoring/batch_date=2026-03-01/model_version={V}/") for k in emb_keys)
    # the whole day reads as one table
    day = scan(cat, "predictions", {"batch_date": "2026-03-01"})
    assert day.num_rows == 40 and {str(d) for d in day.column("batch_date").to_pylist()} == {"2026-03-01"}
    # the snapshot that committed the batch says so, for any engine
    from zalando.lake.tables import load_table

    snap = load_table(cat, "predictions").snapshot_by_id(r.snapshot_id)
    assert snap.summary["zalando.batch.id"] == r.batch_id and snap.summary["zalando.batch.scored"] == "40"


def test_committed_batch_is_skipped_unless_forced(cat: LakeCatalog, tmp_path: Path) -> None:
    src, _ = _good_batch(tmp_path / "in", n=20)
    first = FakePredictor()
    done = score_batch(
        cat, src.as_uri(), predictor=first, model_version=V, batch_date="2026-03-02", shard_size=10
    )
    again = FakePredictor()
    r = score_batch(
        cat, src.as_uri(), predictor=again, model_version=V, batch_date="2026-03-02", shard_size=10
    )
    assert r.skipped and again.calls == 0 and r.scored == 20 and r.snapshot_id == done.snapshot_id
    forced = FakePredictor()
    r = score_batch(
        cat,
        src.as_uri(),
        predictor=forced,
        model_version=V,
        batch_date="2026-03-02",
        shard_size=10,
        force=True,
    )
    assert not r.skipped and forced.calls > 0 and r.shards_skipped == 0
    assert batch_predictions(cat, r.batch_id).num_rows == 20  # replaced, never duplicated
    assert r.snapshot_id != done.snapshot_id
    from zalando.scoring.commit import batch_record

    samples = batch_record(cat, r.batch_id, V)["embeddings"]  # type: ignore[index]
    sample_objects = [k for k in cat.lake.list_keys("scoring") if "/embeddings/" in k]
    assert samples and sorted(sample_objects) == sorted(samples)  # the replaced run's sample is gone


def test_shard_failing_on_first_attempt_is_finished_by_the_rerun_exactly_once(
    cat: LakeCatalog, lake: Lake, tmp_path: Path
) -> None:
    src, ids = _good_batch(tmp_path / "in", n=60, files=3)
    plan = prepare_batch(
        cat, src.as_uri(), model_version=V, batch_date="2026-03-03", shard_size=7, check_model=False
    )
    assert len(plan.shards) >= 6
    flaky = FakePredictor(fail_on_call=4)  # the 4th shard "crashes"
    done, failed = [], []
    for s in plan.shards:
        try:
            done.append(score_shard(lake, s, flaky, V))
        except RuntimeError:
            failed.append(s.shard_id)
    assert failed == [3]
    with pytest.raises(ScoringError, match=r"1 of \d+ shards not committed \(ids \[3\]\)"):
        finalize_batch(cat, plan.batch, plan.shards, V)
    assert not is_batch_committed(cat, plan.batch_id, V)
    assert batch_predictions(cat, plan.batch_id).num_rows == 0  # the written shard files: invisible
    # the re-run (a new plan, as a retry or a new process would make it) scores only shard 3
    plan2 = prepare_batch(
        cat, src.as_uri(), model_version=V, batch_date="2026-03-03", shard_size=7, check_model=False
    )
    counter = FakePredictor()
    results = [score_shard(lake, s, counter, V) for s in plan2.shards]
    assert [r.shard_id for r in results if not r.skipped] == [3] and counter.calls == 1
    r = finalize_batch(cat, plan2.batch, plan2.shards, V, results=results)
    assert r.shards_skipped == len(plan2.shards) - 1
    table = batch_predictions(cat, r.batch_id)
    assert sorted(table.column("image_id").to_pylist()) == sorted(ids)  # one row per image
    # shard 3's file is the re-run's own; the others are the first plan's, committed as they were
    files = committed_files(cat, "predictions", {"batch_id": r.batch_id})
    assert sum(f"run_id={plan2.write_id}/" in f for f in files) == 1


def test_half_written_shard_is_overwritten_not_duplicated(
    cat: LakeCatalog, lake: Lake, tmp_path: Path
) -> None:
    src, ids = _good_batch(tmp_path / "in", n=20)
    plan = prepare_batch(
        cat, src.as_uri(), model_version=V, batch_date="2026-03-04", shard_size=10, check_model=False
    )
    score_shard(lake, plan.shards[0], FakePredictor(), V)
    # a crash after the part file but before the marker: delete the marker, keep the part
    marker = shard_marker_key(plan.batch_date, V, plan.batch_id, 0)
    lake.delete(marker)
    results = [score_shard(lake, s, FakePredictor(), V) for s in plan.shards]
    assert not any(r.skipped for r in results)
    r = finalize_batch(cat, plan.batch, plan.shards, V)
    assert batch_predictions(cat, r.batch_id).num_rows == 20


def test_bad_inputs_are_quarantined_and_counts_reconcile(cat: LakeCatalog, tmp_path: Path) -> None:
    imgs = mnist_like(12, seed=3)
    good_ids = [f"g{i}" for i in range(10)]
    nan_table = pa.table(
        {
            "image_id": ["f-ok", "f-nan", "f-big", None, "f-short"],
            "image": pa.array(
                [
                    imgs[0].ravel().tolist(),
                    [float("nan")] * 784,
                    [999.0] * 784,
                    imgs[1].ravel().tolist(),
                    [1.0] * 5,
                ],
                pa.list_(pa.float32()),
            ),
        }
    )
    src = write_files(
        tmp_path / "bad",
        {
            "good.parquet": raw_parquet(good_ids, imgs[:10]),
            "dups.parquet": raw_parquet(["g0", "g1", "new-1"], imgs[:3]),  # two ids seen in good.parquet
            "floats.parquet": table_parquet(nan_table),
            "wrong_schema.parquet": table_parquet(pa.table({"id": ["a"], "pixels": [1]})),
            "corrupt.parquet": b"PAR1\x00\x01garbage",
            "empty.parquet": b"",
            "odd_bytes.parquet": table_parquet(
                pa.table({"image_id": ["w1"], "image": pa.array([b"\x00" * 100], pa.binary())})
            ),
            "imgs/dark.png": png_bytes(imgs[11]),
            "imgs/zero.png": b"",
            "imgs/notes.txt": b"just text, not an image\n",
            "imgs/tiny.png": png_bytes(np.zeros((1, 1), np.uint8)),
            "imgs/huge.png": huge_png_header(10_000, 10_000),
            "imgs/light.jpg": jpeg_bytes(255 - imgs[5]),
        },
    )
    r = score_batch(
        cat, src.as_uri(), predictor=FakePredictor(), model_version=V, batch_date="2026-03-05", shard_size=4
    )
    # good: 10 + new-1 + f-ok + dark.png + light.jpg
    assert r.scored == 14
    assert r.reasons == {
        "corrupt_parquet": 1,
        "duplicate_id": 2,
        "empty_file": 2,
        "missing_id": 1,
        "nan_values": 1,
        "not_an_image": 1,
        "out_of_range": 1,
        "too_large": 1,
        "too_small": 1,
        "wrong_schema": 1,
        "wrong_shape": 2,
    }
    assert r.records == r.scored + r.quarantined == 14 + 14
    q = batch_quarantine(cat, r.batch_id, V)
    assert q.num_rows == r.quarantined
    assert all(q.column("detail").to_pylist()) and all(q.column("source").to_pylist())
    assert sorted(q.column("reason").to_pylist()) == sorted(k for k, v in r.reasons.items() for _ in range(v))
    assert q.column("size").null_count == 0  # evidence: every row says how big its input was
    preds = batch_predictions(cat, r.batch_id)
    assert preds.column("image_id").null_count == 0
    assert len(set(preds.column("image_id").to_pylist())) == preds.num_rows
    assert {"g0", "g1", "new-1", "imgs/dark", "imgs/light"} <= set(preds.column("image_id").to_pylist())


def test_empty_batch_commits_an_empty_table(cat: LakeCatalog, tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.mkdir()
    # allowed empty: without allow_empty an empty folder is an error (tests/unit/test_batch_boundary.py)
    r = score_batch(
        cat,
        src.as_uri(),
        predictor=FakePredictor(),
        model_version=V,
        batch_date="2026-03-06",
        allow_empty=True,
    )
    assert (r.records, r.scored, r.quarantined, r.shards) == (0, 0, 0, 0)
    assert batch_predictions(cat, r.batch_id).num_rows == 0
    assert scan(cat, "predictions", {"batch_date": "2026-03-06"}).num_rows == 0
    assert is_batch_committed(cat, r.batch_id, V)  # committed, with nothing in it


def test_backfill_over_dates_skips_committed_and_reports_missing_days(
    cat: LakeCatalog, lake: Lake, tmp_path: Path
) -> None:
    imgs = mnist_like(6)
    for day in ("2026-04-01", "2026-04-03"):
        lake.write_bytes(
            f"inbox/batch_date={day}/a.parquet", raw_parquet([f"{day}-{i}" for i in range(6)], imgs)
        )
    entries = backfill(
        cat, date_from="2026-04-01", date_to="2026-04-03", predictor=FakePredictor(), model_version=V
    )
    assert [(str(e.batch_date), e.status) for e in entries] == [
        ("2026-04-01", "scored"),
        ("2026-04-02", "no_input"),
        ("2026-04-03", "scored"),
    ]
    assert entries[0].result is not None and entries[0].result.batch_id == "2026-04-01-inbox"
    again = backfill(
        cat, date_from="2026-04-01", date_to="2026-04-03", predictor=FakePredictor(), model_version=V
    )
    assert [e.status for e in again] == ["skipped", "no_input", "skipped"]


def test_backfill_scores_through_score_one_and_reports_each_entry(cat: LakeCatalog, lake: Lake) -> None:
    from datetime import date

    from zalando.scoring import BatchResult

    for day in ("2026-04-11", "2026-04-13", "2026-04-14"):
        lake.write_bytes(f"in/{day}/a.parquet", raw_parquet([f"{day}-0"], mnist_like(1)))
    calls, seen = [], []

    def score_one(
        location: str, *, batch_date: date | None, source: str | None, model_version: str
    ) -> BatchResult:
        calls.append((location, batch_date, source, model_version))
        if batch_date == date(2026, 4, 13):
            raise ScoringError("shard 0 lost")
        return BatchResult(
            batch_id=f"{batch_date}-x", batch_date=batch_date, model_version=model_version,
            predictions_table="k", records=1, scored=1, quarantined=0, skipped=batch_date == date(2026, 4, 14),
        )  # fmt: skip

    entries = backfill(
        cat, date_from="2026-04-11", date_to="2026-04-14", location_template="in/{date}", source=None,
        model_version=V, score_one=score_one, on_entry=seen.append,
    )  # fmt: skip
    assert [(str(e.batch_date), e.status) for e in entries] == [
        ("2026-04-11", "scored"),
        ("2026-04-12", "no_input"),
        ("2026-04-13", "failed"),
        ("2026-04-14", "skipped"),
    ]
    assert seen == entries and entries[2].error == "shard 0 lost" and entries[1].location == "in/2026-04-12"
    assert calls == [
        ("in/2026-04-11", date(2026, 4, 11), None, V),
        ("in/2026-04-13", date(2026, 4, 13), None, V),
        ("in/2026-04-14", date(2026, 4, 14), None, V),
    ]
    # stop_on_error: the failure is raised, and nothing after it is scored
    calls.clear()
    seen.clear()
    with pytest.raises(ScoringError, match="shard 0 lost"):
        backfill(
            cat, date_from="2026-04-12", date_to="2026-04-14", location_template="in/{date}",
            model_version=V, score_one=score_one, on_entry=seen.append, stop_on_error=True,
        )  # fmt: skip
    assert [c[1] for c in calls] == [date(2026, 4, 13)] and [e.status for e in seen] == ["no_input"]
    with pytest.raises(ScoringInputError, match="shard_size"):
        backfill(cat, ["in/2026-04-11"], model_version=V, score_one=score_one, shard_size=5)


def test_parallel_sub_batches_give_the_same_rows_and_embedding_sample() -> None:
    from zalando.scoring.shard import predict_in_sub_batches

    imgs = mnist_like(70)

    class Parallel(FakePredictor):
        parallelism = 3

    p1, e1 = predict_in_sub_batches(FakePredictor(), imgs, sub_batch=8, n_embed=20)
    p3, e3 = predict_in_sub_batches(Parallel(), imgs, sub_batch=8, n_embed=20)
    np.testing.assert_array_equal(p1, p3)
    np.testing.assert_array_equal(e1, e3)
    assert e1.shape == (20, 4)
    np.testing.assert_array_equal(e1, FakePredictor().predict(imgs[:20])[1])


def test_predictions_preview_and_progress(cat: LakeCatalog, tmp_path: Path) -> None:
    from zalando.scoring import predictions_preview, scored_versions

    src, _ = _good_batch(tmp_path / "in", n=20)
    seen, plans = [], []
    r = score_batch(
        cat, src.as_uri(), predictor=FakePredictor(), model_version=V, batch_date="2026-03-09", source="shop",
        shard_size=5, progress=seen.append, on_plan=plans.append,
    )  # fmt: skip
    assert plans[0].batch.records == 20 and [s.shard_id for s in seen] == [0, 1, 2, 3]
    assert scored_versions(cat, r.batch_id) == [V]
    p = predictions_preview(cat, r.batch_id, rows=3)
    assert p["model_version"] == V and len(p["rows"]) == 3 and sum(p["group_counts"].values()) == 20
    assert p["group_counts"] == r.group_counts and p["counts"]["low_confidence"] == r.low_confidence


def test_part_file_overwritten_by_a_concurrent_run_is_detected_and_rescored(
    cat: LakeCatalog, lake: Lake, tmp_path: Path
) -> None:
    src, ids = _good_batch(tmp_path / "in", n=20)
    plan = prepare_batch(
        cat, src.as_uri(), model_version=V, batch_date="2026-03-10", shard_size=10, check_model=False
    )
    for s in plan.shards:
        score_shard(lake, s, FakePredictor(), V)
    # someone rewrote shard 1's predictions data file with other bytes after shard 1 committed
    marker = lake.read_json(shard_marker_key(plan.batch_date, V, plan.batch_id, 1))
    data_file = next(k for k, e in marker["files"].items() if e["table"] == "predictions")
    assert data_file.startswith("zalando/predictions/data/")
    lake.write_bytes(data_file, lake.read_bytes(data_file) + b"x")
    with pytest.raises(ScoringError, match=r"shards \[1\] changed"):
        finalize_batch(cat, plan.batch, plan.shards, V)
    assert not is_batch_committed(cat, plan.batch_id, V)
    results = [score_shard(lake, s, FakePredictor(), V) for s in plan.shards]
    assert [r.skipped for r in results] == [True, False]
    r = finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    assert sorted(batch_predictions(cat, r.batch_id).column("image_id").to_pylist()) == sorted(ids)


def test_storage_fault_is_raised_for_retry_but_corrupt_pages_are_quarantined(
    cat: LakeCatalog, lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zalando.scoring.inputs as inputs
    from zalando.errors import LakeError

    imgs = mnist_like(30)
    good = raw_parquet([f"c{i}" for i in range(30)], imgs)
    # garble the data pages but keep the footer: planning succeeds, reading rows fails
    bad = bytearray(good)
    mid = len(bad) // 2  # inside the image column's pages (the id column comes first and is small)
    for i in range(mid, mid + 64):
        bad[i] ^= 0x5A
    src = write_files(tmp_path / "in", {"a.parquet": good, "b.parquet": bytes(bad)})
    plan = prepare_batch(cat, src.as_uri(), model_version=V, batch_date="2026-03-11", check_model=False)

    class DownFS:
        def open_input_file(self, path: str) -> None:
            raise OSError("connection refused")

        def get_file_info(self, path: str) -> None:
            raise OSError("connection refused")

    real = inputs.open_input
    monkeypatch.setattr(inputs, "open_input", lambda uri, lk: (DownFS(), "x"))
    with pytest.raises(LakeError, match="storage fault"):
        score_shard(lake, plan.shards[0], FakePredictor(), V)
    monkeypatch.setattr(inputs, "open_input", real)
    results = [score_shard(lake, s, FakePredictor(), V) for s in plan.shards]
    assert [(r.scored, r.quarantined) for r in results] == [(30, 0), (0, 30)]
    assert results[1].reasons == {"corrupt_parquet": 30}
    r = finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    assert (r.records, r.scored, r.quarantined) == (60, 30, 30)
    q = batch_quarantine(cat, r.batch_id, V)  # the corrupt file's rows: its size and sha256, never its bytes
    assert set(q.column("sha256").to_pylist()) == {plan.batch.inputs[1].sha256}
    assert set(q.column("size").to_pylist()) == {len(bad)} and q.column("image").null_count == 30


def test_quarantine_keeps_evidence_never_the_content_of_a_non_image(cat: LakeCatalog, tmp_path: Path) -> None:
    """Issue 17: every quarantine row keeps reason, size and sha256; the first bytes (at most 64 KiB)
    only of an input that claims to be an image; a text file's or any non-image's content never."""
    import hashlib

    rng = np.random.default_rng(0)
    big_png = png_bytes(rng.integers(0, 256, size=(400, 400), dtype=np.uint8))
    assert len(big_png) > 100_000
    truncated = big_png[:90_000]
    text = b"root:x:0:0:root:/root:/bin/bash\nsecret-token=" + b"x" * 5000 + b"\n"
    binary = bytes(rng.integers(0, 256, size=3000, dtype=np.uint8).tolist())
    imgs = mnist_like(3)
    files = {
        "imgs/truncated.png": truncated,
        "imgs/passwd.txt": text,
        "imgs/blob.bin": binary,
        "imgs/page.jpg": b"<html><body>not a jpeg</body></html>",
        "imgs/tiny.png": png_bytes(np.zeros((1, 1), np.uint8)),
        "rows.parquet": table_parquet(
            pa.table(
                {
                    "image_id": ["ok", "short", "dup"],
                    "image": pa.array([imgs[0].tobytes(), text[:100], imgs[1].tobytes()], pa.binary()),
                }
            )
        ),
        "dups.parquet": raw_parquet(["dup"], imgs[2:3]),
        "broken.parquet": b"PAR1" + text,
    }
    src = write_files(tmp_path / "in", files)
    r = score_batch(cat, src.as_uri(), predictor=FakePredictor(), model_version=V, batch_date="2026-03-12")
    q = {row["source"].rsplit("/", 1)[1] + (f"#{row['row']}" if row["row"] > 0 else ""): row
         for row in batch_quarantine(cat, r.batch_id, V).to_pylist()}  # fmt: skip
    assert r.quarantined == len(q) == 8, sorted(q)
    for row in q.values():  # every row: reason, size and sha256
        assert row["reason"] and row["size"] is not None and row["sha256"], row
    for name in ("truncated.png", "passwd.txt", "blob.bin", "page.jpg", "tiny.png", "broken.parquet"):
        data = files[f"imgs/{name}"] if f"imgs/{name}" in files else files[name]
        assert q[name]["size"] == len(data) and q[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
    # a truncated PNG claims to be an image: its first 64 KiB are kept, no more
    assert q["truncated.png"]["reason"] == "corrupt_image"
    assert q["truncated.png"]["image"] == truncated[: 64 * 1024]
    assert q["tiny.png"]["image"] == files["imgs/tiny.png"]  # small, and an image: kept whole
    # a text file, random bytes, HTML named .jpg, a corrupt Parquet file, 100 bytes of text in a row:
    # measured and hashed, never stored
    for name in ("passwd.txt", "blob.bin", "page.jpg", "broken.parquet", "rows.parquet#1"):
        assert q[name]["image"] is None, name
    assert q["passwd.txt"]["reason"] == "not_an_image"
    assert q["rows.parquet#1"]["size"] == 100 and q["rows.parquet#1"]["reason"] == "wrong_shape"
    dup = next(row for row in q.values() if row["reason"] == "duplicate_id")
    assert dup["image"] is not None and len(dup["image"]) == 784  # raw pixels of an image column: an image
    stored = b"".join(row["image"] or b"" for row in q.values())
    assert b"secret-token" not in stored and b"root:x:0:0" not in stored


def test_second_engines_see_exactly_the_committed_batches_while_one_is_mid_write(
    cat: LakeCatalog, lake: Lake, tmp_path: Path
) -> None:
    """DuckDB (iceberg_scan on the table's metadata) and a plain pyarrow scan of the files the
    catalog's snapshot lists: while batch 2's shards are written but not finalized, exactly batch
    1's rows; after its one commit, both batches'."""
    import pyarrow.dataset as ds

    from tests.lakehouse_support import duckdb_with_iceberg
    from zalando.lake.catalog import storage_path
    from zalando.lake.tables import load_table

    src1, ids1 = _good_batch(tmp_path / "in1", n=30, seed=1)
    src2, ids2 = _good_batch(tmp_path / "in2", n=40, seed=2)
    one = score_batch(cat, src1.as_uri(), predictor=FakePredictor(), model_version=V, batch_date="2026-03-13")
    plan = prepare_batch(cat, src2.as_uri(), model_version=V, batch_date="2026-03-14", check_model=False)
    results = [score_shard(lake, s, FakePredictor(), V) for s in plan.shards]
    assert all(not r.skipped for r in results) and sum(r.scored for r in results) == 40
    assert len(lake.list_keys("zalando/predictions/data/batch_date=2026-03-14")) == len(plan.shards)
    con = duckdb_with_iceberg()

    def engines() -> tuple[dict[str, int], dict[str, int]]:
        table = load_table(cat, "predictions")
        duck = dict(
            con.sql(
                f"SELECT batch_id, count(*) FROM iceberg_scan('{table.metadata_location}') GROUP BY 1"
            ).fetchall()
        )
        files = [storage_path(t.file.file_path) for t in table.scan().plan_files()]
        plain = ds.dataset(files, format="parquet").to_table(columns=["batch_id"]).column("batch_id")
        counts = pc.value_counts(plain).to_pylist()
        return duck, {c["values"]: c["counts"] for c in counts}

    assert engines() == ({one.batch_id: 30}, {one.batch_id: 30})  # mid-write: the committed rows only
    two = finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    assert engines() == ({one.batch_id: 30, two.batch_id: 40}, {one.batch_id: 30, two.batch_id: 40})
    both = scan(cat, "predictions").column("image_id").to_pylist()
    assert sorted(both) == sorted(ids1 + ids2)


def test_drift_monitoring_reads_the_sample_and_the_predictions_through_the_tables(
    cat: LakeCatalog, lake: Lake, tmp_path: Path
) -> None:
    from zalando.drift import reference_profile
    from zalando.errors import DataError
    from zalando.registry import save_reference
    from zalando.steps.monitoring import monitor_batch

    reference_images = mnist_like(300, seed=7)
    probs, embeddings = FakePredictor().predict(reference_images)
    save_reference(
        lake,
        V,
        reference_profile(reference_images, probs, embeddings, np.ones(5), sample_size=100),
        run_id="t",
    )
    src, _ = _good_batch(tmp_path / "in", n=40, seed=3)
    plan = prepare_batch(cat, src.as_uri(), model_version=V, batch_date="2026-03-15", check_model=False)
    results = [score_shard(lake, s, FakePredictor(), V) for s in plan.shards]
    with pytest.raises(DataError, match="no committed embedding sample"):
        monitor_batch(cat, plan, "run-m")  # scored, not committed: nothing to measure yet
    finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    out = monitor_batch(cat, plan, "run-m")
    assert out.rows == 40 and out.table and out.uri == lake.uri(f"{cat.namespace}/monitoring")
    committed = scan(cat, "monitoring", {"batch_id": plan.batch.batch_id, "model_version": V})
    assert sorted(committed.column("statistic").to_pylist()) == sorted(r["statistic"] for r in out.table)
    assert {"embedding_mmd2", "confidence_psi", "pixel_mean"} <= {r["statistic"] for r in out.table}
    assert all(isinstance(r, bool) for r in committed.column("trusted").to_pylist())
    assert all(n > 0 for n in committed.column("min_n").to_pylist())


def test_drift_reads_the_pixels_the_shards_kept_and_they_match_decoding_the_inputs_again(
    cat: LakeCatalog, lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando.drift import reference_profile
    from zalando.registry import save_reference
    from zalando.steps import monitoring

    reference_images = mnist_like(300, seed=7)
    probs, embeddings = FakePredictor().predict(reference_images)
    save_reference(lake, V, reference_profile(reference_images, probs, embeddings, np.ones(5), sample_size=100),
                   run_id="t")  # fmt: skip
    src, _ = _good_batch(tmp_path / "in", n=40, seed=3)
    plan = prepare_batch(cat, src.as_uri(), model_version=V, batch_date="2026-03-16", check_model=False)
    finalize_batch(
        cat,
        plan.batch,
        plan.shards,
        V,
        results=[score_shard(lake, s, FakePredictor(), V) for s in plan.shards],
    )
    real_sample, real_decode = monitoring._embedding_sample, monitoring._sample_images
    sample = real_sample(cat, plan.batch_id, V)
    assert sample.column("pixels").type == pa.binary(784) and sample.num_rows == 40

    def no_decoding(*a: object, **k: object) -> None:
        raise AssertionError("drift decoded the batch's inputs a second time")

    monkeypatch.setattr(monitoring, "_sample_images", no_decoding)
    kept = monitoring.monitor_batch(cat, plan, "run-kept")
    # a sample written before samples kept their pixels: the inputs are decoded again, same numbers
    monkeypatch.setattr(monitoring, "_sample_images", real_decode)
    monkeypatch.setattr(monitoring, "_embedding_sample", lambda *a: real_sample(*a).drop_columns(["pixels"]))
    decoded = monitoring.monitor_batch(cat, plan, "run-decoded")
    assert kept.rows == decoded.rows == 40
    by_stat = [{k: r[k] for k in ("statistic", "value", "p_value", "alarm")} for r in kept.table]
    assert by_stat == [{k: r[k] for k in ("statistic", "value", "p_value", "alarm")} for r in decoded.table]
    assert {"pixel_mean", "embedding_mmd2"} <= {r["statistic"] for r in kept.table}


def test_file_batches_leave_the_catalogue_columns_null_and_an_older_table_gets_them_by_evolution(
    cat: LakeCatalog, tmp_path: Path
) -> None:
    from pyiceberg.schema import Schema

    from zalando.lake.tables import PRODUCT_COLUMNS, iceberg_schema, table_spec
    from zalando.scoring.run import check_scoring_tables

    # a predictions table made before the catalogue's columns existed (the spec without them)
    spec = table_spec("predictions")
    old = Schema(*iceberg_schema(spec).fields[: len(spec.schema) - len(PRODUCT_COLUMNS)])
    cat.catalog.create_table(
        cat.identifier("predictions"), schema=old, location=cat.lake.uri("zalando/predictions")
    )
    check_scoring_tables(cat)  # evolved explicitly (evolve_schema): the same field ids as a new table's
    assert [f.name for f in cat.catalog.load_table(cat.identifier("predictions")).schema().fields] == (
        spec.schema.names
    )
    src, ids = _good_batch(tmp_path / "b", n=12, files=1)
    r = score_batch(cat, src.as_uri(), predictor=FakePredictor(), model_version=V, batch_date="2026-03-07")
    rows = batch_predictions(cat, r.batch_id)
    assert rows.num_rows == 12
    for f in PRODUCT_COLUMNS:
        assert rows.column(f.name).null_count == 12, f.name
