"""Reading scored batches back: which model versions scored a batch, per-group counts, a few rows."""

from __future__ import annotations

from datetime import date
from typing import Any

from zalando.errors import NotCommittedError
from zalando.lake import Lake
from zalando.scoring import layout
from zalando.scoring.batch import ScoringInputError


def batch_date_of(batch_id: str) -> date:
    """A batch id starts with its date: '2026-03-01-fashion-mnist-test' -> 2026-03-01."""
    try:
        return date.fromisoformat(batch_id[:10])
    except ValueError:
        raise ScoringInputError(f"batch id {batch_id!r}: expected '<YYYY-MM-DD>-<source>'") from None


def scored_versions(lake: Lake, batch_id: str) -> list[str]:
    """Model versions with a committed prediction partition for this batch (sorted)."""
    d = batch_date_of(batch_id)
    suffix = f"/batch_id={batch_id}"
    versions = []
    for key in lake.list_partitions(layout.batch_prefix(d)):
        if key.endswith(suffix):
            versions.append(key.split("/model_version=", 1)[1].split("/", 1)[0])
    return sorted(versions)


def predictions_preview(
    lake: Lake, batch_id: str, model_version: str | None = None, rows: int = 5
) -> dict[str, Any]:
    """What `zalando predictions BATCH_ID` shows: counts per group, reconciliation, and a few rows.

    ``model_version`` default: the newest committed version (by name) for this batch.
    """
    versions = scored_versions(lake, batch_id)
    if not versions:
        raise NotCommittedError(f"batch {batch_id}: no committed predictions in {lake.uri('predictions')}")
    version = model_version or versions[-1]
    if version not in versions:
        raise NotCommittedError(
            f"batch {batch_id}: not scored with model {version} (scored with: {versions})"
        )
    key = layout.predictions_key(batch_date_of(batch_id), version, batch_id)
    extra = lake.read_manifest(key)["extra"]
    table = lake.read_partition(key)
    return {
        "batch_id": batch_id,
        "model_version": version,
        "other_versions": [v for v in versions if v != version],
        "predictions_uri": lake.uri(key),
        "counts": extra.get("counts", {}),
        "group_counts": extra.get("group_counts", {}),
        "reasons": extra.get("reasons", {}),
        "rows": table.slice(0, rows).to_pylist(),
    }
