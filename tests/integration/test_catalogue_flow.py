# ruff: noqa: F401, F811 - fixtures imported from catalogue_support and used as arguments
"""The `catalogue` flow end to end against a real PostgreSQL and a real SeaweedFS (no mocks), under the
session's Prefect test harness, with a tiny real champion bundle: a demo catalogue scored and
reconciled row by row against the database, an incremental re-run that scores only what changed, and
`zalando score --catalog` through the CLI runner, on good and on bad input."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from PIL import Image
from pydantic import SecretStr
from typer.testing import CliRunner

from tests.conftest import MINI_DIR
from tests.integration.catalogue_support import fresh_db, pg_settings  # fixtures
from tests.scoring_support import make_champion
from zalando.catalogue.db import connect, conninfo_for
from zalando.catalogue.demo import load_demo
from zalando.catalogue.lexicon import text_disagrees
from zalando.catalogue.schema import init_schema
from zalando.data.idx import read_idx_images, read_idx_labels
from zalando.lake import Lake
from zalando.lake.catalog import open_catalog
from zalando.lake.commit import scan
from zalando.settings import Settings, load_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

QUERY_REASON = {
    "no_images": "no_primary_image",
    "several_primary_images": "several_primary_images",
    "missing_object": "missing_object",
    "not_an_image": "not_an_image",
}
ORPHAN_PRODUCT = 990_001  # a link to an image row that is not there (loaded with triggers off)


def _png(value: int) -> bytes:
    a = np.zeros((28, 28), np.uint8)
    a[4:24, 8:20] = value
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def catalogue_env(
    prefect_harness: None,
    flow_env: dict[str, str],
    fresh_db: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Lake, psycopg.Connection, str]]:
    """A fresh lake prefix and work folder, a tiny champion, and a demo catalogue of 60 products (plus
    one whose primary image row is missing) in a fresh database named by ZALANDO_CATALOG_DSN."""
    env = {
        "ZALANDO_LAKE_URI": f"s3://zalando-flows/{uuid.uuid4().hex[:10]}",
        "ZALANDO_WORK_DIR": str(tmp_path_factory.mktemp("catalogue-work")),
        "ZALANDO_CATALOG_DSN": conninfo_for(fresh_db),
        "ZALANDO_CATALOG_FETCH_CONCURRENCY": "4",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        lake = Lake.from_settings(load_settings())
        lake.ensure_ready()
        version = make_champion(lake)
        with connect(conninfo_for(fresh_db)) as conn:
            init_schema(conn)
            images = read_idx_images(str(MINI_DIR / "t10k-images-idx3-ubyte.gz"))
            labels = read_idx_labels(str(MINI_DIR / "t10k-labels-idx1-ubyte.gz"))
            load_demo(conn, lake, images, labels, n_products=60, seed=3)
            with conn.transaction():
                conn.execute("SET LOCAL session_replication_role = replica")
                conn.execute("INSERT INTO product (id, title) VALUES (%s, 'orphan link')", (ORPHAN_PRODUCT,))
                conn.execute(
                    "INSERT INTO product_images (product_id, image_id, image_index) VALUES (%s, 987654, 0)",
                    (ORPHAN_PRODUCT,),
                )
            yield lake, conn, version
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _lake_rows(lake: Lake, table: str, batch_id: str) -> list[dict[str, Any]]:
    cat = open_catalog(load_settings(), lake=lake)
    return scan(cat, table, {"batch_id": batch_id}).to_pylist()


def _db(conn: psycopg.Connection, sql: str) -> list[tuple]:
    rows = conn.execute(sql).fetchall()
    conn.rollback()
    return rows


def _check_against_the_database(
    conn: psycopg.Connection, lake: Lake, summary: dict[str, Any], scored_before: set[int]
) -> tuple[dict[int, dict], dict[int, dict]]:
    """Row by row: every product of the database is in this batch's predictions, or in its quarantine
    with the reason its defect calls for, or skipped (scored earlier and unchanged); the batch's
    product_classification rows are its predictions."""
    b = summary["batch_id"]
    preds = {int(r["product_id"]): r for r in _lake_rows(lake, "predictions", b)}
    quar = {int(r["image_id"]): r for r in _lake_rows(lake, "quarantine", b)}
    products = dict(_db(conn, "SELECT id, title FROM product"))
    defects = dict(_db(conn, "SELECT product_id, defect FROM demo_truth"))
    assert not preds.keys() & quar.keys()
    skipped = products.keys() - preds.keys() - quar.keys()
    assert skipped <= scored_before  # a skipped product was scored by an earlier batch
    assert (len(products), len(preds), len(quar), len(skipped)) == (
        summary["products"], summary["scored"], summary["quarantined"], summary["skipped_products"],
    )  # fmt: skip
    rec = summary["reconciliation"]
    assert rec["products"] == rec["scored"] + rec["quarantined"] + rec["skipped"] == len(products)
    for pid in products:
        defect = defects.get(pid)
        if pid == ORPHAN_PRODUCT:
            assert quar[pid]["reason"] == "image_row_missing"
        elif defect in QUERY_REASON:
            assert quar[pid]["reason"] == QUERY_REASON[defect], (pid, defect)
            assert quar[pid]["image"] is None  # evidence, never a non-image payload
        else:
            assert pid in preds or pid in skipped, (pid, defect, quar.get(pid))
    for pid, p in preds.items():
        assert p["title"] == products[pid]  # NULL titles stay NULL
        assert p["image_url"].startswith("s3://") and len(p["image_sha256"]) == 64
        expected = "text_disagrees" if text_disagrees(p["description"], p["pred_group_name"]) else None
        assert (p["review_reason"] == "text_disagrees") == (expected is not None), p
        if expected:
            assert p["needs_review"]
    pc = {
        r[0]: r[1:]
        for r in _db(
            conn,
            'SELECT product_id, "group", confidence, model_version, image_id, image_url, image_sha256 '
            f"FROM product_classification WHERE batch_id = '{b}'",
        )
    }
    assert pc.keys() == preds.keys()
    for pid, (group, conf, version, image_id, url, sha) in pc.items():
        p = preds[pid]
        assert (group, version, image_id, url, sha) == (
            p["pred_group_name"], p["model_version"], p["catalogue_image_id"], p["image_url"], p["image_sha256"],
        )  # fmt: skip
        assert abs(conf - p["confidence"]) < 1e-6
    ledger = _db(conn, f"SELECT written_back_at IS NOT NULL FROM catalogue_batches WHERE batch_id = '{b}'")
    assert ledger == [(True,)]
    return preds, quar


def test_a_demo_catalogue_is_scored_reconciled_and_rescored_incrementally(
    catalogue_env: tuple[Lake, psycopg.Connection, str],
) -> None:
    from flows.catalogue import catalogue_scoring

    lake, conn, version = catalogue_env
    first = catalogue_scoring(country="us", shard_size=25, workers=2, batch_date="2026-12-01")
    assert first["model_version"] == version and first["batch_id"] == "2026-12-01-catalogue-us"
    assert first["skipped_products"] == 0 and first["products"] == 61 and first["scored"] > 40
    preds, quar = _check_against_the_database(conn, lake, first, set())
    assert first["write_back"]["written"] == first["scored"]

    # change two products: one image's bytes in the lake, one product's primary URL; nothing else
    a, b = sorted(preds)[:2]
    lake.write_bytes(preds[a]["image_url"].removeprefix(lake.uri() + "/"), _png(201))
    shared = {pid for pid, p in preds.items() if p["image_url"] == preds[a]["image_url"]}
    conn.execute(
        "UPDATE image SET url = %s WHERE id = %s", (preds[a]["image_url"], preds[b]["catalogue_image_id"])
    )
    conn.commit()
    second = catalogue_scoring(country="us", shard_size=25, batch_date="2026-12-01")
    assert second["batch_id"] == "2026-12-01-catalogue-us-2"  # a run of its own; the first one stands
    preds2, quar2 = _check_against_the_database(conn, lake, second, set(preds))
    assert set(preds2) == shared | {b}  # only the changed products are scored again
    assert quar2.keys() == quar.keys()  # the defects are reported on every run, never dropped
    assert second["skipped_products"] == len(preds) - len(shared | {b})
    assert len(_lake_rows(lake, "predictions", first["batch_id"])) == len(preds)  # untouched


def test_zalando_score_catalog_runs_the_flow_and_says_bad_input_in_one_line(
    catalogue_env: tuple[Lake, psycopg.Connection, str], fresh_db: Settings
) -> None:
    from zalando.cli import app

    lake, conn, _ = catalogue_env
    runner = CliRunner()
    good = runner.invoke(app, ["score", "--catalog", "--date", "2026-12-02"])
    assert good.exit_code == 0, good.output
    assert "reconciled: 61 products = " in good.stdout and "2026-12-02-catalogue-us" in good.stdout
    assert "quarantined by reason:" in good.stdout and "image_row_missing 1" in good.stdout

    before = _db(conn, "SELECT count(*) FROM product_classification")
    wrong_pw = fresh_db.model_copy(update={"catalog_password": SecretStr("not-the-password")})
    dsn = conninfo_for(wrong_pw)
    bad = runner.invoke(app, ["score", "--catalog"], env={"ZALANDO_CATALOG_DSN": dsn})
    assert bad.exit_code == 2
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "password authentication failed" in lines[0], bad.stderr
    assert "not-the-password" not in bad.output
    conn.execute("DELETE FROM demo_truth")
    conn.execute("DELETE FROM product_classification")
    conn.execute("DELETE FROM product_images")
    conn.execute("DELETE FROM product_description")
    conn.execute("DELETE FROM product")
    conn.commit()
    empty = runner.invoke(app, ["score", "--catalog"])
    assert empty.exit_code == 2 and "0 products: an empty batch" in empty.stderr, empty.output
    assert before and _db(conn, "SELECT count(*) FROM catalogue_batches WHERE written_back_at IS NULL") == [
        (0,)
    ]
    from zalando.s3server import free_port_block

    down = fresh_db.model_copy(update={"catalog_port": free_port_block(size=1)})
    no_db = conninfo_for(fresh_db, dbname="no_such_db")
    conn.execute("ALTER TABLE product_images RENAME COLUMN image_index TO position")
    conn.commit()
    for env, said in (
        ({"ZALANDO_CATALOG_DSN": conninfo_for(down)}, "server not reachable"),
        ({"ZALANDO_CATALOG_DSN": no_db}, "database 'no_such_db' does not exist"),
        ({}, "column product_images.image_index is missing"),
    ):
        out = runner.invoke(app, ["score", "--catalog"], env=env)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.exit_code == 2 and len(lines) == 1 and said in lines[0], out.output
    pending = _db(conn, "SELECT count(*) FROM catalogue_batches WHERE written_back_at IS NULL")
    assert pending == [(0,)]  # nothing registered by a run that failed
