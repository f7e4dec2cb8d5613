"""A batch root is a boundary: no link is followed, no FIFO, socket or device is read, nothing outside
the root (or outside ZALANDO_BATCH_ROOTS / the lake's bucket) is listed or opened; an empty batch is an
error unless allowed."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from tests.scoring_support import (
    FakePredictor,
    batch_predictions,
    batch_quarantine,
    mnist_like,
    png_bytes,
    raw_parquet,
    write_files,
)
from zalando.lake import Lake, S3Config
from zalando.scoring import ScoringInputError, describe_batch, prepare_batch, score_batch, score_shard
from zalando.scoring.commit import batch_record
from zalando.scoring.locations import resolve_location

V = "v-boundary"
CANARY = b"root:x:0:0:CANARY-not-for-the-lake:/root:/bin/bash\n"
REFUSED = "not_regular_file"


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake.local(tmp_path / "lake")


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The only batch root of the test: tmp_path/batches (tmp_path/outside is outside it)."""
    inside = tmp_path / "batches"
    inside.mkdir()
    monkeypatch.setenv("ZALANDO_BATCH_ROOTS", str(inside))
    return inside


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files outside the batch root: a 'passwd' and a Parquet file of rows nobody asked to score."""
    return write_files(
        tmp_path / "outside",
        {"passwd": CANARY, "rows.parquet": raw_parquet([f"stolen-{i}" for i in range(4)], mnist_like(4, 7))},
    )


def _quarantine(lake: Lake, batch_id: str) -> list[dict[str, Any]]:
    return batch_quarantine(lake.catalog(), batch_id, V).to_pylist()


def _scored_ids(lake: Lake, batch_id: str) -> set[str]:
    return set(batch_predictions(lake.catalog(), batch_id, V).column("image_id").to_pylist())


def _in_time(fn: Callable[[], Any], fifos: list[Path], seconds: float = 30) -> Any:
    """Run fn in a thread; if it is still running after `seconds` (blocked opening a FIFO), open the
    FIFOs for writing to release it, and fail."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(10)
        pytest.fail(f"hung for {seconds:.0f} s reading a FIFO of the batch")
    if "error" in out:
        raise out["error"]
    return out["value"]


# ------------------------------------------------------------------------------------ links


def test_symlinks_in_a_batch_are_never_followed(lake: Lake, roots: Path, outside: Path) -> None:
    imgs = mnist_like(3)
    src = write_files(
        roots / "in",
        {"good.png": png_bytes(imgs[0]), "sub/ok.parquet": raw_parquet(["ok-0", "ok-1"], imgs[1:])},
    )
    (src / "passwd.png").symlink_to(outside / "passwd")  # the attack the issue found
    (src / "rows.parquet").symlink_to(outside / "rows.parquet")
    (src / "linked-dir").symlink_to(outside, target_is_directory=True)
    (src / "inner.png").symlink_to(src / "good.png")  # even a link inside the root is not followed
    r = score_batch(
        lake.catalog(), src.as_uri(), predictor=FakePredictor(), model_version=V, batch_date="2026-06-01"
    )
    assert _scored_ids(lake, r.batch_id) == {"good", "ok-0", "ok-1"}
    q = _quarantine(lake, r.batch_id)
    assert {row["source"].rsplit("/", 1)[-1]: row["reason"] for row in q} == {
        name: REFUSED for name in ("inner.png", "linked-dir", "passwd.png", "rows.parquet")
    }
    assert all(row["image"] is None for row in q)
    assert all(CANARY not in json.dumps(row, default=str).encode() for row in q)
    assert r.records == r.scored + r.quarantined == 3 + 4
    files = batch_record(lake.catalog(), r.batch_id, V)["inputs"]["files"]
    refused = [f for f in files if f.get("error") == REFUSED]
    assert sorted(f["name"] for f in refused) == ["inner.png", "linked-dir", "passwd.png", "rows.parquet"]
    assert all("sha256" not in f and "symbolic link" in f["error_detail"] for f in refused)


def test_fifos_sockets_and_devices_are_refused_without_hanging(lake: Lake, roots: Path) -> None:
    src = write_files(roots / "in", {"good.png": png_bytes(mnist_like(1)[0])})
    os.mkfifo(src / "pipe.parquet")
    os.mkfifo(src / "pipe.png")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(src / "s.png"))
    (src / "zero.png").symlink_to("/dev/zero")
    try:
        r = _in_time(
            lambda: score_batch(
                lake.catalog(),
                src.as_uri(),
                predictor=FakePredictor(),
                model_version=V,
                batch_date="2026-06-02",
            ),
            [src / "pipe.parquet", src / "pipe.png"],
        )
    finally:
        sock.close()
    assert r.scored == 1
    q = _quarantine(lake, r.batch_id)
    assert sorted((row["source"].rsplit("/", 1)[-1], row["reason"]) for row in q) == [
        ("pipe.parquet", REFUSED),
        ("pipe.png", REFUSED),
        ("s.png", REFUSED),
        ("zero.png", REFUSED),
    ]
    details = {row["source"].rsplit("/", 1)[-1]: row["detail"] for row in q}
    assert "FIFO" in details["pipe.parquet"] and "socket" in details["s.png"]


def test_a_link_or_fifo_swapped_in_after_planning_is_not_read(lake: Lake, roots: Path, outside: Path) -> None:
    imgs = mnist_like(8, 3)
    src = write_files(
        roots / "in",
        {
            "a.parquet": raw_parquet([f"a-{i}" for i in range(4)], imgs[:4]),
            "c.parquet": raw_parquet(["c-0"], imgs[4:5]),
        },
    )
    plan = prepare_batch(
        lake.catalog(), src.as_uri(), model_version=V, batch_date="2026-06-03", check_model=False
    )
    assert [s.name for s in plan.shards] == ["a.parquet", "c.parquet"]
    # after planning: a.parquet becomes a link to a file of the same shape outside the root, c a FIFO
    (src / "a.parquet").unlink()
    (src / "a.parquet").symlink_to(outside / "rows.parquet")
    (src / "c.parquet").unlink()
    os.mkfifo(src / "c.parquet")
    results = _in_time(
        lambda: [score_shard(lake, s, FakePredictor(), V) for s in plan.shards], [src / "c.parquet"]
    )
    assert [(r.scored, r.quarantined) for r in results] == [(0, 4), (0, 1)]
    assert {k for r in results for k in r.reasons} == {"input_changed"}


def test_a_symlinked_folder_on_the_way_to_an_input_is_not_followed_at_open_time(
    lake: Lake, roots: Path, tmp_path: Path
) -> None:
    imgs = mnist_like(4, 5)
    src = write_files(roots / "in", {"sub/a.parquet": raw_parquet([f"a-{i}" for i in range(4)], imgs)})
    plan = prepare_batch(
        lake.catalog(), src.as_uri(), model_version=V, batch_date="2026-06-04", check_model=False
    )
    elsewhere = write_files(
        tmp_path / "elsewhere", {"a.parquet": raw_parquet([f"x-{i}" for i in range(4)], imgs)}
    )
    (src / "sub" / "a.parquet").unlink()
    (src / "sub").rmdir()
    (src / "sub").symlink_to(elsewhere, target_is_directory=True)
    r = score_shard(lake, plan.shards[0], FakePredictor(), V)
    assert (r.scored, r.quarantined, r.reasons) == (0, 4, {"input_changed": 4})


def test_manifest_names_that_leave_the_batch_are_refused(lake: Lake, tmp_path: Path) -> None:
    data = raw_parquet(["m-0"], mnist_like(1))
    (tmp_path / "outside.parquet").write_bytes(data)
    lake.write_bytes("incoming/m/a.parquet", data)
    for evil in ("../../../outside.parquet", "/etc/passwd", "sub/../../x.parquet"):
        lake.write_json(
            "incoming/m/_MANIFEST.json",
            {
                "files": {
                    "a.parquet": {"bytes": len(data), "sha256": "0" * 64},
                    evil: {"bytes": 1, "sha256": "0" * 64},
                }
            },
        )
        with pytest.raises(ScoringInputError, match="incoming/m") as e:
            describe_batch(lake, "incoming/m")
        assert evil in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ roots and buckets


def test_file_locations_outside_the_batch_roots_are_refused(
    lake: Lake, roots: Path, outside: Path, tmp_path: Path
) -> None:
    ok = write_files(roots / "ok", {"a.parquet": raw_parquet(["ok-0"], mnist_like(1))})
    assert [f.name for f in describe_batch(lake, ok.as_uri()).inputs] == ["a.parquet"]
    (roots / "alias").symlink_to(outside, target_is_directory=True)
    for location in (
        outside.as_uri(),
        (outside / "rows.parquet").as_uri(),
        "file:///etc",
        f"file://{roots}/../outside",
        (roots / "alias").as_uri(),  # a link inside the roots to a folder outside them
        "file://otherhost/etc",
    ):
        with pytest.raises(ScoringInputError) as e:
            describe_batch(lake, location)
        msg = str(e.value)
        assert "\n" not in msg and location in msg, msg
        if "otherhost" not in location and ".." not in location:
            assert str(roots) in msg and "ZALANDO_BATCH_ROOTS" in msg, msg


def test_default_batch_roots_are_the_work_folder_and_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando.settings import Settings

    monkeypatch.delenv("ZALANDO_BATCH_ROOTS")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    s = Settings(work_dir=tmp_path / "work")
    assert s.batch_root_paths() == [(tmp_path / "work").resolve(), (tmp_path / "cwd").resolve()]
    monkeypatch.setenv("ZALANDO_BATCH_ROOTS", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert Settings().batch_root_paths() == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    monkeypatch.setenv("ZALANDO_BATCH_ROOTS", json.dumps([str(tmp_path / "c")]))
    assert Settings().batch_root_paths() == [(tmp_path / "c").resolve()]
    monkeypatch.setenv("ZALANDO_BATCH_BUCKETS", "shop-a, shop-b")
    assert Settings().batch_buckets == ["shop-a", "shop-b"]


def _s3_lake() -> Lake:
    """A lake on S3 for resolving locations only (nothing is contacted)."""
    return Lake(
        pafs.LocalFileSystem(),
        "lakebucket/lake",
        "s3://lakebucket/lake",
        S3Config("http://127.0.0.1:1", "a", "b"),
    )


def test_s3_locations_must_lie_in_the_lakes_bucket_or_a_configured_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ZALANDO_BATCH_BUCKETS", raising=False)
    lake = _s3_lake()
    assert resolve_location(lake, "s3://lakebucket/incoming/x").root == "lakebucket/incoming/x"
    assert resolve_location(lake, "s3://lakebucket/lake/inbox/a").lake_key == "inbox/a"
    for location in ("s3://other/x", "s3://lakebucket-2/x", "s3:///x", "s3://lakebucket/a/../../other/x"):
        with pytest.raises(ScoringInputError) as e:
            resolve_location(lake, location)
        assert location in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ScoringInputError, match=r"ZALANDO_BATCH_BUCKETS.*lakebucket"):
        resolve_location(lake, "s3://other/x")
    monkeypatch.setenv("ZALANDO_BATCH_BUCKETS", "other")
    assert resolve_location(lake, "s3://other/x").root == "other/x"


# ------------------------------------------------------------------------------------ empty batches


def test_an_empty_folder_is_an_error_unless_allowed(lake: Lake, roots: Path) -> None:
    empty = roots / "empty"
    empty.mkdir()
    write_files(roots / "hidden", {".DS_Store": b"x", "_SUCCESS": b""})
    for folder in (empty, roots / "hidden"):
        with pytest.raises(ScoringInputError, match="no input files") as e:
            describe_batch(lake, folder.as_uri())
        assert folder.as_uri() in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ScoringInputError, match="no input files"):
        describe_batch(lake, "incoming/nothing-here")  # a lake prefix with no objects
    assert describe_batch(lake, empty.as_uri(), allow_empty=True).inputs == []
    with pytest.raises(ScoringInputError, match="does not exist"):  # allowed empty, but it must exist
        describe_batch(lake, (roots / "nope").as_uri(), allow_empty=True)


def test_score_batch_of_an_empty_folder_fails_before_anything_is_committed(lake: Lake, roots: Path) -> None:
    (roots / "empty").mkdir()
    with pytest.raises(ScoringInputError, match="no input files"):
        score_batch(lake.catalog(), (roots / "empty").as_uri(), predictor=FakePredictor(), model_version=V)
    assert lake.list_keys("predictions") == []


def test_backfill_skips_days_without_input_but_a_named_location_must_exist(lake: Lake) -> None:
    from zalando.scoring import backfill

    lake.write_bytes("inbox/batch_date=2026-06-01/a.parquet", raw_parquet(["d1"], mnist_like(1)))
    days = backfill(
        lake.catalog(),
        date_from="2026-06-01",
        date_to="2026-06-02",
        predictor=FakePredictor(),
        model_version=V,
    )
    assert [e.status for e in days] == ["scored", "no_input"]
    named = backfill(
        lake.catalog(), ["inbox/batch_date=2026-06-09"], predictor=FakePredictor(), model_version=V
    )
    assert named[0].status == "failed" and "no input files" in (named[0].error or "")
