"""Image checks, ingest into a local lake, the stratified split and EDA, on generated data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_images, write_idx_folder
from zalando.data.eda import build_eda
from zalando.data.ingest import ingest, load_raw, raw_split_files
from zalando.data.sources import fetch_source
from zalando.data.split import load_dataset_arrays, preprocess, stratified_split
from zalando.data.validate import REASONS, check_images
from zalando.errors import DataError
from zalando.lake import Lake
from zalando.lake import commit as lc


def test_check_images_reason_codes() -> None:
    images, _ = make_images(8)
    images[1] = 7  # blank
    images[2] = 0
    images[2, 0, :5] = 200  # near empty
    images[3] = np.minimum(images[3], 40)  # low contrast
    images[5] = images[4]  # duplicate within
    ref = images[6:7].copy()  # image 6 also in the "training" reference
    reason, other = check_images(images, reference=ref)
    codes = [list(REASONS)[r] if r >= 0 else "ok" for r in reason]
    assert codes == [
        "ok",
        "blank_image",
        "near_empty",
        "low_contrast",
        "ok",
        "duplicate_within_split",
        "duplicate_across_splits",
        "ok",
    ]
    assert other[5] == 4 and other[6] == 0


def test_ingest_quarantines_and_reconciles(tmp_path: Path) -> None:
    train, test = make_images(40, 1), make_images(20, 2)
    train[0][3] = 0  # blank
    train[0][7] = train[0][6]  # duplicate within train
    test[0][4] = train[0][10]  # duplicate across splits
    folder = write_idx_folder(tmp_path / "src", train, test)
    lake = Lake.local(tmp_path / "lake")
    summary = ingest(lake, fetch_source(str(folder), cache_dir=tmp_path))
    assert summary["quarantine"] == {
        "blank_image": 1,
        "duplicate_across_splits": 1,
        "duplicate_within_split": 1,
    }
    assert summary["splits"]["train"]["rows"] == 38 and summary["splits"]["test"]["rows"] == 19
    q = lc.scan(lake.catalog(), "quarantine", {"run_id": summary["run_id"]}).to_pandas().set_index("image_id")
    assert q.loc["test-00004", "detail"].endswith("(same as train-00010)")
    assert q.loc["train-00007", "reason"] == "duplicate_within_split"
    assert q.loc["train-00007", "row"] == 7 and q["batch_id"].isna().all()  # ingest's rows: no batch
    raw = load_raw(lake, "train").to_pandas()
    assert "train-00003" not in set(raw["image_id"]) and raw["image_id"].is_unique
    assert set(raw.columns) == {"image_id", "image", "label", "label_name", "group", "group_name"}


def test_bad_source_commits_nothing(tmp_path: Path) -> None:
    train, test = make_images(10, 1), make_images(5, 2)
    import gzip

    from zalando.data.idx import encode_labels

    bad_labels = test[1].copy()
    bad_labels[0] = 11
    folder = write_idx_folder(
        tmp_path / "src",
        train,
        test,
        raw_overrides={"t10k-labels-idx1-ubyte.gz": gzip.compress(encode_labels(bad_labels))},
    )
    lake = Lake.local(tmp_path / "lake")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: label 11 at index 0"):
        ingest(lake, fetch_source(str(folder), cache_dir=tmp_path))
    assert [k for k in lake.list_keys() if not k.startswith("_catalog/")] == []  # only the empty catalog
    assert lake.catalog().catalog.list_tables("zalando") == []


def test_ingest_twice_is_idempotent(tmp_path: Path, mini_dir: Path) -> None:
    lake = Lake.local(tmp_path / "lake")
    src = fetch_source(str(mini_dir), cache_dir=tmp_path)
    first = ingest(lake, src)
    keys = lake.list_keys()
    second = ingest(lake, src)
    assert lake.list_keys() == keys  # skipped: nothing written
    forced = ingest(lake, src, force=True)
    assert second["skipped"] and not first["skipped"] and not forced["skipped"]
    assert forced["splits"] == first["splits"] and forced["quarantine"] == first["quarantine"]
    raw = lc.scan(lake.catalog(), "raw_images", columns=["image_id", "split"])
    assert (
        raw.num_rows == 2500 and len(set(raw.column("image_id").to_pylist())) == 2500
    )  # replaced, not added
    assert load_raw(lake, "train").num_rows == 2000
    # the split's files are the current snapshot's only: the forced re-ingest's, not the first one's
    files = raw_split_files(lake, "test")
    assert sum(rows for _, _, rows in files) == 500 and all(
        k.startswith("zalando/raw_images/data/") for k, _, _ in files
    )
    first = pq.read_table(Path(lake.root) / files[0][0], columns=["image_id", "image"])
    assert (
        first.column("image_id")[0].as_py().startswith("test-")
        and first.schema.field("image").type.byte_width == 784
    )


def test_stratified_split_is_seeded_and_stratified() -> None:
    labels = np.repeat(np.arange(10), 50)
    a, b = stratified_split(labels, 0.2, 7), stratified_split(labels, 0.2, 7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, stratified_split(labels, 0.2, 8))
    assert np.bincount(labels[a], minlength=10).tolist() == [10] * 10


def test_preprocess_and_arrays(tmp_path: Path, mini_dir: Path) -> None:
    lake = Lake.local(tmp_path / "lake")
    ingest(lake, fetch_source(str(mini_dir), cache_dir=tmp_path))
    dv = preprocess(lake, seed=3)
    assert preprocess(lake, seed=3) == dv
    d = load_dataset_arrays(lake, dv.dataset_version)
    assert (
        d["x_train"].shape == (1600, 28, 28)
        and d["x_val"].shape == (400, 28, 28)
        and d["x_test"].shape == (500, 28, 28)
    )
    assert not set(d["ids_train"]) & set(d["ids_val"])
    assert abs(dv.mean - d["x_train"].mean() / 255) < 1e-9
    assert 0.25 < dv.mean < 0.32 and 0.3 < dv.std < 0.4


def test_eda_report(tmp_path: Path, mini_dir: Path) -> None:
    lake = Lake.local(tmp_path / "lake")
    ingest(lake, fetch_source(str(mini_dir), cache_dir=tmp_path))
    tables, files = build_eda(lake)
    assert set(files) == {"eda.md", "eda_groups.png", "eda_group_images.png"}
    assert all(files[f][:8] == b"\x89PNG\r\n\x1a\n" for f in files if f.endswith(".png"))
    g = tables["groups"].set_index(["split", "group_name"])["count"]
    assert g["train", "Upper part"] == 776 and g["test", "Bags"] == 44
    assert "## Pixels and duplicates" in files["eda.md"].decode()
