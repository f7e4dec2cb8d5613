"""The write-back: a committed batch's predictions upserted into ``product_classification``.

:func:`write_back` runs after the lake commit, in ONE transaction per batch: the rows go into a
temporary stage (COPY), then ``INSERT … ON CONFLICT (product_id) DO UPDATE`` into
``product_classification``, and the batch's row in the ledger ``catalogue_batches``. Either all of it
is there afterwards, or none of it.

* Idempotent: a re-run writes the same rows (a row equal to what is there is left untouched and
  counted ``unchanged``).
* Order-safe: a product's row is replaced only by a score at least as recent (``scored_at``), so
  repairing an older batch never overwrites a newer one (``kept_newer``).
* A product deleted from the catalogue since it was scored is left out (``products_gone``), not an error.

The gap between the lake commit and the upsert is closed with the ledger:

1. :func:`register_batch` BEFORE the lake commit records that this catalogue expects the batch;
2. the lake commit;
3. :func:`write_back` (sets ``written_back_at`` in the upsert's transaction).

A crash, kill or lost connection after 1 leaves the batch registered and not written back;
:func:`repair`, at the start of the next run, writes back every such batch the lake did commit, from
the lake's committed predictions (one it did not commit stays pending: a re-run commits it). Only
batches registered in this database are ever repaired, so a lake that also holds another catalogue's
(or an earlier demo's) batches never writes them into this one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

import psycopg
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from zalando.catalogue.errors import CatalogueError
from zalando.catalogue.schema import REQUIRED_COLUMNS
from zalando.labels import GROUP_NAMES

log = logging.getLogger(__name__)

COLUMNS = REQUIRED_COLUMNS["product_classification"]  # the schema's own list, in its order
_COLS = ", ".join(f'"{c}"' for c in COLUMNS)
_EXCLUDED = ", ".join(f'EXCLUDED."{c}"' for c in COLUMNS[1:])
_CURRENT = ", ".join(f'pc."{c}"' for c in COLUMNS[1:])

STAGE_DDL = """
CREATE TEMPORARY TABLE catalogue_writeback_stage (
    product_id    bigint           PRIMARY KEY,
    "group"       text             NOT NULL,
    confidence    double precision NOT NULL,
    model_version text             NOT NULL,
    batch_id      text             NOT NULL,
    scored_at     timestamptz      NOT NULL,
    image_id      bigint,
    image_url     text,
    image_sha256  text
) ON COMMIT DROP
"""

# how the staged rows stand before the upsert: all, of products still there, already newer there, equal
COUNT_SQL = f"""
SELECT count(*),
       count(p.id),
       count(*) FILTER (WHERE pc.scored_at > s.scored_at),
       count(*) FILTER (WHERE ({_CURRENT}) IS NOT DISTINCT FROM
                              (s."group", s.confidence, s.model_version, s.batch_id, s.scored_at,
                               s.image_id, s.image_url, s.image_sha256))
FROM catalogue_writeback_stage AS s
LEFT JOIN product AS p ON p.id = s.product_id
LEFT JOIN product_classification AS pc ON pc.product_id = p.id
"""

UPSERT_SQL = f"""
INSERT INTO product_classification AS pc ({_COLS})
SELECT {", ".join(f's."{c}"' for c in COLUMNS)}
FROM catalogue_writeback_stage AS s
JOIN product AS p ON p.id = s.product_id
ORDER BY s.product_id
ON CONFLICT (product_id) DO UPDATE
SET ({", ".join(f'"{c}"' for c in COLUMNS[1:])}) = ({_EXCLUDED})
WHERE pc.scored_at <= EXCLUDED.scored_at
  AND ({_CURRENT}) IS DISTINCT FROM ({_EXCLUDED})
"""

REGISTER_SQL = """
INSERT INTO catalogue_batches (batch_id, registered_at) VALUES (%s, now())
ON CONFLICT (batch_id) DO UPDATE SET written_back_at = NULL
"""

PENDING_SQL = """
SELECT batch_id FROM catalogue_batches WHERE written_back_at IS NULL ORDER BY registered_at, batch_id
"""

LEDGER_SQL = """
INSERT INTO catalogue_batches (batch_id, registered_at, committed_at, written_back_at, predictions, written,
                               unchanged, kept_newer, products_gone)
VALUES (%(batch_id)s, now(), %(committed_at)s, now(), %(predictions)s, %(written)s, %(unchanged)s,
        %(kept_newer)s, %(products_gone)s)
ON CONFLICT (batch_id) DO UPDATE
SET committed_at    = COALESCE(EXCLUDED.committed_at, catalogue_batches.committed_at),
    written_back_at = EXCLUDED.written_back_at,
    predictions     = EXCLUDED.predictions,
    written         = EXCLUDED.written,
    unchanged       = EXCLUDED.unchanged,
    kept_newer      = EXCLUDED.kept_newer,
    products_gone   = EXCLUDED.products_gone
"""

# a lost connection, a lock wait, a deadlock or a product deleted while we wrote: the next try may pass
_TRANSIENT = (
    psycopg.OperationalError,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.ForeignKeyViolation,
)
LOCK_TIMEOUT = "30s"  # waiting longer for another writer's row locks is a failed run, said plainly


class PredictionRow(BaseModel):
    """One committed prediction of a product, as the write-back needs it (read from the lake)."""

    model_config = ConfigDict(frozen=True)

    product_id: int
    group: str
    confidence: float = Field(ge=0, le=1)
    model_version: str = Field(min_length=1)
    batch_id: str = Field(min_length=1)
    scored_at: AwareDatetime
    image_id: int | None = None
    image_url: str | None = None
    image_sha256: str | None = None

    @field_validator("group")
    @classmethod
    def _known_group(cls, v: str) -> str:
        if v not in GROUP_NAMES:
            raise ValueError(f"unknown group {v!r}; expected one of {', '.join(GROUP_NAMES)}")
        return v


class WriteBackResult(BaseModel):
    """What one batch's write-back did: predictions = written + unchanged + kept_newer + products_gone."""

    batch_id: str
    predictions: int
    written: int
    unchanged: int
    kept_newer: int
    products_gone: int
    seconds: float
    repaired: bool = False


def write_back(
    conn: psycopg.Connection,
    batch_id: str,
    rows: Iterable[PredictionRow],
    *,
    committed_at: datetime | None = None,
    repaired: bool = False,
) -> WriteBackResult:
    """Upsert a committed batch's predictions and its ledger row, in one transaction (see the module).

    Every row must belong to ``batch_id`` and name each product once; otherwise nothing is written.
    Rows are streamed into the stage: a batch of 50,000 never sits in memory twice.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise CatalogueError(
            f"write-back of batch {batch_id}: the connection is already inside a transaction"
        )
    t0 = time.perf_counter()
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            cur.execute(STAGE_DDL)
            with cur.copy(f"COPY catalogue_writeback_stage ({_COLS}) FROM STDIN") as copy:
                for row in rows:
                    if row.batch_id != batch_id:
                        raise CatalogueError(
                            f"write-back of batch {batch_id}: product {row.product_id} belongs to batch "
                            f"{row.batch_id}; nothing written"
                        )
                    copy.write_row(tuple(getattr(row, c) for c in COLUMNS))
            cur.execute(COUNT_SQL)
            staged, present, newer, equal = cur.fetchone()  # type: ignore[misc]
            cur.execute(UPSERT_SQL)
            written = cur.rowcount
            counts = {
                "predictions": staged,
                "written": written,
                "unchanged": equal,
                "kept_newer": newer,
                "products_gone": staged - present,
            }
            cur.execute(LEDGER_SQL, {"batch_id": batch_id, "committed_at": committed_at, **counts})
    except psycopg.errors.UniqueViolation:
        raise CatalogueError(
            f"write-back of batch {batch_id}: a product appears twice in its predictions; nothing written"
        ) from None
    except psycopg.Error as e:
        raise CatalogueError(
            f"write-back of batch {batch_id} failed, nothing written: {_first_line(e)}",
            transient=isinstance(e, _TRANSIENT),
        ) from None
    result = WriteBackResult(batch_id=batch_id, seconds=time.perf_counter() - t0, repaired=repaired, **counts)
    log.info(
        "write-back of batch %s%s: %d predictions, %d written, %d unchanged, %d kept (newer there), "
        "%d products gone, %.2fs",
        batch_id,
        " (repair)" if repaired else "",
        result.predictions,
        result.written,
        result.unchanged,
        result.kept_newer,
        result.products_gone,
        result.seconds,
    )
    return result


def register_batch(conn: psycopg.Connection, batch_id: str) -> None:
    """Record, BEFORE the lake commit, that this batch is to be written back (its own transaction).

    Registering a batch again (a re-run) marks it pending again until its write-back."""
    try:
        with conn.transaction():
            conn.execute(REGISTER_SQL, (batch_id,))
    except psycopg.Error as e:
        raise CatalogueError(
            f"registering batch {batch_id} for its write-back failed: {_first_line(e)}",
            transient=isinstance(e, _TRANSIENT),
        ) from None


def pending_batches(conn: psycopg.Connection) -> list[str]:
    """Registered batches without a write-back, oldest registration first."""
    with conn.transaction():
        return [b for (b,) in conn.execute(PENDING_SQL)]


def repair(
    conn: psycopg.Connection,
    committed_batches: Mapping[str, datetime | None] | Iterable[str],
    read_predictions: Callable[[str], Iterable[PredictionRow]],
) -> list[WriteBackResult]:
    """Write back every registered batch the lake committed and the ledger has not written back,
    oldest registration first, each in its own transaction. Run it before a new batch's write-back;
    a second call finds nothing to do.

    ``committed_batches``: the lake's committed catalogue batch ids (a mapping gives their commit times
    too); ``read_predictions(batch_id)``: that batch's committed prediction rows (champion rows only).
    A pending batch the lake has not committed is left pending (the crash came before the commit).
    """
    times = committed_batches if isinstance(committed_batches, Mapping) else dict.fromkeys(committed_batches)
    results = []
    for batch_id in pending_batches(conn):
        if batch_id not in times:
            log.info("batch %s is registered but not committed in the lake: nothing to repair yet", batch_id)
            continue
        log.warning("batch %s was committed in the lake but never written back: repairing it", batch_id)
        rows = read_predictions(batch_id)
        results.append(write_back(conn, batch_id, rows, committed_at=times[batch_id], repaired=True))
    return results


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), e.__class__.__name__)
