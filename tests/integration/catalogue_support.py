"""Fixtures for the catalogue tests: ONE real PostgreSQL for the session (started the way the CLI
starts it, ~1-2 s), a fresh database per test (~0.1 s), and connections with our schema applied.

The server's state lives under /tmp/zpg-*, not in pytest's tmp folders: as root the server runs as
the `postgres` user, who cannot enter pytest's 0700 folders.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from zalando.catalogue.db import connect, conninfo_for, ensure_database
from zalando.catalogue.schema import init_schema
from zalando.catalogue.server import PostgresServer, server_for
from zalando.s3server import free_port_block
from zalando.settings import Settings

TEST_PG_USER = "zalando_test"
TEST_PG_PASSWORD = "catalog-test-pw-7c1e"


def postgres_base_dir() -> Path:
    """A fresh folder the postgres user can enter (as root) and nobody else can list."""
    base = Path(tempfile.mkdtemp(prefix="zpg-", dir="/tmp"))
    base.chmod(0o711)
    return base


def catalogue_settings(base: Path, port: int, **kw: object) -> Settings:
    return Settings(
        work_dir=base / "work",
        catalog_port=port,
        catalog_user=TEST_PG_USER,
        catalog_password=TEST_PG_PASSWORD,
        lake_uri=f"file://{base / 'lake'}",
        **kw,
    )


@pytest.fixture(scope="session")
def pg_settings() -> Iterator[Settings]:
    """Settings of the session's embedded catalogue server (running for the whole session)."""
    base = postgres_base_dir()
    settings = catalogue_settings(base, free_port_block(size=1), catalog_db="catalog_test")
    server = server_for(settings)
    server.start(timeout=120)
    ensure_database(server)
    yield settings
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(pg_settings: Settings) -> PostgresServer:
    return server_for(pg_settings)


@pytest.fixture
def fresh_db(pg_settings: Settings) -> Iterator[Settings]:
    """Settings pointing at a new, empty database on the session's server (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = conninfo_for(pg_settings, dbname="postgres")
    with connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_settings.model_copy(update={"catalog_db": name})
    with connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def catalog_conn(fresh_db: Settings) -> Iterator[psycopg.Connection]:
    """A connection to a fresh database holding our (empty) schema."""
    with connect(conninfo_for(fresh_db)) as conn:
        init_schema(conn)
        yield conn
