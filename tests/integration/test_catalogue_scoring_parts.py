# ruff: noqa: F401, F811 - fixtures imported from catalogue_support and used as arguments
"""The parts of scoring a catalogue against a real PostgreSQL and a real SeaweedFS (no mocks): s3:// image
fetches, the demo catalogue's defects as reason codes, an incremental re-run that scores only what
changed, and the write-back (idempotent, order-safe, one transaction) surviving a SIGKILL between the
lake commit and the upsert."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pytest
from PIL import Image

from tests.conftest import MINI_DIR, REPO, s3_config
from tests.integration.catalogue_support import catalog_conn, fresh_db, pg_settings  # fixtures
from zalando.catalogue.db import connect, conninfo_for
from zalando.catalogue.demo import load_demo
from zalando.catalogue.errors import CatalogueError
from zalando.catalogue.fetch import FetchConfig, FetchedImage, ImageFetcher
from zalando.catalogue.incremental import (
    drop_unchanged,
    read_previous,
    reconcile,
    select_for_scoring,
)
from zalando.catalogue.query import ProductRow, catalogue_snapshot, iter_products
from zalando.catalogue.schema import check_schema, init_schema
from zalando.catalogue.text import summarize_text_checks
from zalando.catalogue.writeback import PredictionRow, pending_batches, register_batch, repair, write_back
from zalando.data.idx import read_idx_images, read_idx_labels
from zalando.images import decode_image
from zalando.lake import Lake
from zalando.s3server import S3Server
from zalando.settings import Settings

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def _png(value: int) -> bytes:
    a = np.zeros((28, 28), np.uint8)
    a[6:22, 6:22] = value
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


def _row(pid: int, url: str) -> ProductRow:
    return ProductRow(
        product_id=pid,
        title=None,
        image_id=pid,
        image_url=url,
        image_problem=None,
        description=None,
        description_source=None,
    )


# ------------------------------------------------------------------------------ s3:// fetches
def test_s3_images_come_from_the_lakes_bucket_or_an_allowed_one(s3_server: S3Server, s3_lake: Lake) -> None:
    png = _png(180)
    s3_lake.write_bytes("catalogue/images/a.png", png)
    s3_lake.write_bytes("catalogue/images/page.png", b"<!doctype html><p>404</p>")
    s3_lake.write_bytes("catalogue/images/empty.png", b"")
    s3_lake.write_bytes("catalogue/images/big.png", png + b"\0" * 5000)
    retailer = Lake.from_uri("s3://catalogue-retailer/imgs", s3_config(s3_server))
    retailer.ensure_ready()
    retailer.write_bytes("b.png", png)
    other = Lake.from_uri("s3://catalogue-elsewhere/imgs", s3_config(s3_server))
    other.ensure_ready()
    other.write_bytes("c.png", png)
    fetcher = ImageFetcher(
        FetchConfig(buckets=("catalogue-retailer",), max_bytes=4096, backoff_s=0.01), s3_lake
    )
    lake_url = s3_lake.uri("catalogue/images")
    cases = {
        f"{lake_url}/a.png": None,
        "s3://catalogue-retailer/imgs/b.png": None,
        f"{lake_url}/missing.png": "missing_object",
        "s3://catalogue-retailer/imgs/missing.png": "missing_object",
        f"{lake_url}/page.png": "not_an_image",
        f"{lake_url}/empty.png": "empty_file",
        f"{lake_url}/big.png": "too_large",
        "s3://catalogue-elsewhere/imgs/c.png": "url_not_allowed",  # exists, but not an allowed bucket
        f"{lake_url}/../images/a.png": "url_not_allowed",
        f"{lake_url}//a.png": "url_not_allowed",
        "s3://catalogue-retailer": "url_not_allowed",  # no key
    }
    rows = [_row(i, url) for i, url in enumerate(cases, start=1)]
    got = fetcher.fetch_all(rows)
    assert {f.url: f.problem for f in got} == cases
    ok = got[0]
    assert ok.data == png and ok.sha256 == hashlib.sha256(png).hexdigest() and ok.size == len(png)
    assert all(not f.transient and f.attempts == 1 for f in got if f.url)  # nothing here is worth a retry
    assert got[4].size == len(b"<!doctype html><p>404</p>") and got[4].data is None


def _mini_test_split() -> tuple[np.ndarray, np.ndarray]:
    return (
        read_idx_images(str(MINI_DIR / "t10k-images-idx3-ubyte.gz")),
        read_idx_labels(str(MINI_DIR / "t10k-labels-idx1-ubyte.gz")),
    )


EXPECTED_PROBLEM = {
    "no_images": "no_primary_image",
    "several_primary_images": "several_primary_images",
    "missing_object": "missing_object",
    "not_an_image": "not_an_image",
}


def _truth(conn: psycopg.Connection) -> dict[int, tuple[int, str, str | None]]:
    out = {
        pid: (test_index, group, defect)
        for pid, test_index, group, defect in conn.execute(
            'SELECT product_id, test_index, "group", defect FROM demo_truth'
        )
    }
    conn.rollback()
    return out


def _predictions(
    fetched: Iterable[FetchedImage], truth: dict, batch_id: str, version: str, at: datetime
) -> list[PredictionRow]:
    """What a model that is always right would predict for the fetched images (the scoring stand-in)."""
    return [
        PredictionRow(
            product_id=f.product_id,
            group=truth[f.product_id][1],
            confidence=0.9,
            model_version=version,
            batch_id=batch_id,
            scored_at=at,
            image_id=f.image_id,
            image_url=f.url,
            image_sha256=f.sha256,
        )
        for f in fetched
        if f.ok
    ]


def _run(
    conn: psycopg.Connection,
    fetcher: ImageFetcher,
    champion: str,
    *,
    full: bool = False,
    verify_content: bool = True,
) -> tuple[list[ProductRow], list, list[FetchedImage], list[FetchedImage], list]:
    """One incremental run up to the scoring: query + previous scores in one snapshot, decide, fetch,
    drop the unchanged; returns (rows, candidates, scored, quarantined, skipped)."""
    with catalogue_snapshot(conn) as snap:
        rows = list(snap.rows())
        previous = read_previous(snap)
    candidates, skipped = select_for_scoring(rows, previous, champion, full, verify_content=verify_content)
    fetched = fetcher.fetch_all([c.row for c in candidates])
    to_score, unchanged = drop_unchanged(candidates, fetched)
    scored = [f for f in to_score if f.ok]
    quarantined = [f for f in to_score if not f.ok]
    skipped = skipped + unchanged
    rec = reconcile(
        [r.product_id for r in rows],
        [f.product_id for f in scored],
        [f.product_id for f in quarantined],
        [s.product_id for s in skipped],
    )
    assert rec.balanced
    return rows, candidates, scored, quarantined, skipped


def test_the_demo_catalogue_fetches_with_its_defects_as_reason_codes_and_rescores_only_what_changed(
    catalog_conn: psycopg.Connection, s3_lake: Lake, s3_settings: Settings
) -> None:
    images, labels = _mini_test_split()
    summary = load_demo(catalog_conn, s3_lake, images, labels, n_products=120, seed=7)
    truth = _truth(catalog_conn)
    fetcher = ImageFetcher.from_settings(s3_settings, s3_lake)

    # run 1: nothing scored yet: every product is fetched; defects are quarantined with their reason
    rows, candidates, scored, quarantined, skipped = _run(catalog_conn, fetcher, "v1")
    assert (
        len(rows) == 120 and skipped == [] and {c.reason for c in candidates} == {"new", "catalogue_defect"}
    )
    for f in scored + quarantined:
        test_index, _, defect = truth[f.product_id]
        expected = EXPECTED_PROBLEM.get(defect or "")
        assert f.problem == expected, (f.product_id, defect, f)
        if expected is None:  # the primary image is the product's own test image, byte for byte
            assert np.array_equal(decode_image(f.data or b""), images[test_index])
    assert len(quarantined) == sum(summary.defects[d] for d in EXPECTED_PROBLEM)
    text = summarize_text_checks((r.description, truth[r.product_id][1]) for r in rows)
    wrong = [r for r in rows if truth[r.product_id][2] == "wrong_description" and r.description]
    assert text.disagreeing == len(wrong) > 0  # the lexicon flags the deliberately wrong texts only
    first = write_back(catalog_conn, "b1", _predictions(scored, truth, "b1", "v1", T0))
    assert first.written == len(scored)

    # run 2, nothing changed: every scored product is fetched, its digest matches, it is skipped
    _, candidates, scored2, quarantined2, skipped2 = _run(catalog_conn, fetcher, "v1")
    assert scored2 == [] and {s.product_id for s in skipped2} == {f.product_id for f in scored}
    assert {s.reason for s in skipped2} == {"unchanged"}
    assert [f.product_id for f in quarantined2] == [f.product_id for f in quarantined]  # still reported

    # change three things: a URL, one object's bytes (shared by every product showing it), nothing else
    by_url: dict[str, list[int]] = {}
    for f in scored:
        by_url.setdefault(f.url or "", []).append(f.product_id)
    moved_pid = scored[0].product_id
    new_url = next(u for u in by_url if u != scored[0].url)
    catalog_conn.execute("UPDATE image SET url = %s WHERE id = %s", (new_url, scored[0].image_id))
    catalog_conn.commit()
    rewritten_url = next(u for u, pids in by_url.items() if moved_pid not in pids and u != new_url)
    s3_lake.write_bytes(rewritten_url.removeprefix(s3_lake.uri() + "/"), _png(77))
    changed = {moved_pid, *by_url[rewritten_url]}
    # products whose primary now is new_url were scored from it already: same URL, same bytes: skipped
    _, candidates3, scored3, _, skipped3 = _run(catalog_conn, fetcher, "v1")
    assert {f.product_id for f in scored3} == changed
    reasons = {c.row.product_id: c.reason for c in candidates3}
    assert reasons[moved_pid] == "image_changed" and {reasons[p] for p in by_url[rewritten_url]} == {
        "check_content"
    }
    write_back(catalog_conn, "b2", _predictions(scored3, truth, "b2", "v1", T0 + timedelta(days=1)))
    stored = dict(
        catalog_conn.execute(
            "SELECT product_id, image_sha256 FROM product_classification WHERE batch_id = 'b2'"
        ).fetchall()
    )
    catalog_conn.rollback()
    assert stored.keys() == changed
    assert stored[by_url[rewritten_url][0]] == hashlib.sha256(_png(77)).hexdigest()
    _, _, scored4, _, _ = _run(catalog_conn, fetcher, "v1")
    assert scored4 == []  # and now it all stands again

    # trusting URLs (verify_content=False): only the quarantined products are fetched again (the query's
    # defects, and the URLs that failed: never scored, so still new); an in-place change is missed
    s3_lake.write_bytes(rewritten_url.removeprefix(s3_lake.uri() + "/"), _png(99))
    _, cands5, scored5, _, skipped5 = _run(catalog_conn, fetcher, "v1", verify_content=False)
    assert scored5 == [] and {c.row.product_id for c in cands5} == {f.product_id for f in quarantined}
    assert {c.reason for c in cands5} == {"catalogue_defect", "new"}
    assert {s.reason for s in skipped5} == {"unchanged_url"}
    _, _, scored6, _, _ = _run(catalog_conn, fetcher, "v1")  # verifying finds it
    assert {f.product_id for f in scored6} == set(by_url[rewritten_url])

    # a new champion, or --full: every product with an image is scored again
    for kwargs in ({"champion": "v2"}, {"champion": "v1", "full": True}):
        _, _, scored_all, quarantined_all, skipped_all = _run(catalog_conn, fetcher, **kwargs)  # type: ignore[arg-type]
        assert skipped_all == [] and len(scored_all) + len(quarantined_all) == 120


def test_previous_scores_come_from_the_querys_snapshot(
    catalog_conn: psycopg.Connection, fresh_db: Settings
) -> None:
    catalog_conn.execute("INSERT INTO product (id, title) SELECT g, 't' FROM generate_series(1, 3) AS g")
    catalog_conn.commit()
    write_back(catalog_conn, "b1", [_pred(1, "b1", T0)])
    with connect(conninfo_for(fresh_db)) as other:
        with catalogue_snapshot(catalog_conn) as snap:
            assert snap.count_products() == 3  # the snapshot is taken here
            write_back(other, "b2", [_pred(2, "b2", T0), _pred(1, "b2", T0 + timedelta(hours=1))])
            previous = read_previous(snap)
        assert {p: v.batch_id for p, v in previous.items()} == {1: "b1"}
        with catalogue_snapshot(catalog_conn) as snap:
            assert {p: v.batch_id for p, v in read_previous(snap).items()} == {1: "b2", 2: "b2"}


# ------------------------------------------------------------------------------ the write-back
def _pred(pid: int, batch: str, at: datetime, group: str = "Bags", conf: float = 0.8) -> PredictionRow:
    return PredictionRow(
        product_id=pid,
        group=group,
        confidence=conf,
        model_version="v1",
        batch_id=batch,
        scored_at=at,
        image_id=pid * 10,
        image_url=f"s3://b/{pid}.png",
        image_sha256=f"sha-{pid}-{batch}",
    )


def _table(conn: psycopg.Connection) -> list[tuple]:
    rows = conn.execute(
        'SELECT product_id, "group", confidence, model_version, batch_id, scored_at, image_id, image_url, '
        "image_sha256 FROM product_classification ORDER BY product_id"
    ).fetchall()
    conn.rollback()
    return rows


def _ledger(conn: psycopg.Connection) -> dict[str, tuple]:
    rows = conn.execute(
        "SELECT batch_id, predictions, written, unchanged, kept_newer, products_gone FROM catalogue_batches"
    ).fetchall()
    conn.rollback()
    return {r[0]: r[1:] for r in rows}


def test_write_back_is_idempotent_order_safe_and_all_or_nothing(catalog_conn: psycopg.Connection) -> None:
    conn = catalog_conn
    conn.execute("INSERT INTO product (id, title) SELECT g, 't' FROM generate_series(1, 10) AS g")
    conn.commit()
    b1 = [_pred(p, "b1", T0) for p in range(1, 9)]
    first = write_back(conn, "b1", b1, committed_at=T0)
    assert (first.predictions, first.written, first.unchanged, first.kept_newer, first.products_gone) == (
        8,
        8,
        0,
        0,
        0,
    )
    after_first = _table(conn)
    assert len(after_first) == 8 and after_first[0][1:6] == ("Bags", 0.8, "v1", "b1", T0)
    again = write_back(conn, "b1", b1)  # a re-run writes the same rows: nothing changes
    assert (again.written, again.unchanged) == (0, 8) and _table(conn) == after_first
    older = write_back(conn, "b0", [_pred(p, "b0", T0 - timedelta(days=1), "Footwear") for p in (1, 2, 3)])
    assert (older.written, older.kept_newer) == (0, 3) and _table(
        conn
    ) == after_first  # never overwrites newer
    newer = write_back(conn, "b2", [_pred(p, "b2", T0 + timedelta(days=1), "Footwear") for p in (2, 3, 4, 9)])
    assert (newer.written, newer.unchanged, newer.kept_newer) == (4, 0, 0)
    conn.execute("DELETE FROM product WHERE id = 10")
    conn.commit()
    gone = write_back(
        conn, "b3", [_pred(10, "b3", T0), _pred(11, "b3", T0), _pred(5, "b3", T0 + timedelta(days=2))]
    )
    assert (gone.written, gone.products_gone) == (1, 2)
    table = {r[0]: r for r in _table(conn)}
    assert sorted(table) == list(range(1, 10))
    assert {p: table[p][4] for p in table} == {
        1: "b1",
        2: "b2",
        3: "b2",
        4: "b2",
        5: "b3",
        6: "b1",
        7: "b1",
        8: "b1",
        9: "b2",
    }
    assert _ledger(conn) == {
        "b1": (8, 0, 8, 0, 0),  # the last write-back of b1 is the one recorded
        "b0": (3, 0, 0, 3, 0),
        "b2": (4, 4, 0, 0, 0),
        "b3": (3, 1, 0, 0, 2),
    }
    before = _table(conn), _ledger(conn)
    with pytest.raises(CatalogueError, match="appears twice.*nothing written"):
        write_back(
            conn, "b4", [_pred(1, "b4", T0 + timedelta(days=3)), _pred(1, "b4", T0 + timedelta(days=3))]
        )
    with pytest.raises(CatalogueError, match="belongs to batch b1; nothing written"):
        write_back(
            conn, "b4", [_pred(2, "b4", T0 + timedelta(days=3)), _pred(3, "b1", T0 + timedelta(days=3))]
        )
    assert (_table(conn), _ledger(conn)) == before  # not one row of either try
    empty = write_back(conn, "b5", [])
    assert empty.predictions == 0 and "b5" in _ledger(conn)  # an empty batch is written back too
    conn.execute("SELECT 1")
    with pytest.raises(CatalogueError, match="already inside a transaction"):
        write_back(conn, "b6", [])
    conn.rollback()


def test_the_ledger_is_part_of_the_schema(catalog_conn: psycopg.Connection) -> None:
    init_schema(catalog_conn)  # idempotent with the ledger
    catalog_conn.execute("ALTER TABLE catalogue_batches DROP COLUMN kept_newer")
    catalog_conn.commit()
    with pytest.raises(CatalogueError, match=r"column catalogue_batches\.kept_newer is missing"):
        check_schema(catalog_conn)
    catalog_conn.execute("DROP TABLE catalogue_batches")
    catalog_conn.execute("ALTER TABLE product_classification DROP COLUMN image_sha256")
    catalog_conn.commit()
    with pytest.raises(CatalogueError, match=r"column product_classification\.image_sha256 is missing"):
        check_schema(catalog_conn)


# the flow's last steps in a process of their own: register the batch, commit its predictions to a (file)
# lake, write them back; KILL_AT says where it stops to be SIGKILLed
_WRITER = r"""
import json, os, sys, time
import pyarrow as pa
from zalando.catalogue.db import connect
from zalando.catalogue.writeback import PredictionRow, register_batch, write_back
from zalando.lake import Lake

batch, kill_at = os.environ["BATCH_ID"], os.environ["KILL_AT"]
rows = [PredictionRow.model_validate(r) for r in json.loads(os.environ["ROWS"])]
table = pa.Table.from_pylist([r.model_dump() for r in rows])
with connect(os.environ["CONNINFO"]) as conn:
    register_batch(conn, batch)
    print("REGISTERED", flush=True)
    if kill_at == "before_commit":
        time.sleep(300)
    Lake.local(os.environ["LAKE"]).commit_partition(
        f"catalogue/predictions/batch_id={batch}", {"predictions": table}, "r1"
    )
    print("COMMITTED", flush=True)
    if kill_at == "after_commit":
        time.sleep(300)

    def stream():
        for i, r in enumerate(rows):
            if i == len(rows) // 2:
                print("MID_UPSERT", flush=True)
                time.sleep(300)
            yield r

    write_back(conn, batch, stream())
print("WRITTEN", flush=True)
"""

MARKERS = {"before_commit": "REGISTERED", "after_commit": "COMMITTED", "mid_upsert": "MID_UPSERT"}


def _committed(lake: Lake) -> dict[str, datetime | None]:
    """The lake's committed catalogue batches and their commit times (what the flow passes to repair)."""
    parts = lake.list_partitions("catalogue/predictions")
    return {
        p.rsplit("batch_id=", 1)[1]: datetime.fromisoformat(lake.read_manifest(p)["created_at"])
        for p in parts
    }


def _read_predictions(lake: Lake) -> Callable[[str], list[PredictionRow]]:
    def read(batch_id: str) -> list[PredictionRow]:
        table = lake.read_partition(f"catalogue/predictions/batch_id={batch_id}")
        return [PredictionRow.model_validate(r) for r in table.to_pylist()]

    return read


def _commit(lake: Lake, batch_id: str, rows: list[PredictionRow]) -> None:
    table = pa.Table.from_pylist([r.model_dump() for r in rows])
    lake.commit_partition(f"catalogue/predictions/batch_id={batch_id}", {"predictions": table}, "r0")


def _kill_writer(kill_at: str, rows: list[PredictionRow], lake: Lake, settings: Settings) -> None:
    """Run the writer process until it prints the marker of ``kill_at``, then SIGKILL it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "BATCH_ID": rows[0].batch_id,
        "KILL_AT": kill_at,
        "LAKE": lake.root,
        "CONNINFO": conninfo_for(settings),
        "ROWS": json.dumps([r.model_dump(mode="json") for r in rows]),
    }
    proc = subprocess.Popen([sys.executable, "-c", _WRITER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line.strip())
            if line.strip() == MARKERS[kill_at]:
                break
        assert MARKERS[kill_at] in seen, seen
        if kill_at == "mid_upsert":  # the writer is inside its transaction, streaming rows into the stage
            with connect(conninfo_for(settings), autocommit=True) as watcher:
                busy = watcher.execute(
                    "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL AND query LIKE 'COPY%'"
                ).fetchall()
            assert len(busy) == 1 and "catalogue_writeback_stage" in busy[0][0], busy
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("kill_at", ["before_commit", "after_commit", "mid_upsert"])
def test_a_kill_between_the_lake_commit_and_the_upsert_is_repaired_by_the_next_run(
    kill_at: str, catalog_conn: psycopg.Connection, fresh_db: Settings, tmp_path: Path
) -> None:
    conn = catalog_conn
    conn.execute("INSERT INTO product (id, title) SELECT g, 't' FROM generate_series(1, 40) AS g")
    conn.commit()
    lake = Lake.local(tmp_path / "lake")
    read = _read_predictions(lake)
    _commit(lake, "b0", [_pred(p, "b0", T0) for p in range(1, 41)])  # an earlier batch, written back
    register_batch(conn, "b0")
    write_back(conn, "b0", read("b0"))
    # another catalogue's batch in the same lake: committed, never registered here, never written here
    _commit(
        lake, "elsewhere", [_pred(p, "elsewhere", T0 + timedelta(days=9), "One piece") for p in range(1, 41)]
    )
    rows = [_pred(p, "b1", T0 + timedelta(days=1), "Footwear", 0.7) for p in range(1, 31)]
    _kill_writer(kill_at, rows, lake, fresh_db)

    # the catalogue has none of b1; it is registered and pending
    assert {r[4] for r in _table(conn)} == {"b0"}
    assert pending_batches(conn) == ["b1"]
    assert ("b1" in _committed(lake)) == (kill_at != "before_commit")
    results = repair(conn, _committed(lake), read)  # the next run repairs before anything else
    if kill_at == "before_commit":  # nothing in the lake to repair from: still pending; the re-run does it
        assert results == [] and pending_batches(conn) == ["b1"] and {r[4] for r in _table(conn)} == {"b0"}
        register_batch(conn, "b1")
        _commit(lake, "b1", rows)
        results = [write_back(conn, "b1", rows, committed_at=_committed(lake)["b1"])]
    else:
        assert [(r.batch_id, r.repaired) for r in results] == [("b1", True)]
    assert results[0].written == 30 and pending_batches(conn) == []
    table = {r[0]: r for r in _table(conn)}
    assert {p for p, r in table.items() if r[4] == "b1"} == set(range(1, 31))
    assert {p for p, r in table.items() if r[4] == "b0"} == set(range(31, 41))  # "elsewhere" never written
    assert table[1][1:3] == ("Footwear", 0.7)
    committed_at = conn.execute("SELECT committed_at FROM catalogue_batches WHERE batch_id = 'b1'").fetchone()
    conn.rollback()
    assert _ledger(conn)["b1"] == (30, 30, 0, 0, 0) and committed_at == (_committed(lake)["b1"],)
    assert "elsewhere" not in _ledger(conn)
    assert repair(conn, _committed(lake), read) == []  # a second run finds nothing to do
    snapshot = _table(conn)
    rerun = write_back(conn, "b1", rows)  # the flow re-run: the same rows, nothing changes
    assert (rerun.written, rerun.unchanged) == (0, 30) and _table(conn) == snapshot
