"""The product query: every product with its title, primary image and description, from one snapshot.

The study's query had four bugs; this one
1. joins ``product_description`` on the description's ``product_id`` (not on the product's own id);
2. joins ``image`` on the link's ``image_id`` (not on the product id);
3. filters the description on the country code, a parameter (default ``us``);
4. keeps products without an image: the ``image_index = 0`` condition sits inside the primary-image
   subquery, joined with a LEFT JOIN, never in a WHERE over the joined rows.

A product without exactly one usable primary image gets a reason instead of a URL:
``no_primary_image`` (no link with index 0), ``several_primary_images`` (two or more), or
``image_row_missing`` (the link's image row is absent). Our foreign key forbids the last one, but it
still happens: a retailer's database whose key is absent or ``NOT VALID``, or rows loaded with
triggers off (``pg_restore --disable-triggers``, ``session_replication_role = replica``); the LEFT JOIN
on ``image`` reports it instead of dropping the product.

The rows come from one REPEATABLE READ, READ ONLY transaction (every statement in it sees the same
snapshot, so a count and the rows agree while the catalogue changes), through a server-side cursor
(rows stream in chunks; 50,000 products never sit in memory at once).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Literal

import psycopg
from psycopg.rows import class_row
from pydantic import BaseModel, ConfigDict

from zalando.catalogue.errors import CatalogueError

log = logging.getLogger(__name__)

ImageProblem = Literal["no_primary_image", "several_primary_images", "image_row_missing"]
IMAGE_PROBLEMS: tuple[str, ...] = ("no_primary_image", "several_primary_images", "image_row_missing")
DescriptionSource = Literal["translated", "original"]

# The one query. %(country)s is the only input and is bound, never formatted into the text.
PRODUCT_QUERY = """
WITH primary_image AS (
    SELECT pi.product_id,
           count(*)         AS n_primary,
           min(pi.image_id) AS image_id
    FROM product_images AS pi
    WHERE pi.image_index = 0
    GROUP BY pi.product_id
)
SELECT p.id  AS product_id,
       p.title,
       CASE WHEN pr.n_primary = 1 THEN pr.image_id END AS image_id,
       i.url AS image_url,
       CASE
           WHEN pr.product_id IS NULL THEN 'no_primary_image'
           WHEN pr.n_primary > 1      THEN 'several_primary_images'
           WHEN i.id IS NULL          THEN 'image_row_missing'
       END AS image_problem,
       COALESCE(NULLIF(d.translated_text, ''), NULLIF(d.original_text, '')) AS description,
       CASE
           WHEN NULLIF(d.translated_text, '') IS NOT NULL THEN 'translated'
           WHEN NULLIF(d.original_text, '') IS NOT NULL   THEN 'original'
       END AS description_source
FROM product AS p
LEFT JOIN primary_image AS pr
       ON pr.product_id = p.id
LEFT JOIN image AS i
       ON i.id = pr.image_id AND pr.n_primary = 1
LEFT JOIN product_description AS d
       ON d.product_id = p.id AND d.country_code = %(country)s
ORDER BY p.id
LIMIT %(limit)s
"""

COUNT_QUERY = "SELECT count(*) FROM product"

_COUNTRY = re.compile(r"^[a-z]{2}$")


class ProductRow(BaseModel):
    """One product as the query returns it."""

    model_config = ConfigDict(frozen=True)

    product_id: int
    title: str | None
    image_id: int | None
    image_url: str | None
    image_problem: ImageProblem | None
    description: str | None
    description_source: DescriptionSource | None


def normalize_country(code: str) -> str:
    """'US' -> 'us'. Anything but two letters is refused (it could never match a description)."""
    norm = (code or "").strip().lower()
    if not _COUNTRY.match(norm):
        raise CatalogueError(f"country code {code!r}: use two letters (ISO 3166), such as us, de or fr")
    return norm


class CatalogueSnapshot:
    """Statements inside one REPEATABLE READ, READ ONLY transaction: they all see the same catalogue."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def count_products(self) -> int:
        row = self.conn.execute(COUNT_QUERY).fetchone()
        return int(row[0]) if row else 0

    def rows(
        self, country: str = "us", *, limit: int | None = None, chunk: int = 2000
    ) -> Iterator[ProductRow]:
        """Every product (or the first ``limit`` by id), streamed ``chunk`` rows at a time."""
        params = {"country": normalize_country(country), "limit": limit}
        with self.conn.cursor(name="zalando_catalogue_products", row_factory=class_row(ProductRow)) as cur:
            cur.itersize = chunk
            cur.execute(PRODUCT_QUERY, params)
            yield from cur


@contextlib.contextmanager
def catalogue_snapshot(conn: psycopg.Connection) -> Iterator[CatalogueSnapshot]:
    """Open the snapshot transaction (the connection must not be inside another transaction)."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise CatalogueError("catalogue snapshot: the connection is already inside a transaction")
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield CatalogueSnapshot(conn)
    except psycopg.Error as e:
        raise CatalogueError(f"catalogue query failed: {_first_line(e)}") from None


def iter_products(
    conn: psycopg.Connection, country: str = "us", *, limit: int | None = None, chunk: int = 2000
) -> Iterator[ProductRow]:
    """The query's rows from a fresh snapshot (see the module docstring)."""
    with catalogue_snapshot(conn) as snap:
        yield from snap.rows(country, limit=limit, chunk=chunk)


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), e.__class__.__name__)
