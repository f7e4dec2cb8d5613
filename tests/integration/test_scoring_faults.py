"""Faults on scoring's commit path (Iceberg tables through the SQLite catalog, data in SeaweedFS):
storage 5xx bursts while a batch commits, a lasting fault, the S3 server stopped between a batch's
commits, a missing bucket, two runs of one batch at once, two writers racing for one table, the
catalog database locked or gone, and a table whose schema someone else changed.

What must hold: transient faults are retried and the batch commits; a lasting one fails with one
LakeError line (its ``transient`` flag saying whether a task retry may help), leaves none of the
batch's rows visible but what an earlier commit made visible, and the re-run finishes the batch with
exactly one row per input image.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.faults import FaultProxy, FaultRule, RecordProperty, record_case
from tests.scoring_support import (
    FakePredictor,
    batch_predictions,
    batch_quarantine,
    mnist_like,
    raw_parquet,
)
from zalando.errors import LakeError
from zalando.lake import Lake, S3Config
from zalando.lake.catalog import LakeCatalog, RetryPolicy, open_catalog
from zalando.lake.keys import shard_marker_key
from zalando.s3server import S3Server, free_port_block
from zalando.scoring import (
    ScoringError,
    finalize_batch,
    is_batch_committed,
    prepare_batch,
    score_batch,
    score_shard,
)
from zalando.scoring import commit as scoring_commit
from zalando.settings import Settings

pytestmark = pytest.mark.integration
V = "20260101T000000Z-fake"
FAST = RetryPolicy(attempts=4, base_delay=0.05, max_delay=0.5)
N = 60  # images per batch: three shards of 20, plus one text file to quarantine


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, repr(text)
    return text


def put_batch(lake: Lake, location: str, n: int = N, prefix: str = "img") -> list[str]:
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    lake.write_bytes(f"{location}/a.parquet", raw_parquet(ids, mnist_like(n, seed=len(prefix))))
    lake.write_bytes(f"{location}/notes.txt", b"not an image")
    return ids


def catalog_for(lake: Lake, work: Path, retry: RetryPolicy = FAST, **settings: Any) -> LakeCatalog:
    s = Settings(lake_uri=lake.uri_root, work_dir=work, **settings)
    return open_catalog(s, lake=lake, retry=retry)


def assert_exactly_once(cat: LakeCatalog, batch_id: str, ids: list[str]) -> None:
    rows = batch_predictions(cat, batch_id, V).column("image_id").to_pylist()
    assert sorted(rows) == sorted(ids) and len(rows) == len(set(rows))
    assert batch_quarantine(cat, batch_id, V).num_rows == 1  # the text file, once
    assert is_batch_committed(cat, batch_id, V)


def scored_plan(cat: LakeCatalog, location: str, batch_date: str = "2026-06-01") -> Any:
    """A planned batch whose shards are all scored (written, marked), not yet finalized."""
    plan = prepare_batch(
        cat, location, model_version=V, batch_date=batch_date, shard_size=20, check_model=False
    )
    results = [score_shard(cat.lake, s, FakePredictor(), V) for s in plan.shards]
    return plan, results


def rerun(cat: LakeCatalog, location: str, batch_date: str = "2026-06-01") -> Any:
    predictor = FakePredictor()
    r = score_batch(cat, location, predictor=predictor, model_version=V, batch_date=batch_date, shard_size=20)
    assert predictor.calls == 0 and r.shards_skipped == r.shards  # every shard reused, only the commit redone
    return r


# ------------------------------------------------------------------------------ storage faults


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as p:
        yield p


def proxied(proxy: FaultProxy, tmp_path: Path, max_attempts: int = 4) -> LakeCatalog:
    s3 = S3Config(
        proxy.endpoint, TEST_ACCESS_KEY, TEST_SECRET_KEY, connect_timeout=2.0, request_timeout=5.0,
        max_attempts=max_attempts,
    )  # fmt: skip
    lake = Lake.from_uri(f"s3://zalando-faults/{uuid.uuid4().hex[:10]}", s3)
    lake.ensure_ready()
    return catalog_for(
        lake, tmp_path / "work", s3_endpoint=proxy.endpoint, s3_access_key=TEST_ACCESS_KEY,
        s3_secret_key=TEST_SECRET_KEY,
    )  # fmt: skip


def test_5xx_bursts_while_a_batch_commits_are_retried_and_it_commits_once(
    proxy: FaultProxy, tmp_path: Path, record_property: RecordProperty
) -> None:
    cat = proxied(proxy, tmp_path)
    ids = put_batch(cat.lake, "inbox/burst")
    data = proxy.add(FaultRule(503, method="PUT", path=r"/zalando/predictions/data/.*\.parquet$", times=2))
    plan, results = scored_plan(cat, "inbox/burst")
    assert data.fired == 2  # two shard data files answered 503 first: pyarrow's retry wrote them
    meta = proxy.add(FaultRule(503, method="PUT", path=r"/zalando/predictions/metadata/", times=3))
    reads = proxy.add(FaultRule(500, method="GET", path=r"/zalando/predictions/", times=2))
    r = finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    assert meta.fired == 3 and reads.fired == 2
    assert_exactly_once(cat, r.batch_id, ids)
    record_case(
        record_property,
        "scoring: 503 on 2 shard data-file PUTs, then 3 x 503 on metadata PUTs and 2 x 500 on reads "
        "while the batch commits",
        "shards written, batch committed: one Iceberg commit, 60 rows + 1 quarantined",
        retried=f"yes: {data.fired + meta.fired + reads.fired} faults absorbed (pyarrow's S3 retry, then the commit's)",
        lost="nothing (one row per image, no duplicates)",
    )


def test_lasting_fault_in_a_batch_commit_shows_nothing_and_the_rerun_commits_it(
    proxy: FaultProxy, tmp_path: Path, record_property: RecordProperty
) -> None:
    cat = proxied(proxy, tmp_path, max_attempts=2)
    ids = put_batch(cat.lake, "inbox/lasting")
    plan, results = scored_plan(cat, "inbox/lasting")
    proxy.add(FaultRule(500, method="PUT", path=r"/zalando/predictions/metadata/", times=None))
    with pytest.raises(LakeError) as e:
        finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    msg = one_line(e.value)
    assert "zalando.predictions" in msg and TEST_SECRET_KEY not in msg
    assert e.value.transient  # a 5xx: the task's retry may finish it
    proxy.clear()
    assert batch_predictions(cat, plan.batch_id).num_rows == 0 and not is_batch_committed(
        cat, plan.batch_id, V
    )
    r = rerun(cat, "inbox/lasting")
    assert_exactly_once(cat, r.batch_id, ids)
    record_case(
        record_property,
        "scoring: lasting 500 on every predictions metadata PUT while the batch commits",
        "one-line LakeError (transient); no row of the batch visible; the re-run reused all 3 shards and committed",
        retried="yes (commit retries with back-off), then failed cleanly",
        lost="nothing (re-run: 60 rows, each once)",
        leaked="nothing (no secret in the error)",
    )


def test_missing_bucket_fails_a_batch_with_one_permanent_line(
    proxy: FaultProxy, tmp_path: Path, record_property: RecordProperty
) -> None:
    cat = proxied(proxy, tmp_path)
    put_batch(cat.lake, "inbox/nobucket")
    proxy.add(FaultRule(404, path=r"^/zalando-faults/", times=None))
    predictor = FakePredictor()
    with pytest.raises(LakeError) as e:
        score_batch(cat, "inbox/nobucket", predictor=predictor, model_version=V, batch_date="2026-06-01")
    assert "bucket does not exist" in one_line(e.value) and not e.value.transient
    assert predictor.calls == 0
    record_case(
        record_property,
        "scoring into a missing bucket (404 NoSuchBucket, as AWS/MinIO answer)",
        "one-line LakeError 'bucket does not exist' at planning, before any image is scored",
        retried="no: classified permanent",
    )


# ------------------------------------------------------------------------------ the server goes away


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A dedicated server on its own ports, so that stopping it disturbs no other test."""
    server = S3Server(
        state_dir=tmp_path_factory.mktemp("seaweedfs-scoring"),
        port=free_port_block(),
        access_key=TEST_ACCESS_KEY,
        secret_key=TEST_SECRET_KEY,
    )
    server.start(timeout=90)
    yield server
    server.stop()


def _own_catalog(server: S3Server, tmp_path: Path) -> LakeCatalog:
    s3 = S3Config(
        server.endpoint,
        TEST_ACCESS_KEY,
        TEST_SECRET_KEY,
        connect_timeout=1.0,
        request_timeout=5.0,
        max_attempts=2,
    )
    lake = Lake.from_uri(f"s3://zalando-restart/{uuid.uuid4().hex[:10]}", s3)
    lake.ensure_ready()
    return catalog_for(
        lake, tmp_path / "work", retry=RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.2),
        s3_endpoint=server.endpoint, s3_access_key=TEST_ACCESS_KEY, s3_secret_key=TEST_SECRET_KEY,
    )  # fmt: skip


def _stop_after(monkeypatch: pytest.MonkeyPatch, name: str, calls: int, server: S3Server) -> None:
    """Stop the server right after the ``calls``-th call of scoring.commit's ``name`` returns."""
    real, seen = getattr(scoring_commit, name), [0]

    def wrapped(*a: Any, **kw: Any) -> Any:
        out = real(*a, **kw)
        seen[0] += 1
        if seen[0] == calls:
            server.stop()
        return out

    monkeypatch.setattr(scoring_commit, name, wrapped)


@pytest.mark.parametrize(
    ("after", "calls", "visible"),
    [("add_data_files", 1, False), ("add_data_files", 2, True)],
    ids=["after-quarantine-before-predictions", "after-predictions-before-the-batch-row"],
)
def test_s3_stopped_between_a_batchs_commits_then_started_again(
    own_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    record_property: RecordProperty,
    after: str,
    calls: int,
    visible: bool,
) -> None:
    cat = _own_catalog(own_server, tmp_path)
    ids = put_batch(cat.lake, "inbox/stopped")
    plan, results = scored_plan(cat, "inbox/stopped")
    _stop_after(monkeypatch, after, calls, own_server)
    with pytest.raises(LakeError) as e:
        finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    one_line(e.value)
    assert own_server.status() == "stopped"
    monkeypatch.undo()
    own_server.start(timeout=60)
    # right after a restart SeaweedFS may answer 500 for a few seconds
    deadline = time.monotonic() + 30
    while True:
        try:
            seen = batch_predictions(cat, plan.batch_id).num_rows
            break
        except LakeError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert seen == (N if visible else 0) and not is_batch_committed(cat, plan.batch_id, V)
    r = rerun(cat, "inbox/stopped")
    assert_exactly_once(cat, r.batch_id, ids)
    where = (
        "after the quarantine commit"
        if not visible
        else "after the predictions commit, before the batch's row"
    )
    record_case(
        record_property,
        f"scoring: S3 server stopped {where}, started again",
        "one-line LakeError; "
        + ("the batch's rows were visible whole (60), not yet 'committed'" if visible else "no row visible")
        + "; the re-run reused every shard and committed the same files once",
        retried="yes (connection refused, commit retries), then failed cleanly",
        lost="nothing (60 rows, each once)",
    )


# ------------------------------------------------------------------------------ concurrency


def test_two_runs_of_one_batch_at_once_leave_one_row_per_image(
    s3_lake: Lake, s3_settings: Settings, record_property: RecordProperty
) -> None:
    ids = put_batch(s3_lake, "inbox/twice")
    start = threading.Barrier(2)
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        own = open_catalog(s3_settings, lake=Lake.from_settings(s3_settings), retry=FAST)
        try:
            start.wait(timeout=30)
            out.append(
                score_batch(own, "inbox/twice", predictor=FakePredictor(), model_version=V,
                            batch_date="2026-06-02", shard_size=20)
            )  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    cat = open_catalog(s3_settings, lake=s3_lake)
    assert len(out) == 2 and {r.batch_id for r in out} == {out[0].batch_id}
    assert_exactly_once(cat, out[0].batch_id, ids)
    record_case(
        record_property,
        "scoring: two runs of the same batch at once (own catalogs, one table)",
        "both completed; each commit replaced the batch's rows whole",
        retried="commit conflicts: retried on the fresh snapshot",
        lost="nothing: exactly one row per image (60), one quarantine row",
    )


def _marker_keys(lake: Lake, plan: Any) -> list[str]:
    return [shard_marker_key(s.batch_date, V, s.batch_id, s.shard_id) for s in plan.shards]


def test_a_torn_read_of_a_shard_marker_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property: RecordProperty
) -> None:
    # SeaweedFS serves a read that overlaps a rewrite of the object torn (2 of 1,923 reads while
    # one key was rewritten for 10 s); two runs of one batch rewrite each other's markers.
    lake = Lake.local(tmp_path / "lake")
    cat = catalog_for(lake, tmp_path / "work")
    ids = put_batch(lake, "inbox/torn")
    plan, results = scored_plan(cat, "inbox/torn")
    torn_key = _marker_keys(lake, plan)[1]
    real_read, torn = Lake.read_bytes, []

    def read_bytes(self: Lake, key: str) -> bytes:
        data = real_read(self, key)
        if key == torn_key and len(torn) < 2:
            torn.append(key)
            return data[: len(data) // 2]  # the first half, as a torn read returns it
        return data

    monkeypatch.setattr(Lake, "read_bytes", read_bytes)
    r = finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    monkeypatch.undo()
    assert len(torn) == 2 and r.scored == N
    assert_exactly_once(cat, r.batch_id, ids)
    record_case(
        record_property,
        "scoring: a shard marker read torn twice at the commit",
        "read again after a pause; the batch committed",
        retried="yes: the marker was read a third time",
        lost="nothing (60 rows)",
    )


def _rewrite_shard_files(lake: Lake, marker_key: str, *, new_marker: bool) -> None:
    """What a second attempt at a shard of the same plan does (a task retried while its first
    attempt still ran): rewrite its files (other bytes, same rows) and, with ``new_marker``, then
    its marker. Another plan writes files of its own names and never does this."""
    marker = lake.read_json(marker_key)
    for key, entry in marker["files"].items():
        table = pq.read_table(io.BytesIO(lake.read_bytes(key)))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="gzip")
        lake.write_bytes(key, buf.getvalue())
        entry.update(sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue()))
    if new_marker:
        lake.write_json(marker_key, marker)


def test_a_shard_a_second_attempt_rewrote_after_our_read_is_accepted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property: RecordProperty
) -> None:
    lake = Lake.local(tmp_path / "lake")
    cat = catalog_for(lake, tmp_path / "work")
    ids = put_batch(lake, "inbox/again")
    plan, results = scored_plan(cat, "inbox/again")
    real_read = scoring_commit.read_shard_markers

    def read_then_rival_rescores(*a: Any, **kw: Any) -> Any:
        markers = real_read(*a, **kw)  # the commit holds the old markers, then a second attempt rewrites
        _rewrite_shard_files(lake, _marker_keys(lake, plan)[0], new_marker=True)
        return markers

    monkeypatch.setattr(scoring_commit, "read_shard_markers", read_then_rival_rescores)
    r = finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    monkeypatch.undo()
    assert r.scored == N
    assert_exactly_once(cat, r.batch_id, ids)
    record_case(
        record_property,
        "scoring: a second attempt at a shard rewrote it between the commit's marker read and its checksum check",
        "the shard's new marker lists the new checksums: accepted, the batch committed",
        retried="yes: the marker was read again",
        lost="nothing (60 rows, each once)",
    )


def test_a_shard_file_changed_after_its_marker_is_refused_and_rescored(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    lake = Lake.local(tmp_path / "lake")
    cat = catalog_for(lake, tmp_path / "work")
    ids = put_batch(lake, "inbox/changed")
    plan, results = scored_plan(cat, "inbox/changed")
    keys = _marker_keys(lake, plan)
    _rewrite_shard_files(lake, keys[2], new_marker=False)  # files rewritten, the marker not
    with pytest.raises(ScoringError) as e:
        finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    assert "files of shards [2] changed after they committed" in one_line(e.value)
    assert not lake.exists(keys[2]) and lake.exists(keys[0])  # only that shard is scored again
    assert not is_batch_committed(cat, plan.batch_id, V)
    predictor = FakePredictor()
    r = score_batch(cat, "inbox/changed", predictor=predictor, model_version=V, batch_date="2026-06-01",
                    shard_size=20)  # fmt: skip
    assert predictor.calls == 1 and r.shards_skipped == r.shards - 1
    assert_exactly_once(cat, r.batch_id, ids)
    record_case(
        record_property,
        "scoring: a shard's file rewritten after its marker, with no new marker",
        "one-line ScoringError naming the shard; its marker removed; the re-run rescored only it",
        retried="yes: looked at again after pauses, then refused",
        lost="nothing (60 rows, each once, after the re-run)",
    )


def test_two_batches_racing_for_the_predictions_table_both_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property: RecordProperty
) -> None:
    lake = Lake.local(tmp_path / "lake")
    cat = catalog_for(lake, tmp_path / "work")
    rival = catalog_for(lake, tmp_path / "work")
    ids_a, ids_b = put_batch(lake, "inbox/a", prefix="a"), put_batch(lake, "inbox/b", prefix="b")
    plan_b, results_b = scored_plan(rival, "inbox/b")
    plan_a, results_a = scored_plan(cat, "inbox/a")
    from zalando.lake import commit as lake_commit

    real_add, real_check = scoring_commit.add_data_files, lake_commit.check_schema
    armed, raced = [], []

    def add(c: LakeCatalog, table: str, keys: Any, **kw: Any) -> Any:
        if table == "predictions" and c is cat and not raced:
            armed.append(True)  # our predictions commit is next: race it
        return real_add(c, table, keys, **kw)

    def check_then_race(*a: Any, **kw: Any) -> Any:
        if armed:  # our commit has loaded the table; the rival commits its batch before ours lands
            armed.clear()
            raced.append(finalize_batch(rival, plan_b.batch, plan_b.shards, V, results=results_b))
        return real_check(*a, **kw)

    monkeypatch.setattr(scoring_commit, "add_data_files", add)
    monkeypatch.setattr(lake_commit, "check_schema", check_then_race)
    a = finalize_batch(cat, plan_a.batch, plan_a.shards, V, results=results_a)
    monkeypatch.undo()
    assert raced and raced[0].snapshot_id != a.snapshot_id
    from zalando.lake.tables import load_table

    table = load_table(cat, "predictions")
    order = [s.snapshot_id for s in table.metadata.snapshots]
    assert order.index(raced[0].snapshot_id) < order.index(a.snapshot_id)  # the rival landed first
    assert_exactly_once(cat, a.batch_id, ids_a)
    assert_exactly_once(cat, raced[0].batch_id, ids_b)
    record_case(
        record_property,
        "scoring: another batch commits into the predictions table between our load and our commit",
        "both batches committed, each whole",
        retried="yes: the losing commit was redone on the fresh snapshot",
        lost="nothing (60 + 60 rows)",
    )


# ------------------------------------------------------------------------------ the catalog


def test_catalog_database_locked_is_retried_then_one_transient_line(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    lake = Lake.local(tmp_path / "lake")
    db = tmp_path / "catalog.db"
    cat = catalog_for(
        lake, tmp_path / "work", retry=RetryPolicy(attempts=3, base_delay=0.01),
        iceberg_catalog_uri=f"sqlite:///{db}?timeout=0.05",
    )  # fmt: skip
    ids = put_batch(lake, "inbox/locked")
    plan, results = scored_plan(cat, "inbox/locked")
    lock = sqlite3.connect(db, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(LakeError) as e:
            finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    finally:
        lock.rollback()
    msg = one_line(e.value)
    assert "database is locked" in msg and "gave up after 3 attempts" in msg and e.value.transient
    assert not is_batch_committed(cat, plan.batch_id, V)
    # a lock released while the commit backs off: the same finalize commits
    lock.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, lock.rollback).start()
    cat.retry = RetryPolicy(attempts=10, base_delay=0.05, max_delay=0.3)
    r = finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    assert_exactly_once(cat, r.batch_id, ids)
    record_case(
        record_property,
        "scoring: the SQLite catalog database locked during a batch's commit (lasting; then released)",
        "lasting: one-line LakeError 'database is locked' (transient: the task retries), batch not committed; "
        "released within the back-off: committed",
        retried="yes: 3 attempts, then the task's retries; released lock: the same commit landed",
        lost="nothing (60 rows, each once)",
    )


def test_catalog_database_gone_is_one_permanent_line_and_a_server_down_a_transient_one(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    lake = Lake.local(tmp_path / "lake")
    cat = catalog_for(lake, tmp_path / "work")
    put_batch(lake, "inbox/gone")
    score_batch(cat, "inbox/gone", predictor=FakePredictor(), model_version=V, batch_date="2026-06-01")
    cat.catalog.engine.dispose()
    (tmp_path / "work" / "iceberg" / "catalog.db").unlink()  # the catalog database is gone
    again = catalog_for(lake, tmp_path / "work")
    predictor = FakePredictor()
    with pytest.raises(LakeError) as e:
        score_batch(again, "inbox/gone", predictor=predictor, model_version=V, batch_date="2026-06-02")
    assert "lost or replaced" in one_line(e.value) and not e.value.transient and predictor.calls == 0
    port = free_port_block(1)
    with pytest.raises(LakeError) as down:
        catalog_for(
            lake, tmp_path / "w2", retry=RetryPolicy(attempts=2, base_delay=0.01),
            iceberg_catalog_uri=f"http://127.0.0.1:{port}",
        )  # fmt: skip
    assert "not reachable" in one_line(down.value) and down.value.transient
    record_case(
        record_property,
        "scoring: the catalog database deleted (lost); a catalog server not running",
        "lost: one-line LakeError 'lost or replaced' (permanent), nothing scored; "
        "server down: one-line LakeError 'not reachable' (transient)",
        retried="down: yes (2 attempts), then the task's retries; lost: no",
        lost="nothing (the tables' files untouched; register_table restores them)",
    )


def test_a_table_someone_else_changed_is_refused_naming_the_columns(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    from pyiceberg.types import StringType

    lake = Lake.local(tmp_path / "lake")
    cat = catalog_for(lake, tmp_path / "work")
    put_batch(lake, "inbox/schema")
    plan, results = scored_plan(cat, "inbox/schema")
    foreign = catalog_for(lake, tmp_path / "work").catalog.load_table("zalando.predictions")
    with foreign.update_schema() as update:
        update.add_column("reviewer", StringType())
    # mid-batch: the shards' files no longer fit; the commit names the column, nothing lands
    with pytest.raises(LakeError) as e:
        finalize_batch(cat, plan.batch, plan.shards, V, results=results)
    assert "missing reviewer" in one_line(e.value)
    assert not is_batch_committed(cat, plan.batch_id, V)
    # the next batch: refused at planning, before any image is scored
    predictor = FakePredictor()
    with pytest.raises(LakeError) as e2:
        score_batch(cat, "inbox/schema", predictor=predictor, model_version=V, batch_date="2026-06-03")
    assert "reviewer" in one_line(e2.value) and "evolve_schema" in str(e2.value) and predictor.calls == 0
    record_case(
        record_property,
        "scoring: someone else added a column to the predictions table (mid-batch, and before a batch)",
        "one-line LakeError naming the column ('missing reviewer'): at the commit (nothing landed) and "
        "at planning (nothing scored)",
        retried="no: permanent until the schema is evolved on purpose",
        lost="nothing committed half",
    )
