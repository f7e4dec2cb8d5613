"""Batches and shards: ids, input manifest, duplicate decisions, shard plans, image-column decoding."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.scoring_support import mnist_like, png_bytes, raw_parquet, table_parquet, write_files
from zalando.images import ImagePrepConfig
from zalando.lake import Lake
from zalando.scoring import ShardRef, describe_batch, make_batch_id, plan_shards
from zalando.scoring.batch import (
    CORRUPT_PARQUET,
    WRONG_SCHEMA,
    ScoringInputError,
    _row_ranges,
    default_source_slug,
)
from zalando.scoring.inputs import NAN_VALUES, OUT_OF_RANGE, WRONG_SHAPE, decode_image_column


def test_batch_ids_are_date_plus_source_slug() -> None:
    assert make_batch_id(date(2026, 3, 1), "Fashion MNIST / test") == "2026-03-01-fashion-mnist-test"
    assert default_source_slug("raw/fashion-mnist/split=test") == "fashion-mnist-test"
    assert default_source_slug("zalando/raw_images/data/split=test") == "fashion-mnist-test"
    assert default_source_slug("s3://bucket/incoming/shop_A/") == "shop-a"


def test_row_ranges_follow_row_groups_and_cap_size() -> None:
    assert _row_ranges((100, 100, 100), 250) == [(0, 200), (200, 300)]
    assert _row_ranges((1000,), 300) == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    assert _row_ranges((10, 10, 500, 10), 100) == [
        (0, 20),
        (20, 120),
        (120, 220),
        (220, 320),
        (320, 420),
        (420, 520),
        (520, 530),
    ]
    assert _row_ranges((0,), 10) == []


def test_describe_and_plan(tmp_path: Path) -> None:
    lake = Lake.local(tmp_path / "lake")
    imgs = mnist_like(30)
    ids = [f"img-{i:03d}" for i in range(30)]
    src = write_files(
        tmp_path / "in",
        {
            "a.parquet": raw_parquet(ids[:20], imgs[:20], row_group_size=5),
            # ids 18 and 19 again (duplicates across files), then 10 new ones
            "b.parquet": raw_parquet(ids[18:30], imgs[18:30]),
            "c/shoe.png": png_bytes(imgs[0]),
            "c/shoe.jpg": png_bytes(imgs[1]),  # same id 'c/shoe' as the PNG
            "_MANIFEST.json": b"{}",  # hidden/manifest files are not inputs
            "zz.parquet": b"PAR1 this is not parquet PAR1",
        },
    )
    batch = describe_batch(lake, src.as_uri(), batch_date="2026-03-01", source="shop")
    assert batch.batch_id == "2026-03-01-shop"
    names = [f.name for f in batch.inputs]
    assert names == ["a.parquet", "b.parquet", "c/shoe.jpg", "c/shoe.png", "zz.parquet"]
    assert all(f.sha256 and len(f.sha256) == 64 for f in batch.inputs)
    assert batch.inputs[0].row_groups == (5, 5, 5, 5)
    assert batch.inputs[4].error == CORRUPT_PARQUET and batch.inputs[4].records == 1
    assert batch.duplicates == {1: [0, 1], 3: [0]}  # first occurrence wins, in input order
    assert batch.records == 20 + 12 + 2 + 1
    shards = plan_shards(batch, shard_size=8, embedding_sample=10)
    assert [s.kind for s in shards] == ["parquet"] * 6 + ["bad_file", "images"]
    assert [(s.row_start, s.row_end) for s in shards[:6]] == [
        (0, 5),
        (5, 10),
        (10, 15),
        (15, 20),
        (0, 8),
        (8, 12),
    ]
    assert shards[7].files[0][0] == "c/shoe.jpg" and shards[7].duplicate_rows == (1,)
    assert sum(s.records for s in shards) == batch.records
    assert [s.shard_id for s in shards] == list(range(len(shards)))
    b_first = next(s for s in shards if s.name == "b.parquet")
    assert b_first.duplicate_rows == (0, 1)
    # refs are small, serialisable and stable
    for s in shards:
        js = s.model_dump_json()
        assert len(js) < 1500
        assert ShardRef.model_validate_json(js).fingerprint == s.fingerprint
    again = plan_shards(
        describe_batch(lake, src.as_uri(), batch_date="2026-03-01", source="shop"),
        shard_size=8,
        embedding_sample=10,
    )
    assert [s.fingerprint for s in again] == [s.fingerprint for s in shards]


def test_wrong_schema_and_missing_location(tmp_path: Path) -> None:
    lake = Lake.local(tmp_path / "lake")
    src = write_files(
        tmp_path / "in", {"x.parquet": table_parquet(pa.table({"id": ["a"], "pixels": [b"x"]}))}
    )
    batch = describe_batch(lake, src.as_uri(), batch_date="2026-03-01")
    assert batch.inputs[0].error == WRONG_SCHEMA and "image_id" in batch.inputs[0].error_detail
    with pytest.raises(ScoringInputError, match="does not exist"):
        describe_batch(lake, (tmp_path / "nope").as_uri())
    with pytest.raises(ScoringInputError, match="scheme"):
        describe_batch(lake, "http://example.com/x")
    with pytest.raises(ScoringInputError, match=r"\.\."):
        describe_batch(lake, "raw/../secrets")


def test_decode_image_column_variants() -> None:
    imgs = mnist_like(4)
    cfg = ImagePrepConfig()
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(784), 4, [None, pa.py_buffer(imgs.tobytes())])
    out, bad = decode_image_column(fixed.slice(1, 3), cfg)
    np.testing.assert_array_equal(out, imgs[1:])
    assert bad == []
    blobs = [imgs[0].tobytes(), png_bytes(imgs[1]), b"\x01\x02\x03", None, b""]
    out, bad = decode_image_column(pa.array(blobs, pa.binary()), cfg)
    np.testing.assert_array_equal(out[0], imgs[0])
    np.testing.assert_array_equal(out[1], imgs[1])
    assert [(i, r) for i, r, _ in sorted(bad)] == [
        (2, WRONG_SHAPE),
        (3, "missing_image"),
        (4, "missing_image"),
    ]
    floats = [imgs[0].ravel().astype(float).tolist(), [float("nan")] * 784, [300.0] * 784, [1.0] * 10]
    out, bad = decode_image_column(pa.array(floats, pa.list_(pa.float32())), cfg)
    np.testing.assert_array_equal(out[0], imgs[0])
    assert sorted((i, r) for i, r, _ in bad) == [(1, NAN_VALUES), (2, OUT_OF_RANGE), (3, WRONG_SHAPE)]


def test_the_demo_batch_is_the_raw_tables_test_split_and_reads_only_its_live_files(tmp_path: Path) -> None:
    """The demo batch is the folder of the raw_images table's test split: a re-ingest's replaced file
    still lies there (until maintenance), but only the current snapshot's file is an input."""
    from zalando.data.ingest import put_raw_split, raw_split_files
    from zalando.scoring.batch import find_demo_batch

    lake = Lake.local(tmp_path / "lake")
    with pytest.raises(ScoringInputError, match=r"holds no test split: run `zalando ingest`"):
        find_demo_batch(lake)
    labels = np.arange(12) % 10
    put_raw_split(lake, "test", [f"old-{i}" for i in range(12)], mnist_like(12, 1), labels, digest="a")
    put_raw_split(lake, "test", [f"new-{i}" for i in range(7)], mnist_like(7, 2), labels[:7], digest="b")
    put_raw_split(lake, "train", [f"tr-{i}" for i in range(5)], mnist_like(5, 3), labels[:5], digest="b")
    location = find_demo_batch(lake)
    folder_files = [k for k in lake.list_keys(location) if k.endswith(".parquet")]
    assert len(folder_files) == 2  # the replaced file is still there
    batch = describe_batch(lake, location, batch_date="2026-02-01")
    ((live, _, _),) = raw_split_files(lake, "test")
    assert batch.batch_id == "2026-02-01-fashion-mnist-test" and batch.records == 7
    assert [f"{location}/{f.name}" for f in batch.inputs] == [live]
