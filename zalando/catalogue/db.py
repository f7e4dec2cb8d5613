"""Connections to the catalogue database (psycopg 3), with every failure turned into one clear line.

With ``ZALANDO_CATALOG_DSN`` set we use that server; without it the embedded one
(:mod:`zalando.catalogue.server`) on 127.0.0.1. Passwords never appear in a message: places are
described as ``user@host:port/dbname``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from zalando.catalogue.errors import CatalogueError
from zalando.catalogue.server import PostgresServer, embedded_postgres

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5


def conninfo_for(settings: Any, *, dbname: str | None = None) -> str:
    """The libpq connection string of these settings (the DSN, or the embedded server's address).

    A DSN without a password gets ``catalog_password``; one with a password keeps its own.
    """
    if settings.catalog_dsn is not None:
        raw = settings.catalog_dsn.get_secret_value().strip()
        params = _parse(raw)
        extra: dict[str, Any] = {}
        if "password" not in params:
            extra["password"] = settings.catalog_password.get_secret_value()
        if dbname is not None:
            extra["dbname"] = dbname
        return make_conninfo(raw, **extra)
    return make_conninfo(
        host="127.0.0.1",
        port=settings.catalog_port,
        user=settings.catalog_user,
        password=settings.catalog_password.get_secret_value(),
        dbname=dbname or settings.catalog_db,
    )


def _parse(conninfo: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        # psycopg's message quotes pieces of the string, which may hold the password
        raise CatalogueError(
            "ZALANDO_CATALOG_DSN is not a valid connection string: use postgresql://USER@HOST:PORT/DB "
            "or 'host=… port=… dbname=… user=…'"
        ) from None


def describe(conninfo: str) -> str:
    """``user@host:port/dbname`` of a connection string: never its password."""
    p = _parse(conninfo)
    return f"{p.get('user', '?')}@{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '?')}"


def _redact(text: str, conninfo: str) -> str:
    password = str(_parse(conninfo).get("password") or "")
    return text.replace(password, "***") if password else text


def explain_connect_error(exc: psycopg.Error, conninfo: str) -> str:
    """One line saying what went wrong connecting, and what to do about it."""
    where = f"catalogue {describe(conninfo)}"
    text = _redact(str(exc), conninfo)
    params = _parse(conninfo)
    if "password authentication failed" in text or "no password supplied" in text:
        return (
            f"{where}: password authentication failed for user {params.get('user', '?')!r} "
            "(check ZALANDO_CATALOG_PASSWORD or the DSN)"
        )
    missing_db = re.search(r'database "([^"]+)" does not exist', text)
    if missing_db:
        return (
            f"{where}: database {missing_db.group(1)!r} does not exist "
            "(`zalando catalog init` creates it on the embedded server; ask the DBA on another)"
        )
    missing_role = re.search(r'role "([^"]+)" does not exist', text)
    if missing_role:
        return (
            f"{where}: user {missing_role.group(1)!r} does not exist (check ZALANDO_CATALOG_USER or the DSN)"
        )
    if "Connection refused" in text or "could not connect" in text or "No such file" in text:
        return f"{where}: server not reachable (connection refused); is it running? (`zalando catalog init`)"
    if "timeout expired" in text:
        return f"{where}: server not reachable (no answer within {CONNECT_TIMEOUT_S}s)"
    if "could not translate host name" in text:
        return f"{where}: unknown host {params.get('host')!r}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), exc.__class__.__name__)
    return f"{where}: {first}"


def connect(conninfo: str, *, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection, or raise CatalogueError with one line naming the place and the problem."""
    try:
        return psycopg.connect(
            conninfo,
            connect_timeout=CONNECT_TIMEOUT_S,
            autocommit=autocommit,
            application_name="zalando-catalogue",
        )
    except psycopg.Error as e:
        raise CatalogueError(explain_connect_error(e, conninfo)) from None


def ensure_database(server: PostgresServer) -> bool:
    """Create the embedded server's database when it is missing. Returns True when it was created."""
    admin = make_conninfo(
        host="127.0.0.1", port=server.port, user=server.user, password=server.password, dbname="postgres"
    )
    with connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (server.database,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(server.database)))
    log.info("catalogue: created database %s on %s", server.database, server.address)
    return True


@contextlib.contextmanager
def catalogue_connection(settings: Any, *, create_database: bool = False) -> Iterator[psycopg.Connection]:
    """A connection to the catalogue of these settings, with the embedded server running when no DSN
    is set (a server already running is reused and left running; one started here is stopped after).

    ``create_database`` creates the embedded server's database when it is missing (``catalog init``).
    """
    with embedded_postgres(settings) as server:
        if server is not None and create_database:
            ensure_database(server)
        with connect(conninfo_for(settings)) as conn:
            yield conn
