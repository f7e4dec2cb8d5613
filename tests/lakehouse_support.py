"""Helpers for the Iceberg lakehouse tests: prediction rows, a DuckDB with the Iceberg extension."""

from __future__ import annotations

import glob
import importlib.util
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from zalando.lake.tables import PROB_COLUMNS, PRODUCT_COLUMNS, TABLES, UTC_US

DAY = date(2026, 11, 30)


def prediction_rows(
    n: int,
    batch_id: str,
    *,
    model_version: str = "v1",
    batch_date: date = DAY,
    confidence: float = 0.5,
    first_id: int = 0,
) -> pa.Table:
    """n prediction rows of one batch (ids img-<first_id>.. ), in the table spec's Arrow schema."""
    ids = [f"img-{i:06d}" for i in range(first_id, first_id + n)]
    cols: dict[str, Any] = {
        "image_id": ids,
        "pred_group": pa.array([i % 5 for i in range(n)], pa.int8()),
        "pred_group_name": ["Upper part"] * n,
    }
    for c in PROB_COLUMNS:
        cols[c] = pa.array([0.2] * n, pa.float32())
    cols.update(
        confidence=pa.array([confidence] * n, pa.float32()),
        needs_review=[confidence < 0.6] * n,
        model_version=[model_version] * n,
        batch_id=[batch_id] * n,
        batch_date=pa.array([batch_date] * n, pa.date32()),
        scored_at=pa.array([datetime(2026, 12, 1, tzinfo=UTC)] * n, UTC_US),
        shadow=[False] * n,
    )
    cols.update({f.name: pa.nulls(n, f.type) for f in PRODUCT_COLUMNS})  # catalogue batches only
    return pa.table(cols, schema=TABLES["predictions"].schema)


def duckdb_with_iceberg() -> Any:
    """A DuckDB connection with the iceberg (and httpfs) extensions loaded from their PyPI packages
    (dev dependencies: the extension repository on the web is not reachable from our machines)."""
    import duckdb

    con = duckdb.connect()
    for ext in ("avro", "iceberg", "httpfs"):
        spec = importlib.util.find_spec(f"duckdb_extension_{ext}")
        assert spec and spec.submodule_search_locations, f"duckdb-extension-{ext} is not installed"
        root = Path(next(iter(spec.submodule_search_locations)))
        found = glob.glob(str(root / "extensions" / "*" / f"{ext}.duckdb_extension"))
        assert found, f"duckdb-extension-{ext} ships no {ext}.duckdb_extension"
        con.load_extension(found[0])
    return con
