"""Storage faults against a real SeaweedFS server: 5xx answers, time-outs and dropped connections
(injected by tests.faults.FaultProxy), a server stopped or killed in the middle of a commit, and a
bucket that disappears.

What must hold: transient faults are retried with back-off and the commit completes; a lasting
fault fails with one LakeError line, leaves no manifest for the partial partition, and the next run
finishes it with exactly the rows it should have.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY, make_images, write_idx_folder
from tests.faults import FaultProxy, FaultRule, RecordProperty, record_case
from zalando.data.ingest import ingest, is_ingested, load_raw
from zalando.data.sources import fetch_source
from zalando.errors import LakeError, NotCommittedError
from zalando.lake import MANIFEST, Lake, S3Config, retry_io
from zalando.s3server import S3Server, free_port_block


def tables(n_files: int, rows: int = 50, offset: int = 0) -> dict[str, pa.Table]:
    """n_files small tables with distinct ids (file i holds ids offset + i*rows ...)."""
    return {
        f"part-{i:05d}": pa.table(
            {"image_id": [f"img-{offset + i * rows + j:06d}" for j in range(rows)], "v": list(range(rows))}
        )
        for i in range(n_files)
    }


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, repr(text)
    return text


def assert_exactly(lake: Lake, key: str, expected: dict[str, pa.Table]) -> None:
    """Committed, holding exactly the expected files and rows (no stale or duplicate ones)."""
    manifest = lake.read_manifest(key)
    assert sorted(manifest["files"]) == sorted(f"{n}.parquet" for n in expected)
    ids = lake.read_partition(key).column("image_id").to_pylist()
    want = [i for t in expected.values() for i in t.column("image_id").to_pylist()]
    assert sorted(ids) == sorted(want) and len(ids) == len(set(ids))
    own = [k for k in lake.list_keys(key) if "/" not in k[len(key) + 1 :]]
    assert sorted(own) == sorted([f"{key}/{n}.parquet" for n in expected] + [f"{key}/{MANIFEST}"])


def no_unfinished_uploads(lake: Lake) -> bool:
    """No multipart upload left open under this lake's prefix (other tests' lakes share the bucket)."""
    prefix = lake.root.split("/", 1)[1] + "/" if "/" in lake.root else ""
    return not lake._boto_client().list_multipart_uploads(Bucket=lake.bucket, Prefix=prefix).get("Uploads")


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as p:
        yield p


def proxied_lake(proxy: FaultProxy, catalog_uri: str | None = None, **cfg: float) -> Lake:
    """A fresh lake prefix reached through the proxy (short time-outs, few attempts: fast tests);
    ``catalog_uri``: the Iceberg catalog of its tables (none needed for plain objects)."""
    s3 = S3Config(
        proxy.endpoint,
        TEST_ACCESS_KEY,
        TEST_SECRET_KEY,
        connect_timeout=cfg.get("connect_timeout", 2.0),
        request_timeout=cfg.get("request_timeout", 2.0),
        max_attempts=int(cfg.get("max_attempts", 4)),
    )
    lake = Lake.from_uri(f"s3://zalando-faults/{uuid.uuid4().hex[:10]}", s3, catalog_uri)
    lake.ensure_ready()
    return lake


# ------------------------------------------------------------------------------ transient faults


@pytest.mark.parametrize("action", [503, 500, "drop"])
def test_transient_fault_on_data_files_is_retried_and_the_commit_completes(
    proxy: FaultProxy, action: int | str, record_property: RecordProperty
) -> None:
    lake = proxied_lake(proxy)
    data = tables(3)
    rule = proxy.add(FaultRule(action, method="PUT", path=r"\.parquet$", times=2))  # type: ignore[arg-type]
    lake.commit_partition("predictions/batch_date=2024-01-01", data, run_id="r1")
    assert rule.fired == 2
    assert proxy.count("PUT", r"\.parquet$", "forwarded 200") == 3  # each file landed once
    assert_exactly(lake, "predictions/batch_date=2024-01-01", data)
    record_case(
        record_property,
        f"transient {action} on data-file PUTs (first 2 tries)",
        "commit completed: 3/3 files landed once, manifest last",
        retried=f"yes: {rule.fired} faults absorbed by pyarrow's standard retry (back-off)",
        lost="nothing (150/150 rows, no duplicates)",
    )


def test_request_that_times_out_on_its_first_try_is_retried(
    proxy: FaultProxy, record_property: RecordProperty
) -> None:
    lake = proxied_lake(proxy, request_timeout=1.0)
    data = tables(2)
    rule = proxy.add(FaultRule("timeout", method="PUT", path=r"part-00001", times=1, hang_s=2.5))
    t0 = time.monotonic()
    lake.commit_partition("metrics/run_id=t", data, run_id="t")
    assert rule.fired == 1 and time.monotonic() - t0 >= 1.0  # it waited for the time-out, then retried
    assert_exactly(lake, "metrics/run_id=t", data)
    record_case(
        record_property,
        "request hangs past the 1 s request time-out (first try)",
        "client timed out, retried, commit completed",
        retried="yes: pyarrow, after the time-out",
        lost="nothing (100/100 rows)",
    )


def test_bucket_check_is_retried_by_boto3_and_a_lasting_fault_is_one_line(
    proxy: FaultProxy, record_property: RecordProperty
) -> None:
    lake = proxied_lake(proxy)
    rule = proxy.add(FaultRule(503, method="HEAD", path=r"^/zalando-faults$", times=2))
    lake.ensure_ready()  # boto3's standard retries absorb two 503s
    assert rule.fired == 2
    proxy.add(FaultRule(503, method="HEAD", path=r"^/zalando-faults$", times=None))
    with pytest.raises(LakeError) as e:
        lake.ensure_ready()
    assert "zalando-faults" in one_line(e.value) and "503" in str(e.value)
    record_case(
        record_property,
        "503 on the bucket check (HeadBucket): 2 tries, then lasting",
        "2 faults: ensure_ready succeeded; lasting: one-line LakeError naming endpoint and bucket",
        retried="yes: boto3 standard mode (3 attempts), then gave up",
        lost="nothing (no write attempted)",
    )


def test_retry_io_finishes_a_commit_after_the_client_gave_up(
    proxy: FaultProxy, record_property: RecordProperty
) -> None:
    lake = proxied_lake(proxy, max_attempts=2)
    data = tables(2)
    # 3 failures: more than one commit's 2 attempts, fewer than retry_io's 3 commits x 2 attempts
    rule = proxy.add(FaultRule(503, method="PUT", path=r"part-00000\.parquet$", times=3))
    with pytest.raises(LakeError):
        lake.commit_partition("reports/run_id=x", data, run_id="x")
    assert not lake.is_committed("reports/run_id=x")
    rule.fired, rule.seen = 0, 0
    retry_io(lambda: lake.commit_partition("reports/run_id=x", data, run_id="x"), base_delay=0.1)
    assert rule.fired == 3
    assert_exactly(lake, "reports/run_id=x", data)
    record_case(
        record_property,
        "3 x 503 on one file, more than the client's 2 attempts",
        "first commit failed (no manifest); retry_io re-ran the whole commit: completed",
        retried="yes: pyarrow x2 per commit + retry_io whole-operation back-off",
        lost="nothing (100/100 rows)",
    )


# ------------------------------------------------------------------------------ lasting faults


def test_lasting_fault_fails_cleanly_without_manifest_and_the_next_run_finishes(
    proxy: FaultProxy, record_property: RecordProperty
) -> None:
    lake = proxied_lake(proxy, max_attempts=2)
    data = tables(4)
    key = "predictions/batch_date=2024-02-02/model_version=m1"
    proxy.add(FaultRule(500, method="PUT", path=r"part-00002\.parquet$", times=None))
    with pytest.raises(LakeError) as e:
        lake.commit_partition(key, data, run_id="r1")
    assert "part-00002.parquet" in one_line(e.value)
    assert TEST_SECRET_KEY not in str(e.value)
    # the partial partition: two files landed, no manifest, invisible to every reader
    assert proxy.count("PUT", MANIFEST) == 0
    assert not lake.is_committed(key) and lake.list_partitions("predictions") == []
    with pytest.raises(NotCommittedError):
        lake.read_partition(key)
    with pytest.raises(NotCommittedError):
        lake.read_dataset("predictions")
    assert no_unfinished_uploads(lake)
    proxy.clear()
    lake.commit_partition(key, data, run_id="r2")  # the next run
    assert_exactly(lake, key, data)
    assert lake.read_manifest(key)["run_id"] == "r2"
    record_case(
        record_property,
        "lasting 500 on file 3 of a 4-file commit",
        "one-line LakeError naming the file; no manifest: partial partition invisible; next run committed it",
        retried="yes (2 attempts), then failed cleanly",
        lost="nothing (next run: 4/4 files, 200 rows)",
        leaked="nothing (no secret in the error, no unfinished upload)",
    )


def test_failed_recommit_leaves_the_partition_invisible_never_mixed(
    proxy: FaultProxy, record_property: RecordProperty
) -> None:
    """A re-commit un-commits first: a failure in the middle hides the partition, it never mixes
    old and new files under a manifest. (The old version is not kept: the next run restores it.)"""
    lake = proxied_lake(proxy, max_attempts=2)
    key = "monitoring/batch_date=2024-03-03"
    old, new = tables(3, offset=0), tables(3, offset=1000)
    lake.commit_partition(key, old, run_id="old")
    proxy.add(FaultRule(503, method="PUT", path=r"part-00001\.parquet$", times=None))
    with pytest.raises(LakeError):
        lake.commit_partition(key, new, run_id="new")
    assert not lake.is_committed(key)
    proxy.clear()
    lake.commit_partition(key, new, run_id="new")
    assert_exactly(lake, key, new)
    record_case(
        record_property,
        "lasting 503 in the middle of a RE-commit of a committed partition",
        "LakeError; partition un-committed (never old+new mixed); next run committed the new version",
        retried="yes (2 attempts), then failed cleanly",
        lost="old version hidden until the next run (by design: un-commit first)",
    )


def test_large_object_failing_in_parts_leaves_no_unfinished_upload(
    proxy: FaultProxy, record_property: RecordProperty
) -> None:
    lake = proxied_lake(proxy, max_attempts=2)
    proxy.add(FaultRule(500, method="PUT", path=r"partNumber=", times=None))
    with pytest.raises(LakeError):
        lake.commit_files("models/exp/v1", {"weights.pt": os.urandom(11 * 1024 * 1024)}, run_id="v1")
    assert proxy.count("PUT", "partNumber=", "injected") >= 1  # it really went up in parts
    assert no_unfinished_uploads(lake) and not lake.is_committed("models/exp/v1")
    record_case(
        record_property,
        "11 MiB object: every part upload fails",
        "LakeError, no manifest; the unfinished multipart upload was aborted",
        retried="yes (2 attempts per part), then failed cleanly",
        leaked="nothing (no orphan multipart upload holding storage)",
    )


def test_ingest_survives_transient_faults_and_a_lasting_one_is_finished_by_the_next_run(
    proxy: FaultProxy, tmp_path: Path, record_property: RecordProperty
) -> None:
    folder = write_idx_folder(tmp_path / "src", make_images(40, 1), make_images(20, 2))
    src = fetch_source(str(folder), cache_dir=tmp_path)
    lake = proxied_lake(proxy, f"sqlite:///{tmp_path / 'cat1.db'}", max_attempts=4)
    proxy.add(FaultRule(503, method="PUT", path=r"\.parquet$", times=3))
    first = ingest(lake, src)
    assert first["splits"]["train"]["rows"] == 40 and first["splits"]["test"]["rows"] == 20

    # a fresh prefix: a lasting fault on the test split's data file (both splits are one commit)
    lake = proxied_lake(proxy, f"sqlite:///{tmp_path / 'cat2.db'}", max_attempts=2)
    proxy.clear()
    proxy.add(FaultRule(500, method="PUT", path=r"raw_images/data/split(=|%3D)test/", times=None))
    with pytest.raises(LakeError) as e:
        ingest(lake, src)
    assert "split=test" in one_line(e.value)
    with pytest.raises(NotCommittedError):  # the one commit failed whole: no split, not half of them
        load_raw(lake, "train")
    assert not is_ingested(lake, src.digest)
    proxy.clear()
    again = ingest(lake, src)  # the next run finishes it
    assert not again["skipped"] and again["splits"] == first["splits"]
    ids = load_raw(lake, "test", columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 20
    record_case(
        record_property,
        "ingest: 3 x 503, then a lasting 500 on split=test's data file",
        "transient: ingest completed; lasting: LakeError, neither split committed; next run finished",
        retried="yes: pyarrow retries, then the whole commit again; lasting fault gave up",
        lost="nothing (40 train / 20 test rows, ids unique)",
    )


# ------------------------------------------------------------------------------ the server goes away


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A dedicated server on its own ports, so that stopping it disturbs no other test."""
    server = S3Server(
        state_dir=tmp_path_factory.mktemp("seaweedfs-restart"),
        port=free_port_block(),
        access_key=TEST_ACCESS_KEY,
        secret_key=TEST_SECRET_KEY,
    )
    server.start(timeout=90)
    yield server
    server.stop()


def own_lake(server: S3Server, max_attempts: int = 2) -> Lake:
    s3 = S3Config(
        server.endpoint,
        TEST_ACCESS_KEY,
        TEST_SECRET_KEY,
        connect_timeout=1.0,
        request_timeout=5.0,
        max_attempts=max_attempts,
    )
    lake = Lake.from_uri(f"s3://zalando-restart/{uuid.uuid4().hex[:10]}", s3)
    lake.ensure_ready()
    return lake


def _after_n_writes(lake: Lake, n: int, action: Callable[[], object]) -> None:
    """Run action (once) right after the lake's n-th write_bytes call."""
    original, calls = lake.write_bytes, [0]

    def write_bytes(key: str, data: bytes) -> None:
        original(key, data)
        calls[0] += 1
        if calls[0] == n:
            action()

    lake.write_bytes = write_bytes  # type: ignore[method-assign]


def test_server_stopped_in_the_middle_of_a_commit_then_started_again(
    own_server: S3Server, record_property: RecordProperty
) -> None:
    lake = own_lake(own_server)
    before = tables(2, offset=5000)
    lake.commit_partition("raw/done", before, run_id="before")
    data = tables(5)
    key = "predictions/batch_date=2024-04-04"
    _after_n_writes(lake, 2, own_server.stop)  # two data files written, then the server goes away
    with pytest.raises(LakeError) as e:
        lake.commit_partition(key, data, run_id="r1")
    assert "part-00002" in one_line(e.value)
    assert own_server.status() == "stopped"
    own_server.start(timeout=60)  # same data folder: what was committed is still there
    # right after a restart SeaweedFS may answer 500 for a few seconds: the next run retries
    retry_io(lambda: assert_exactly(lake, "raw/done", before), attempts=6, base_delay=0.5)
    assert not lake.is_committed(key)
    lake.commit_partition(key, data, run_id="r2")  # the next run finishes it
    assert_exactly(lake, key, data)
    record_case(
        record_property,
        "S3 server stopped after 2 of 5 files of a commit, started again",
        "one-line LakeError; after restart: earlier partition intact, partial one invisible; next run committed",
        retried="yes (connection refused, 2 attempts), then failed cleanly",
        lost="nothing (data folder persisted across the restart)",
    )


def test_server_restarted_during_a_commit_is_survived_by_retry_io(
    own_server: S3Server, record_property: RecordProperty
) -> None:
    lake = own_lake(own_server)
    data = tables(4)
    key = "predictions/batch_date=2024-05-05"
    restarter: list[threading.Thread] = []

    def bounce() -> None:
        own_server.stop()
        t = threading.Thread(target=lambda: (time.sleep(0.5), own_server.start(timeout=60)))
        t.start()
        restarter.append(t)

    _after_n_writes(lake, 2, bounce)
    manifest = retry_io(lambda: lake.commit_partition(key, data, run_id="r1"), attempts=6, base_delay=0.5)
    restarter[0].join(timeout=60)
    assert manifest["rows"] == 4 * 50
    assert_exactly(lake, key, data)
    record_case(
        record_property,
        "S3 server stopped after 2 of 4 files, back 0.5 s later",
        "the same run finished the commit",
        retried="yes: retry_io re-ran the commit after back-off",
        lost="nothing (200/200 rows)",
    )


def test_server_killed_hard_keeps_committed_data_and_restarts_from_a_stale_pid(
    own_server: S3Server, record_property: RecordProperty
) -> None:
    lake = own_lake(own_server)
    data = tables(3)
    lake.commit_partition("models/m/v1", data, run_id="v1")
    pid = own_server._read_pid()
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)  # a crash: no clean shutdown
    deadline = time.monotonic() + 10
    while own_server.status() == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(LakeError):
        lake.read_partition("models/m/v1")
    assert own_server.status() == "stale"
    own_server.start(timeout=60)
    t0 = time.monotonic()
    # after a crash SeaweedFS may answer 500 ("please try again") for a few seconds: retried
    retry_io(lambda: assert_exactly(lake, "models/m/v1", data), attempts=6, base_delay=0.5)
    warm_up = time.monotonic() - t0  # checksums verified against the manifest
    record_case(
        record_property,
        "S3 server SIGKILLed (crash), then started again",
        "reads failed cleanly while down; stale PID file detected; restarted; committed data intact",
        retried=f"first read after the restart succeeded after {warm_up:.1f}s (retry_io on 500s)",
        lost="nothing (sha256 of every file matched its manifest)",
    )


# ------------------------------------------------------------------------------ the bucket goes away


def test_bucket_deleted_under_a_lake_clear_error_then_recreated_by_the_next_run(
    s3_server: S3Server, record_property: RecordProperty
) -> None:
    bucket = f"vanish-{uuid.uuid4().hex[:8]}"
    s3 = S3Config(s3_server.endpoint, TEST_ACCESS_KEY, TEST_SECRET_KEY, max_attempts=2)
    lake = Lake.from_uri(f"s3://{bucket}/lake", s3)
    lake.ensure_ready()
    data = tables(2)
    lake.commit_partition("raw/x", data, run_id="r1")
    client = lake._boto_client()
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)
    assert bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]
    with pytest.raises(NotCommittedError) as e:
        lake.read_partition("raw/x")
    assert "raw/x" in one_line(e.value)
    lake.ensure_ready()  # the next run: the bucket is created again
    assert bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]
    lake.commit_partition("raw/x", data, run_id="r2")
    assert_exactly(lake, "raw/x", data)
    record_case(
        record_property,
        "bucket deleted under the lake (boto3)",
        "reads: one-line NotCommittedError naming the partition; next run's ensure_ready() recreated it",
        lost="the deleted bucket's objects (outside our control); nothing half-committed",
    )


def test_missing_bucket_on_write_is_a_permanent_one_line_error(
    proxy: FaultProxy, record_property: RecordProperty
) -> None:
    """AWS and MinIO refuse writes into a missing bucket (SeaweedFS creates it): emulated by the proxy."""
    from tasks.common import is_transient

    lake = proxied_lake(proxy)
    proxy.add(FaultRule(404, path=r"^/zalando-faults/", times=None))
    with pytest.raises(LakeError) as e:
        lake.commit_partition("raw/y", tables(2), run_id="r")
    assert "bucket does not exist" in one_line(e.value)
    assert not is_transient(e.value)  # the flow's retry condition does not retry it
    assert proxy.count("PUT", MANIFEST) == 0
    record_case(
        record_property,
        "write into a missing bucket (404 NoSuchBucket, as AWS/MinIO answer)",
        "one-line LakeError 'bucket does not exist'; no manifest",
        retried="no: classified permanent (tasks.common.is_transient)",
    )
