"""The pure parts of chaining a catalogue batch: the products file keeps what the incremental selection
needs after the fetch, and a scored product's prediction row gets its product and its review reason."""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np
import pyarrow as pa

from zalando.catalogue.fetch import FetchedImage
from zalando.catalogue.incremental import Candidate, PreviousScore
from zalando.catalogue.query import ProductRow
from zalando.catalogue.scoring import LOW_CONFIDENCE, _candidate, _products_table, annotate_products
from zalando.lake.tables import TABLES
from zalando.scoring.shard import prediction_table

T0 = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)


def _row(pid: int, description: str | None, title: str | None = "t") -> ProductRow:
    return ProductRow(
        product_id=pid,
        title=title,
        image_id=pid * 10,
        image_url=f"s3://lake/img/{pid}.png",
        image_problem=None,
        description=description,
        description_source="original" if description else None,
    )


def test_the_products_file_gives_back_the_candidates_it_was_made_of() -> None:
    prev = PreviousScore(3, "v1", 30, "s3://lake/img/3.png", "ab" * 32, "b1", T0)
    candidates = [
        Candidate(_row(1, "a red dress", title=None), "new"),
        Candidate(_row(3, None), "check_content", prev),
        Candidate(_row(4, "x").model_copy(update={"image_url": None, "image_id": None,
                  "image_problem": "no_primary_image"}), "catalogue_defect"),
    ]  # fmt: skip
    table = _products_table(candidates)
    assert table.column("image_id").to_pylist() == ["1", "3", "4"]  # the engine's record ids
    assert [_candidate(r) for r in table.to_pylist()] == candidates


def test_a_scored_product_gets_its_columns_and_text_disagrees_before_low_confidence() -> None:
    rows = [_row(1, "Elegant evening dress"), _row(2, "Leather sneakers"), _row(3, None)]
    products = _products_table([Candidate(r, "new") for r in rows]).to_pylist()
    fetched = [
        FetchedImage(r.product_id, r.image_id, r.image_url, b"x", f"{r.product_id:064d}", 1, None)
        for r in rows
    ]
    probs = np.zeros((2, 5), np.float32)
    probs[0, 2], probs[1, 3] = 0.9, 0.3  # product 1: One piece, sure; product 3: Footwear, unsure
    probs[1, 0] = 0.7 - 0.3
    ids = pa.array(["1", "3"])
    table = prediction_table(ids, probs, "v1", "b1", date(2026, 12, 1), T0, 0.6)
    assert table.column("product_id").null_count == 2  # a file batch's rows: null
    out = annotate_products(table, np.array([0, 2]), products=products, fetched=fetched)
    assert out.schema.equals(TABLES["predictions"].schema)
    got = out.select(
        ["product_id", "catalogue_image_id", "image_sha256", "title", "review_reason"]
    ).to_pylist()
    assert got == [
        {"product_id": 1, "catalogue_image_id": 10, "image_sha256": f"{1:064d}", "title": "t",
         "review_reason": None},
        {"product_id": 3, "catalogue_image_id": 30, "image_sha256": f"{3:064d}", "title": "t",
         "review_reason": LOW_CONFIDENCE},
    ]  # fmt: skip
    # product 2's sneakers, predicted One piece: the text disagrees, and it goes to review
    table2 = prediction_table(pa.array(["2"]), probs[:1], "v1", "b1", date(2026, 12, 1), T0, 0.6)
    out2 = annotate_products(table2, np.array([1]), products=products, fetched=fetched)
    assert out2.column("review_reason").to_pylist() == ["text_disagrees"]
    assert out2.column("needs_review").to_pylist() == [True]
