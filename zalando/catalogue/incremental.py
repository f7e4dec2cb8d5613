"""Which catalogue products need scoring, and the reconciliation ``products = scored + quarantined + skipped``.

A product is scored again only when its primary image changed (URL, image id or content digest) or the
champion changed since its last score (``product_classification``); ``full`` scores them all. The
digest is known only once the image is fetched, so a run goes in this order:

1. **query** the catalogue and :func:`read_previous` in the same snapshot (:func:`catalogue_snapshot`);
2. **decide by URL and champion** (:func:`select_for_scoring`, pure): every product becomes a
   :class:`Candidate` (with why) or, with ``verify_content=False`` only, is :class:`Skipped` at once
   (``unchanged_url``). A product with a catalogue defect is always a candidate: its fetch reports the
   defect, so it is quarantined on every run and never dropped;
3. **fetch** the candidates (:mod:`zalando.catalogue.fetch`);
4. **drop the unchanged** (:func:`drop_unchanged`, pure): a ``check_content`` candidate whose fetched
   sha256 equals its previous one (same image, same champion) is :class:`Skipped` (``unchanged``);
   every other fetched image is scored, or quarantined when it has a problem;
5. after scoring, :func:`reconcile` checks that every product of the query is exactly one of scored,
   quarantined or skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from zalando.catalogue.errors import CatalogueError
from zalando.catalogue.fetch import FetchedImage
from zalando.catalogue.query import CatalogueSnapshot, ProductRow

# why a product is (re)scored
ScoreReason = Literal["full", "new", "champion_changed", "image_changed", "check_content", "catalogue_defect"]
# why it is not: same URL, champion and content digest; or (verify_content=False) same URL and champion
SkipReason = Literal["unchanged", "unchanged_url"]

PREVIOUS_QUERY = """
SELECT pc.product_id, pc.model_version, pc.image_id, pc.image_url, pc.image_sha256, pc.batch_id, pc.scored_at
FROM product_classification AS pc
"""


@dataclass(frozen=True, slots=True)
class PreviousScore:
    """A product's last write-back (one row of ``product_classification``)."""

    product_id: int
    model_version: str
    image_id: int | None
    image_url: str | None
    image_sha256: str | None
    batch_id: str
    scored_at: datetime


@dataclass(frozen=True, slots=True)
class Candidate:
    """A product to fetch, why, and its last score (None when it has none)."""

    row: ProductRow
    reason: ScoreReason
    previous: PreviousScore | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A product whose last score stands: nothing is written for it in this batch."""

    product_id: int
    reason: SkipReason
    model_version: str
    image_sha256: str | None


def read_previous(snapshot: CatalogueSnapshot) -> dict[int, PreviousScore]:
    """Every product's last score, read inside the query's snapshot (the same REPEATABLE READ transaction)."""
    with snapshot.conn.cursor() as cur:
        cur.execute(PREVIOUS_QUERY)
        return {int(r[0]): PreviousScore(*r) for r in cur}


def select_for_scoring(
    rows: Iterable[ProductRow],
    previous: Mapping[int, PreviousScore],
    champion_version: str,
    full: bool = False,
    *,
    verify_content: bool = True,
) -> tuple[list[Candidate], list[Skipped]]:
    """Step 2: candidates to fetch, and products skipped without fetching (``verify_content=False`` only).

    With ``verify_content`` (the default) a product with the same image URL and champion is still a
    candidate (``check_content``): its digest decides after the fetch (:func:`drop_unchanged`).
    """
    if not champion_version:
        raise CatalogueError("incremental scoring needs the champion's model version")
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for row in rows:
        prev = previous.get(row.product_id)
        if row.image_problem is not None or not row.image_url:
            candidates.append(Candidate(row, "catalogue_defect", prev))
        elif full:
            candidates.append(Candidate(row, "full", prev))
        elif prev is None:
            candidates.append(Candidate(row, "new"))
        elif prev.model_version != champion_version:
            candidates.append(Candidate(row, "champion_changed", prev))
        elif (prev.image_url, prev.image_id) != (row.image_url, row.image_id):
            candidates.append(Candidate(row, "image_changed", prev))
        elif verify_content:
            candidates.append(Candidate(row, "check_content", prev))
        else:
            skipped.append(Skipped(row.product_id, "unchanged_url", prev.model_version, prev.image_sha256))
    return candidates, skipped


def drop_unchanged(
    candidates: Sequence[Candidate], fetched: Sequence[FetchedImage]
) -> tuple[list[FetchedImage], list[Skipped]]:
    """Step 4: the fetched images to score or quarantine, and the candidates whose content is unchanged.

    ``fetched`` holds one image per candidate (any order). A ``check_content`` candidate is skipped only
    when its image was fetched and its sha256 equals the previous one; a problem is never skipped.
    """
    by_id = {f.product_id: f for f in fetched}
    if len(by_id) != len(fetched) or by_id.keys() != {c.row.product_id for c in candidates}:
        raise CatalogueError(
            f"incremental scoring: {len(fetched)} fetched images for {len(candidates)} candidates "
            "(each candidate needs exactly one)"
        )
    to_score: list[FetchedImage] = []
    skipped: list[Skipped] = []
    for c in candidates:
        f, prev = by_id[c.row.product_id], c.previous
        if c.reason == "check_content" and prev is not None and f.ok and f.sha256 == prev.image_sha256:
            skipped.append(Skipped(c.row.product_id, "unchanged", prev.model_version, f.sha256))
        else:
            to_score.append(f)
    return to_score, skipped


class Reconciliation(BaseModel):
    """How a catalogue batch accounts for its products: products = scored + quarantined + skipped."""

    products: int
    scored: int
    quarantined: int
    skipped: int

    @property
    def balanced(self) -> bool:
        return self.products == self.scored + self.quarantined + self.skipped


def reconcile(
    products: Iterable[int], scored: Iterable[int], quarantined: Iterable[int], skipped: Iterable[int]
) -> Reconciliation:
    """Check that every product id is exactly one of scored, quarantined or skipped; raise naming the
    first ids that are missing, counted twice, or not a product of the query."""
    product_set = _unique(products, "products")
    parts = {"scored": list(scored), "quarantined": list(quarantined), "skipped": list(skipped)}
    seen: dict[int, str] = {}
    for name, ids in parts.items():
        for pid in ids:
            if pid in seen:
                raise CatalogueError(f"reconciliation: product {pid} is both {seen[pid]} and {name}")
            seen[pid] = name
    missing = sorted(product_set - seen.keys())
    extra = sorted(seen.keys() - product_set)
    if missing or extra:
        raise CatalogueError(
            f"reconciliation: {len(missing)} products neither scored, quarantined nor skipped "
            f"(first: {missing[:5]}), {len(extra)} outside the query (first: {extra[:5]})"
        )
    return Reconciliation(
        products=len(product_set),
        scored=len(parts["scored"]),
        quarantined=len(parts["quarantined"]),
        skipped=len(parts["skipped"]),
    )


def _unique(ids: Iterable[int], what: str) -> set[int]:
    out: set[int] = set()
    for pid in ids:
        if pid in out:
            raise CatalogueError(f"reconciliation: product {pid} appears twice among the {what}")
        out.add(pid)
    return out
