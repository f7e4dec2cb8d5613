# ruff: noqa: F401, F811 - fixtures imported from catalogue_support and used as arguments
"""The catalogue against a real PostgreSQL started by the test session (no mocks): the embedded server,
the schema, the product query's cases (the study's four bugs among them), the snapshot, the demo
catalogue, and `zalando catalog` on bad input."""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image
from pydantic import SecretStr

from tests.conftest import MINI_DIR
from tests.integration.catalogue_support import (  # the fixtures are used as arguments
    TEST_PG_PASSWORD,
    TEST_PG_USER,
    catalog_conn,
    catalogue_settings,
    fresh_db,
    pg_server,
    pg_settings,
    postgres_base_dir,
)
from zalando.catalogue.db import connect, conninfo_for
from zalando.catalogue.demo import demo_products, load_demo
from zalando.catalogue.errors import CatalogueError
from zalando.catalogue.lexicon import text_disagrees
from zalando.catalogue.query import PRODUCT_QUERY, ProductRow, catalogue_snapshot, iter_products
from zalando.catalogue.schema import check_schema, init_schema
from zalando.catalogue.server import PostgresServer, embedded_postgres, port_taken, server_for
from zalando.data.idx import read_idx_images, read_idx_labels
from zalando.lake import Lake
from zalando.s3server import free_port_block, pid_alive
from zalando.settings import Settings

pytestmark = pytest.mark.integration


def _processes_of(data_dir: Path) -> list[int]:
    """PIDs whose command line names this data folder (a postmaster of ours)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(data_dir).encode() in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
            except OSError:
                pass
    return out


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on port (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


# ------------------------------------------------------------------------------ the server
def test_server_runs_unprivileged_on_loopback_with_scram(
    pg_server: PostgresServer, pg_settings: Settings
) -> None:
    pid = pg_server.server_pid()
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert uid == expected and (os.geteuid() != 0 or uid != 0)
    st = pg_server.data_dir.stat()
    assert st.st_uid == expected and st.st_mode & 0o777 == 0o700
    assert _listen_addresses(pg_settings.catalog_port) == {"0100007F"}  # 127.0.0.1 only
    with connect(conninfo_for(pg_settings)) as conn:
        show = {
            k: conn.execute(f"SHOW {k}").fetchone()[0]
            for k in ("listen_addresses", "port", "unix_socket_directories")
        }  # type: ignore[index]
        assert show == {
            "listen_addresses": "127.0.0.1",
            "port": str(pg_settings.catalog_port),
            "unix_socket_directories": str(pg_server.socket_dir),
        }
        methods = {m for (m,) in conn.execute("SELECT auth_method FROM pg_hba_file_rules").fetchall()}
        assert methods == {"scram-sha-256"}
        stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = current_user").fetchone()
        assert stored and stored[0].startswith("SCRAM-SHA-256$")
    wrong = pg_settings.model_copy(update={"catalog_password": SecretStr("not-the-password-99")})
    with pytest.raises(CatalogueError, match="password authentication failed for user 'zalando_test'") as e:
        connect(conninfo_for(wrong))
    assert "not-the-password-99" not in str(e.value)


def test_embedded_server_is_started_once_reused_replaces_a_stale_pid_file_and_stops_cleanly() -> None:
    base = postgres_base_dir()
    settings = catalogue_settings(base, free_port_block(size=1))
    server = server_for(settings)
    try:
        results: list[bool] = []
        threads = [threading.Thread(target=lambda: results.append(server.start())) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False, True]  # two commands at once: one starts it, one reuses it
        pid = server.server_pid()
        with embedded_postgres(settings) as again:  # a command reuses it and leaves it running
            assert again is not None and again.server_pid() == pid
        assert pid is not None and pid_alive(pid) and server.status() == "running"
        assert server.stop() is True
        assert not pid_alive(pid) and server.status() == "stopped"
        assert _processes_of(server.data_dir) == [] and not port_taken(settings.catalog_port)
        dead = next(p for p in range(4_000_000, 4_100_000) if not pid_alive(p))
        server.pid_file.write_text(json.dumps({"pid": dead, "port": settings.catalog_port}))
        assert server.status() == "stale"
        with embedded_postgres(settings) as started:  # replaces the stale PID file, restarts the cluster
            assert started is not None and started.status() == "running"
            other = PostgresServer(
                state_dir=base / "other", port=settings.catalog_port, user="x", password="y"
            )
            assert other.status() == "foreign"
            with pytest.raises(CatalogueError, match="already used by another program"):
                other.start()
        # the command that started it stopped it: nothing of ours is left
        assert server.status() == "stopped" and _processes_of(server.data_dir) == []
        with embedded_postgres(settings.model_copy(update={"catalog_dsn": SecretStr("host=db")})) as none:
            assert none is None  # a DSN: no embedded server
    finally:
        server.stop()
        assert _processes_of(server.data_dir) == []
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to the postgres user")
def test_a_work_folder_the_postgres_user_cannot_enter_is_one_clear_line() -> None:
    # a folder of root's, 0700, with a short path: pytest's own (…/popen-gw1/test_a_work_…) can be
    # too long for the server's socket, which is checked first
    with tempfile.TemporaryDirectory(prefix="zc-") as folder:
        server = PostgresServer(
            state_dir=Path(folder) / "closed" / "postgres",
            port=free_port_block(size=1),
            user="u",
            password="p",
        )
        with pytest.raises(CatalogueError, match="`postgres` user cannot reach"):
            server.start()
        assert not (server.data_dir / "PG_VERSION").exists()


# ------------------------------------------------------------------------------ the schema
def test_init_schema_is_idempotent_even_twice_at_once_with_keys_throughout(fresh_db: Settings) -> None:
    errors: list[BaseException] = []

    def init() -> None:
        try:
            with connect(conninfo_for(fresh_db)) as conn:
                init_schema(conn)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=init) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with connect(conninfo_for(fresh_db)) as conn:
        init_schema(conn)
        assert conn.execute("SELECT version FROM catalogue_schema_version").fetchall() == [(1,)]
        pks = {
            t
            for (t,) in conn.execute("SELECT conrelid::regclass::text FROM pg_constraint WHERE contype = 'p'")
        }
        assert pks >= {"product", "image", "product_images", "product_description", "product_classification"}
        fks = set(
            conn.execute(
                "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint WHERE contype = 'f'"
            )
        )
        assert fks == {
            ("product_images", "product"),
            ("product_images", "image"),
            ("product_description", "product"),
            ("product_classification", "product"),
        }


def test_check_schema_names_the_missing_column_or_table(catalog_conn: psycopg.Connection) -> None:
    check_schema(catalog_conn)
    catalog_conn.execute("ALTER TABLE product_description DROP COLUMN translated_text")
    catalog_conn.commit()
    with pytest.raises(CatalogueError, match=r"column product_description\.translated_text is missing"):
        check_schema(catalog_conn)
    catalog_conn.execute("DROP TABLE product_images")
    catalog_conn.commit()
    with pytest.raises(CatalogueError, match="table 'product_images' is missing"):
        check_schema(catalog_conn)


# ------------------------------------------------------------------------------ the query's cases
def _insert(conn: psycopg.Connection, table: str, columns: str, rows: list[tuple]) -> None:
    marks = ", ".join(["%s"] * len(rows[0]))
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)


def _small_catalogue(conn: psycopg.Connection) -> None:
    """Ten products, each one a case of the query (see the expected rows below)."""
    _insert(conn, "product", "id, title", [(i, f"title {i}") for i in range(1, 11)])
    conn.execute("UPDATE product SET title = NULL WHERE id = 8")
    _insert(conn, "image", "id, url", [(i, f"s3://b/img/{i}.png") for i in (1, 2, 11, 12, 13, 14, 15, 16)])
    _insert(
        conn,
        "product_images",
        "product_id, image_id, image_index",
        [
            (1, 11, 1), (1, 12, 0),  # primary is not the lowest image id
            (2, 1, 0),  # product 2 shows image 1; image 2 belongs to product 3 (bug 2 joins image 2)
            (3, 2, 0),
            (5, 13, 1),  # only a secondary image
            (6, 14, 0), (6, 15, 0),  # two primaries
            (8, 16, 0),
        ],
    )  # fmt: skip
    _insert(
        conn,
        "product_description",
        "product_id, country_code, original_text, translated_text",
        [
            (1, "us", "dress text", None), (1, "de", "Kleid Text", None),  # bugs 1 and 3
            (2, "us", "bag text", None),
            (3, "de", "Schuh Text", "shoe text (de translation)"),  # no us description
            (8, "us", "Original", "Translated"),
            (9, "us", "Only original", ""),
            (10, "us", None, None),
        ],
    )  # fmt: skip
    with conn.transaction():  # a link to an absent image: possible only with the key's triggers off
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("INSERT INTO product_images VALUES (7, 99, 0)")
    conn.commit()


def _row(
    pid: int,
    image_id: int | None,
    url: str | None,
    problem: str | None,
    desc: str | None,
    src: str | None,
    title: str | None = "",
) -> ProductRow:
    return ProductRow(
        product_id=pid,
        title=f"title {pid}" if title == "" else title,
        image_id=image_id,
        image_url=url,
        image_problem=problem,  # type: ignore[arg-type]
        description=desc,
        description_source=src,  # type: ignore[arg-type]
    )


EXPECTED_US = [
    _row(1, 12, "s3://b/img/12.png", None, "dress text", "original"),
    _row(2, 1, "s3://b/img/1.png", None, "bag text", "original"),
    _row(3, 2, "s3://b/img/2.png", None, None, None),
    _row(4, None, None, "no_primary_image", None, None),
    _row(5, None, None, "no_primary_image", None, None),
    _row(6, None, None, "several_primary_images", None, None),
    _row(7, 99, None, "image_row_missing", None, None),
    _row(8, 16, "s3://b/img/16.png", None, "Translated", "translated", title=None),
    _row(9, None, None, "no_primary_image", "Only original", "original"),
    _row(10, None, None, "no_primary_image", None, None),
]


def test_the_query_gets_every_case_right(catalog_conn: psycopg.Connection) -> None:
    """Each product exactly once, in id order:
    bug 1: product 1's description is its own (joined on the description's product id), not product 2's;
    bug 2: product 2 shows image 1 (joined on the link's image id), although an image 2 exists;
    bug 3: product 1 has a us and a de description and comes back once, with the us text;
    bug 4: products 4, 5, 9, 10 have no primary image and are still there (no_primary_image);
    and several_primary_images (6), image_row_missing (7), translated else original (8, 9, 10)."""
    _small_catalogue(catalog_conn)
    assert list(iter_products(catalog_conn)) == EXPECTED_US
    assert list(iter_products(catalog_conn, "US", limit=3)) == EXPECTED_US[:3]
    de = {r.product_id: (r.description, r.description_source) for r in iter_products(catalog_conn, "de")}
    assert de[1] == ("Kleid Text", "original") and de[3] == ("shoe text (de translation)", "translated")
    assert de[2] == (None, None)


def test_the_query_reads_one_read_only_snapshot_through_a_server_side_cursor(
    catalog_conn: psycopg.Connection, fresh_db: Settings
) -> None:
    _small_catalogue(catalog_conn)
    with connect(conninfo_for(fresh_db), autocommit=True) as other:
        with catalogue_snapshot(catalog_conn) as snap:
            assert catalog_conn.execute("SHOW transaction_isolation").fetchone() == ("repeatable read",)
            total = snap.count_products()
            other.execute("INSERT INTO product (id, title) VALUES (100, 'added after the count')")
            seen = []
            for row in snap.rows(chunk=2):
                if not seen:  # mid-stream: another writer changes the catalogue
                    other.execute("INSERT INTO product (id, title) VALUES (101, 'added mid-stream')")
                    other.execute("DELETE FROM product WHERE id = 10")
                    cursors = catalog_conn.execute("SELECT name FROM pg_cursors").fetchall()
                    assert ("zalando_catalogue_products",) in cursors  # rows stream from the server
                seen.append(row.product_id)
        assert total == len(seen) == 10 and seen == list(range(1, 11))
        assert [r.product_id for r in iter_products(catalog_conn)][-2:] == [
            100,
            101,
        ]  # a new snapshot sees them
        with pytest.raises(CatalogueError, match="read-only transaction"):
            with catalogue_snapshot(catalog_conn) as snap:
                snap.conn.execute("DELETE FROM product")
        assert other.execute("SELECT count(*) FROM product").fetchone() == (11,)


def test_sql_injection_is_only_ever_data(catalog_conn: psycopg.Connection) -> None:
    evil = "'); DROP TABLE product;--"
    _insert(catalog_conn, "product", "id, title", [(1, evil), (2, "plain")])
    _insert(catalog_conn, "product_description", "product_id, country_code, original_text", [(1, "us", evil)])
    catalog_conn.commit()
    rows = list(iter_products(catalog_conn))
    assert (rows[0].title, rows[0].description) == (evil, evil)
    with catalog_conn.cursor() as cur:  # the query's text, bound with the attack as the country
        cur.execute(PRODUCT_QUERY, {"country": "us' OR '1'='1", "limit": None})
        attacked = cur.fetchall()
    catalog_conn.rollback()
    assert len(attacked) == 2 and all(r[5] is None for r in attacked)  # no description matches it
    with pytest.raises(CatalogueError, match="two letters"):
        list(iter_products(catalog_conn, "us' OR '1'='1"))
    check_schema(catalog_conn)  # every table still there
    assert len(list(iter_products(catalog_conn))) == 2


# ------------------------------------------------------------------------------ the demo catalogue
def _mini_test_split() -> tuple[np.ndarray, np.ndarray]:
    return (
        read_idx_images(str(MINI_DIR / "t10k-images-idx3-ubyte.gz")),
        read_idx_labels(str(MINI_DIR / "t10k-labels-idx1-ubyte.gz")),
    )


def test_demo_loads_n_products_with_every_defect_and_images_in_the_lake(
    catalog_conn: psycopg.Connection, s3_lake: Lake
) -> None:
    images, labels = _mini_test_split()
    summary = load_demo(catalog_conn, s3_lake, images, labels, n_products=200, seed=5)
    assert summary.products == 200 and all(n >= 1 for n in summary.defects.values())
    rows = list(iter_products(catalog_conn))
    assert len(rows) == 200 and demo_products(catalog_conn) == 200
    marker = catalog_conn.execute("SELECT obj_description('demo_truth'::regclass)").fetchone()
    assert marker and "DEMO DATA" in marker[0]
    truth = {
        pid: (test_index, group, defect)
        for pid, test_index, group, defect in catalog_conn.execute(
            'SELECT product_id, test_index, "group", defect FROM demo_truth'
        )
    }
    catalog_conn.rollback()
    problems = Counter(r.image_problem for r in rows)
    assert problems["no_primary_image"] == summary.defects["no_images"]
    assert problems["several_primary_images"] == summary.defects["several_primary_images"]
    assert sum(r.title is None for r in rows) == summary.defects["null_title"]
    prefix = s3_lake.uri() + "/"
    for r in rows:
        if r.image_url is None:
            continue
        assert r.image_url.startswith(prefix) and prefix.startswith("s3://")
        key = r.image_url.removeprefix(prefix)
        defect = truth[r.product_id][2]
        if defect == "missing_object":
            assert not s3_lake.exists(key)
        elif defect == "not_an_image":
            assert s3_lake.read_bytes(key).startswith(b"<!doctype html")
        else:  # the primary shows the product's own test image
            pixels = np.asarray(Image.open(io.BytesIO(s3_lake.read_bytes(key))))
            assert np.array_equal(pixels, images[truth[r.product_id][0]])
    shape = catalog_conn.execute(
        """
        SELECT count(*) FILTER (WHERE n NOT BETWEEN 1 AND 4),
               count(*) FILTER (WHERE primary_id <> lowest_id)
        FROM (SELECT product_id, count(*) AS n, min(image_id) AS lowest_id,
                     min(image_id) FILTER (WHERE image_index = 0) AS primary_id
              FROM product_images GROUP BY product_id) AS per_product
        """
    ).fetchone()
    countries = catalog_conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE translated_text IS NOT NULL) FROM product_description"
    ).fetchone()
    per_product = {
        n for (n,) in catalog_conn.execute("SELECT count(*) FROM product_description GROUP BY product_id")
    }
    catalog_conn.rollback()
    assert shape is not None and shape[0] == 0 and shape[1] > 20  # 1-4 images; primary often not lowest id
    assert countries is not None and 0 < countries[1] < countries[0] and per_product == {2, 3}
    # the lexicon flags the deliberately wrong descriptions and nothing else
    flagged = {r.product_id for r in rows if text_disagrees(r.description, truth[r.product_id][1])}
    wrong_with_us = {
        r.product_id for r in rows if truth[r.product_id][2] == "wrong_description" and r.description
    }
    assert flagged == wrong_with_us

    again = load_demo(catalog_conn, s3_lake, images, labels, n_products=200, seed=5)  # replaces the demo
    assert again.objects_written == 0 and again.products == 200
    assert [r.product_id for r in iter_products(catalog_conn)] == [r.product_id for r in rows]
    catalog_conn.execute("INSERT INTO product (id, title) VALUES (999999, 'a real product')")
    catalog_conn.commit()
    with pytest.raises(CatalogueError, match="1 products and 0 images that are not demo data"):
        load_demo(catalog_conn, s3_lake, images, labels, n_products=20, seed=5)
    assert len(list(iter_products(catalog_conn))) == 201  # nothing changed


# ------------------------------------------------------------------------------ the CLI
def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("ZALANDO_")}
    return subprocess.run(
        [sys.executable, "-m", "zalando.cli", "catalog", *args],
        capture_output=True,
        text=True,
        env={**keep, **env, "COLUMNS": "200"},
        timeout=120,
    )


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "ZALANDO_WORK_DIR": str(settings.work_dir),
        "ZALANDO_CATALOG_PORT": str(settings.catalog_port),
        "ZALANDO_CATALOG_USER": settings.catalog_user,
        "ZALANDO_CATALOG_PASSWORD": settings.catalog_password.get_secret_value(),
        "ZALANDO_CATALOG_DB": settings.catalog_db,
        "ZALANDO_LAKE_URI": settings.lake_uri,
        **extra,
    }


def _one_error_line(proc: subprocess.CompletedProcess[str], expected: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong password", "password authentication failed for user 'zalando_test'"),
        ("wrong password in the DSN", "password authentication failed"),
        ("server down", "server not reachable"),
        ("database missing", "database 'no_such_db' does not exist"),
        ("not a DSN", "ZALANDO_CATALOG_DSN is not a valid connection string"),
        ("a column missing", "column product_description.translated_text is missing"),
        ("0 products", "has 0 products: an empty result"),
        ("injection as the country", "use two letters"),
    ],
)
def test_cli_bad_input_is_one_error_line(case: str, expected: str, fresh_db: Settings) -> None:
    base = f"{TEST_PG_USER}@127.0.0.1:{fresh_db.catalog_port}"
    dsn = {
        "wrong password": f"postgresql://{base}/{fresh_db.catalog_db}",
        "wrong password in the DSN": f"postgresql://{TEST_PG_USER}:dsn-secret-pw@127.0.0.1:{fresh_db.catalog_port}/x",
        "server down": f"postgresql://{TEST_PG_USER}@127.0.0.1:{free_port_block(size=1)}/x",
        "database missing": f"postgresql://{base}/no_such_db",
        "not a DSN": "host=127.0.0.1 port",
    }.get(case, f"postgresql://{base}/{fresh_db.catalog_db}")
    password = "wrong-pw-1234" if case == "wrong password" else TEST_PG_PASSWORD
    with connect(conninfo_for(fresh_db)) as conn:
        init_schema(conn)
        if case == "a column missing":
            conn.execute("ALTER TABLE product_description DROP COLUMN translated_text")
    args = ["query", "--country", "us' OR '1'='1"] if case == "injection as the country" else ["query"]
    proc = _cli(args, _env(fresh_db, ZALANDO_CATALOG_DSN=dsn, ZALANDO_CATALOG_PASSWORD=password))
    line = _one_error_line(proc, expected)
    assert "wrong-pw-1234" not in proc.stderr + proc.stdout and "dsn-secret-pw" not in line
    assert TEST_PG_PASSWORD not in proc.stderr + proc.stdout


def test_cli_init_demo_query_status_stop_on_the_embedded_server() -> None:
    base = postgres_base_dir()
    settings = catalogue_settings(base, free_port_block(size=1))
    env = _env(settings, ZALANDO_DATA_SOURCE=str(MINI_DIR))
    data_dir = server_for(settings).data_dir
    try:
        first = _cli(["init"], env)
        assert first.returncode == 0, first.stderr
        assert "catalogue server started" in first.stdout and "schema version 1 in place" in first.stdout
        second = _cli(["init"], env)
        assert "already running" in second.stdout and "0 products" in second.stdout
        demo = _cli(["demo", "--products", "30"], env)
        assert demo.returncode == 0, demo.stderr
        assert "DEMO DATA" in demo.stdout and "30 products" in demo.stdout
        assert "deliberate defects: no_images 1, several_primary_images 1, missing_object 1" in demo.stdout
        query = _cli(["query", "--limit", "5"], env)
        assert query.returncode == 0, query.stderr
        assert "first 5 of 30 products" in query.stdout and "DEMO DATA" in query.stdout
        assert "no_primary_image 1" in query.stdout and "several_primary_images 1" in query.stdout
        status = _cli(["status"], env)
        assert (
            ": running" in status.stdout and "30 products" in status.stdout and "DEMO DATA" in status.stdout
        )
        stop = _cli(["stop"], env)
        assert "catalogue server stopped" in stop.stdout
        assert _processes_of(data_dir) == []
        assert "stopped" in _cli(["status"], env).stdout
    finally:
        server_for(settings).stop()
        shutil.rmtree(base, ignore_errors=True)
