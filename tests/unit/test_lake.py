"""The lake's commit protocol on a local folder: manifest last, replace on re-commit, keys checked."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from zalando.errors import LakeError, NotCommittedError
from zalando.lake import MANIFEST, Lake, validate_key


def test_commit_read_and_manifest(local_lake: Lake) -> None:
    m = local_lake.commit_partition(
        "metrics/run_id=r1", {"per_group": pa.table({"x": [1, 2, 3]})}, "r1", {"k": 1}
    )
    assert m["rows"] == 3 and m["run_id"] == "r1" and "per_group.parquet" in m["files"]
    assert len(m["files"]["per_group.parquet"]["sha256"]) == 64
    assert local_lake.read_partition("metrics/run_id=r1").column("x").to_pylist() == [1, 2, 3]
    assert local_lake.read_manifest("metrics/run_id=r1")["extra"] == {"k": 1}


def test_uncommitted_partition_is_invisible(local_lake: Lake) -> None:
    local_lake.write_bytes("metrics/run_id=r2/per_group.parquet", b"not yet")
    assert not local_lake.is_committed("metrics/run_id=r2")
    assert local_lake.list_partitions("metrics") == []
    with pytest.raises(NotCommittedError, match="is not committed"):
        local_lake.read_partition("metrics/run_id=r2")


def test_recommit_replaces_never_duplicates(local_lake: Lake) -> None:
    key = "raw/x/split=train"
    local_lake.commit_partition(key, {"part-0": pa.table({"a": [1]}), "part-1": pa.table({"a": [2]})}, "r1")
    local_lake.commit_partition(key, {"part-0": pa.table({"a": [1]})}, "r2")
    assert local_lake.read_partition(key).column("a").to_pylist() == [1]
    assert sorted(local_lake.list_keys(key)) == [f"{key}/{MANIFEST}", f"{key}/part-0.parquet"]


def test_read_dataset_adds_hive_columns(local_lake: Lake) -> None:
    for r in ("a", "b"):
        local_lake.commit_partition(f"metrics/run_id={r}/experiment=cnn", {"t": pa.table({"v": [1.0]})}, r)
    t = local_lake.read_dataset("metrics").to_pandas().sort_values("run_id")
    assert t["run_id"].tolist() == ["a", "b"] and t["experiment"].tolist() == ["cnn", "cnn"]


def test_tampered_file_is_detected(local_lake: Lake, tmp_path) -> None:
    local_lake.commit_files("reports/run_id=r", {"report.md": b"hello"}, "r")
    local_lake.write_bytes("reports/run_id=r/report.md", b"evil")
    with pytest.raises(LakeError, match="sha256 does not match"):
        local_lake.read_file("reports/run_id=r", "report.md")


def test_json_read_torn_is_read_again_and_json_that_stays_broken_raises(
    local_lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_lake.write_json("registry/champion.json", {"model_version": "v1"})
    real, reads = Lake.read_bytes, []

    def torn_once(self: Lake, key: str) -> bytes:
        reads.append(key)
        data = real(self, key)
        return data[:5] if len(reads) == 1 else data  # the first read overlaps a rewrite

    monkeypatch.setattr(Lake, "read_bytes", torn_once)
    assert local_lake.read_json("registry/champion.json") == {"model_version": "v1"} and len(reads) == 2
    monkeypatch.undo()
    local_lake.write_bytes("registry/broken.json", b'{"model_version": ')
    with pytest.raises(ValueError):
        local_lake.read_json("registry/broken.json")


class _ListingRacesCreation:
    """A local file system whose first n listings fail the way arrow's do when the listed folder is
    created meanwhile: the read finds no folder, the second look finds one, and it raises."""

    def __init__(self, fs: object, n: int) -> None:
        self.fs, self.n, self.listings = fs, n, 0

    def get_file_info(self, what: object) -> object:
        if isinstance(what, pafs.FileSelector):
            self.listings += 1
            if self.listings <= self.n:
                raise FileNotFoundError(2, f"Cannot list directory '{what.base_dir}'")
        return self.fs.get_file_info(what)

    def __getattr__(self, name: str) -> object:
        return getattr(self.fs, name)


def test_a_listing_that_races_its_folders_creation_is_made_again(local_lake: Lake) -> None:
    local_lake.write_json("registry/champion.json", {"v": 1})
    local_lake.fs = racing = _ListingRacesCreation(local_lake.fs, n=2)
    assert local_lake.list_keys("registry") == ["registry/champion.json"] and racing.listings == 3
    assert local_lake.list_keys("nothing/here") == []
    racing.n, racing.listings = 99, 0  # a folder that never lists is still an error
    with pytest.raises(FileNotFoundError):
        local_lake.list_keys("registry")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/key", "a//b", "a/./b", "a/b c", "a\\b", ""])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(LakeError):
        validate_key(key)


def test_json_and_listing(local_lake: Lake) -> None:
    local_lake.write_json("registry/champion.json", {"v": 1})
    assert local_lake.read_json("registry/champion.json") == {"v": 1}
    assert local_lake.list_keys("registry") == ["registry/champion.json"]
    assert json.loads(local_lake.read_bytes("registry/champion.json")) == {"v": 1}
    with pytest.raises(LakeError, match="does not exist"):
        local_lake.read_bytes("registry/none.json")
