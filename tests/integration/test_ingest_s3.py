"""Ingest against a real SeaweedFS S3 server: mini data set, idempotency, quarantine, bad S3 settings,
and the full data set's counts (the study's table)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_images, s3_config, write_idx_folder
from zalando.data.ingest import ingest, load_raw
from zalando.data.sources import fetch_source
from zalando.data.split import preprocess, read_dataset_version
from zalando.errors import LakeError
from zalando.lake import Lake
from zalando.lake import commit as lc
from zalando.s3server import S3Server


def test_ingest_mini_into_s3_is_idempotent(s3_lake: Lake, mini_dir: Path, tmp_path: Path) -> None:
    src = fetch_source(str(mini_dir), cache_dir=tmp_path)
    first = ingest(s3_lake, src)
    assert first["splits"]["train"]["rows"] == 2000 and first["splits"]["test"]["rows"] == 500
    keys = s3_lake.list_keys()
    assert ingest(s3_lake, src)["skipped"] and s3_lake.list_keys() == keys  # nothing written
    again = ingest(s3_lake, src, force=True)
    assert again["splits"] == first["splits"]
    ids = load_raw(s3_lake, "train", columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 2000
    # every object is a table's (data or metadata, under the namespace); the catalog is in the work folder
    assert {k.split("/")[0] for k in s3_lake.list_keys()} == {"zalando"}
    dv = preprocess(s3_lake, seed=1)
    assert read_dataset_version(s3_lake, dv.dataset_version) == dv and dv.n_train == 1600


def test_quarantine_contents_in_s3(s3_lake: Lake, tmp_path: Path) -> None:
    train, test = make_images(30, 5), make_images(10, 6)
    train[0][2] = 0
    test[0][1] = train[0][4]
    folder = write_idx_folder(tmp_path / "src", train, test)
    summary = ingest(s3_lake, fetch_source(str(folder), cache_dir=tmp_path))
    q = lc.scan(s3_lake.catalog(), "quarantine", {"run_id": summary["run_id"]}).to_pandas()
    assert sorted(zip(q["image_id"], q["reason"], strict=True)) == [
        ("test-00001", "duplicate_across_splits"),
        ("train-00002", "blank_image"),
    ]
    assert q["image"].map(len).tolist() == [784, 784]


def test_missing_bucket_is_created(s3_server: S3Server) -> None:
    lake = Lake.from_uri("s3://fresh-bucket-for-test/x", s3_config(s3_server))
    lake.ensure_ready()
    lake.write_json("a.json", {"ok": True})
    assert lake.read_json("a.json") == {"ok": True}


def test_wrong_credentials_one_line_error(s3_server: S3Server) -> None:
    cfg = s3_config(s3_server)
    bad = Lake.from_uri(
        "s3://zalando-test/x", type(cfg)(cfg.endpoint, cfg.access_key, "not-the-secret", max_attempts=1)
    )
    with pytest.raises(LakeError, match=r"access denied: wrong S3 credentials") as e:
        bad.ensure_ready()
    assert "not-the-secret" not in str(e.value)


def test_unreachable_server_one_line_error() -> None:
    from zalando.lake import S3Config
    from zalando.s3server import free_port_block

    lake = Lake.from_uri(
        "s3://b/x", S3Config(f"http://127.0.0.1:{free_port_block(1)}", "a", "b", max_attempts=1)
    )
    with pytest.raises(LakeError, match="server not reachable"):
        lake.ensure_ready()


@pytest.mark.slow
def test_full_data_set_reproduces_the_study_counts(s3_lake: Lake, full_dir: Path, tmp_path: Path) -> None:
    src = fetch_source(str(full_dir), cache_dir=tmp_path)
    summary = ingest(s3_lake, src)
    assert summary["quarantine"] == {}
    assert summary["splits"]["train"]["groups"] == {
        "Upper part": 24000,
        "Bottom part": 6000,
        "One piece": 6000,
        "Footwear": 18000,
        "Bags": 6000,
    }
    assert summary["splits"]["test"]["groups"] == {
        "Upper part": 4000,
        "Bottom part": 1000,
        "One piece": 1000,
        "Footwear": 3000,
        "Bags": 1000,
    }
