"""The pure parts of scoring a catalogue: which products to score (incremental), the reconciliation, the
text check's review reason and its count, and the write-back's typed rows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from zalando.catalogue.errors import CatalogueError
from zalando.catalogue.fetch import FetchedImage
from zalando.catalogue.incremental import (
    PreviousScore,
    drop_unchanged,
    reconcile,
    select_for_scoring,
)
from zalando.catalogue.query import ProductRow
from zalando.catalogue.text import TEXT_DISAGREES, review_reason, summarize_text_checks
from zalando.catalogue.writeback import PredictionRow

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _row(
    pid: int, url: str | None = None, image_id: int | None = None, problem: str | None = None
) -> ProductRow:
    return ProductRow(
        product_id=pid,
        title=None,
        image_id=image_id if image_id is not None else (pid if url else None),
        image_url=url,
        image_problem=problem,  # type: ignore[arg-type]
        description=None,
        description_source=None,
    )


def _prev(
    pid: int, url: str, sha: str | None, version: str = "v1", image_id: int | None = None
) -> PreviousScore:
    return PreviousScore(pid, version, image_id if image_id is not None else pid, url, sha, "b0", T0)


def _fetched(pid: int, sha: str | None, problem: str | None = None) -> FetchedImage:
    return FetchedImage(pid, pid, f"u{pid}", None if problem else b"x", sha, 1, problem)


ROWS = [
    _row(1, "s3://b/1.png"),  # new: no previous score
    _row(2, "s3://b/2.png"),  # same URL and champion: its digest decides
    _row(3, "s3://b/3-new.png"),  # URL changed
    _row(4, "s3://b/4.png", image_id=40),  # same URL, another image id
    _row(5, "s3://b/5.png"),  # scored by another champion
    _row(6, problem="no_primary_image"),  # a defect: always through the fetch, to its quarantine row
    _row(7, "s3://b/7.png"),  # same URL and champion, but no digest was kept
]
PREVIOUS = {
    2: _prev(2, "s3://b/2.png", "sha2"),
    3: _prev(3, "s3://b/3.png", "sha3"),
    4: _prev(4, "s3://b/4.png", "sha4", image_id=4),
    5: _prev(5, "s3://b/5.png", "sha5", version="v0"),
    6: _prev(6, "s3://b/6.png", "sha6"),
    7: _prev(7, "s3://b/7.png", None),
}


def test_select_for_scoring_decides_by_url_and_champion() -> None:
    candidates, skipped = select_for_scoring(ROWS, PREVIOUS, "v1")
    assert skipped == []
    assert {c.row.product_id: c.reason for c in candidates} == {
        1: "new",
        2: "check_content",
        3: "image_changed",
        4: "image_changed",
        5: "champion_changed",
        6: "catalogue_defect",
        7: "check_content",
    }
    assert [c.row.product_id for c in candidates] == [r.product_id for r in ROWS]  # query order kept
    full, none_skipped = select_for_scoring(ROWS, PREVIOUS, "v1", full=True)
    assert none_skipped == [] and {c.reason for c in full} == {"full", "catalogue_defect"}
    all_new, _ = select_for_scoring(ROWS, PREVIOUS, "v2")
    assert {c.row.product_id for c in all_new if c.reason == "champion_changed"} == {2, 3, 4, 5, 7}
    trusting, by_url = select_for_scoring(ROWS, PREVIOUS, "v1", verify_content=False)
    assert [(s.product_id, s.reason) for s in by_url] == [(2, "unchanged_url"), (7, "unchanged_url")]
    assert len(trusting) + len(by_url) == len(ROWS)
    with pytest.raises(CatalogueError, match="champion"):
        select_for_scoring(ROWS, PREVIOUS, "")


def test_drop_unchanged_skips_only_a_fetched_image_with_the_same_digest() -> None:
    candidates, _ = select_for_scoring(ROWS, PREVIOUS, "v1")
    fetched = [
        _fetched(1, "sha1"),
        _fetched(2, "sha2"),  # unchanged: skipped
        _fetched(3, "sha3"),  # same bytes under a new URL: scored (the URL decided)
        _fetched(4, "sha4"),
        _fetched(5, "sha5"),
        _fetched(6, None, "no_primary_image"),
        _fetched(7, "sha7"),  # no previous digest: scored
    ]
    to_score, skipped = drop_unchanged(candidates, list(reversed(fetched)))
    assert [(s.product_id, s.reason, s.model_version, s.image_sha256) for s in skipped] == [
        (2, "unchanged", "v1", "sha2")
    ]
    assert [f.product_id for f in to_score] == [1, 3, 4, 5, 6, 7]
    changed, none = drop_unchanged(candidates, [*fetched[:1], _fetched(2, "sha2-new"), *fetched[2:]])
    assert none == [] and 2 in {f.product_id for f in changed}
    failed, none = drop_unchanged(
        candidates, [*fetched[:1], _fetched(2, None, "fetch_timeout"), *fetched[2:]]
    )
    assert none == [] and 2 in {f.product_id for f in failed}  # a problem is quarantined, never skipped
    with pytest.raises(CatalogueError, match="exactly one"):
        drop_unchanged(candidates, fetched[:-1])
    with pytest.raises(CatalogueError, match="exactly one"):
        drop_unchanged(candidates, [*fetched, fetched[0]])


def test_reconcile_holds_or_names_the_ids() -> None:
    rec = reconcile(range(1, 8), [1, 3, 4, 5, 7], [6], [2])
    assert rec.balanced and (rec.products, rec.scored, rec.quarantined, rec.skipped) == (7, 5, 1, 1)
    with pytest.raises(
        CatalogueError, match=r"1 products neither scored, quarantined nor skipped \(first: \[7\]\)"
    ):
        reconcile(range(1, 8), [1, 3, 4, 5], [6], [2])
    with pytest.raises(CatalogueError, match="product 2 is both scored and skipped"):
        reconcile(range(1, 8), [1, 2, 3, 4, 5, 7], [6], [2])
    with pytest.raises(CatalogueError, match=r"1 outside the query \(first: \[99\]\)"):
        reconcile(range(1, 8), [1, 3, 4, 5, 7, 99], [6], [2])
    with pytest.raises(CatalogueError, match="appears twice among the products"):
        reconcile([1, 1], [1], [], [])


def test_review_reason_and_how_often_it_fires() -> None:
    assert review_reason("Elegant dress in black", "Footwear") == TEXT_DISAGREES
    assert review_reason("Elegant dress in black", "One piece") is None
    assert review_reason("A bag and a dress", "One piece") is None  # the predicted group is named too
    assert review_reason(None, "Bags") is None and review_reason("made of cotton", "Bags") is None
    with pytest.raises(ValueError, match="unknown group"):
        review_reason("dress", "Hats")
    summary = summarize_text_checks(
        [
            ("Elegant dress in black", "Footwear"),
            ("Bequeme Sneaker aus Leder", "Footwear"),
            ("Sac en cuir, coloris noir", "Upper part"),
            ("made of cotton", "Bags"),
            (None, "Bags"),
        ]
    )
    assert (summary.products, summary.with_description, summary.naming_an_article, summary.disagreeing) == (
        5,
        4,
        3,
        2,
    )
    assert summary.disagreeing_by_predicted_group == {"Footwear": 1, "Upper part": 1}
    assert summary.share_of_products == pytest.approx(0.4) and summary.share_of_described == pytest.approx(
        2 / 3
    )
    assert "text_disagrees: 2 of 5 products (40.0%" in summary.line()
    assert summarize_text_checks([]).share_of_products == 0.0


def test_prediction_rows_are_typed() -> None:
    ok = PredictionRow(
        product_id=1, group="Bags", confidence=0.9, model_version="v1", batch_id="b", scored_at=T0
    )
    assert ok.image_sha256 is None
    for bad in (
        {"group": "Hats"},
        {"confidence": 1.5},
        {"scored_at": datetime(2026, 1, 1)},  # naive: which time zone?
        {"batch_id": ""},
    ):
        with pytest.raises(ValidationError):
            PredictionRow(**{**ok.model_dump(), **bad})
