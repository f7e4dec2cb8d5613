"""Our catalogue schema (``schema.sql``, shipped in the package): apply it, and check a database has it.

:func:`init_schema` is idempotent and safe to run twice at once (an advisory lock serialises it).
:func:`check_schema` names the first table or column the query, the incremental selection and the
write-back (with its ledger, ``catalogue_batches``) need that is missing.
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg

from zalando.catalogue.errors import CatalogueError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_INIT_LOCK = 0x7A616C_43415431  # pg_advisory_xact_lock key: "zal" "CAT1"

# what the query and the write-back read and write; extra tables and columns are fine
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "product": ("id", "title"),
    "image": ("id", "url"),
    "product_images": ("product_id", "image_id", "image_index"),
    "product_description": ("product_id", "country_code", "original_text", "translated_text"),
    "product_classification": (
        "product_id",
        "group",
        "confidence",
        "model_version",
        "batch_id",
        "scored_at",
        "image_id",
        "image_url",
        "image_sha256",
    ),
    "catalogue_batches": (
        "batch_id",
        "registered_at",
        "committed_at",
        "written_back_at",
        "predictions",
        "written",
        "unchanged",
        "kept_newer",
        "products_gone",
    ),
}


def schema_sql() -> str:
    """The DDL, read from the package (``zalando/catalogue/schema.sql``)."""
    return resources.files("zalando.catalogue").joinpath("schema.sql").read_text(encoding="utf-8")


def init_schema(conn: psycopg.Connection) -> None:
    """Create whatever of our schema is missing, in one transaction, then check the result."""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INIT_LOCK,))
            conn.execute(schema_sql())
    except psycopg.Error as e:
        raise CatalogueError(f"catalogue schema: applying schema.sql failed: {_first_line(e)}") from None
    check_schema(conn)
    log.info("catalogue schema version %d is in place", SCHEMA_VERSION)


def existing_columns(conn: psycopg.Connection) -> dict[str, set[str]]:
    """Table -> column names of the tables visible on the search path."""
    rows = conn.execute(
        """
        SELECT c.table_name, c.column_name
        FROM information_schema.columns AS c
        WHERE c.table_schema = ANY (current_schemas(false))
        """
    ).fetchall()
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(table, set()).add(column)
    return out


def check_schema(conn: psycopg.Connection) -> None:
    """Raise CatalogueError naming the first missing table or column (one line, with the fix)."""
    was_idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    try:
        have = existing_columns(conn)
    except psycopg.Error as e:
        raise CatalogueError(f"catalogue schema: cannot read it: {_first_line(e)}") from None
    finally:
        if was_idle and not conn.autocommit:
            conn.rollback()  # leave no transaction of ours open behind a read of the catalog
    for table, columns in REQUIRED_COLUMNS.items():
        if table not in have:
            raise CatalogueError(
                f"catalogue schema: table {table!r} is missing (`zalando catalog init` creates it)"
            )
        for column in columns:
            if column not in have[table]:
                raise CatalogueError(
                    f"catalogue schema: column {table}.{column} is missing "
                    "(the table exists without it: add it, or point ZALANDO_CATALOG_DSN elsewhere)"
                )


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), e.__class__.__name__)
