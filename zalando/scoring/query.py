"""Reading scored batches back through the tables (committed rows only), now or as they stood then.

Every read is :func:`zalando.lake.commit.scan`: which model versions scored a batch, its counts
per group, its reconciliation and a few rows (:func:`predictions_preview`, what ``zalando
predictions BATCH_ID [--as-of …]`` shows), and the most recent batches (:func:`recent_batches`).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from zalando.errors import LakeError, NotCommittedError
from zalando.labels import GROUP_KEYS, NUM_GROUPS
from zalando.lake.catalog import LakeCatalog
from zalando.lake.commit import resolve_as_of, scan
from zalando.lake.tables import (
    BATCHES,
    PREDICTIONS,
    QUARANTINE,
    load_table,
    prediction_partition,
    quarantine_partition,
)
from zalando.scoring.batch import ScoringInputError

AsOf = datetime | int | str


def batch_date_of(batch_id: str) -> date:
    """A batch id starts with its date: '2026-03-01-fashion-mnist-test' -> 2026-03-01."""
    try:
        return date.fromisoformat(batch_id[:10])
    except ValueError:
        raise ScoringInputError(f"batch id {batch_id!r}: expected '<YYYY-MM-DD>-<source>'") from None


def _batch_filter(batch_id: str) -> dict[str, Any]:
    return {"batch_date": batch_date_of(batch_id), "batch_id": batch_id}


def _moment(cat: LakeCatalog, as_of: AsOf | None) -> tuple[int | None, int | None]:
    """(predictions snapshot id, its commit time in epoch ms) for as_of; (None, None) for now.

    A bad value, or a moment before the table's first commit, is one LakeError line.
    """
    if as_of is None:
        return None, None
    what = f"predictions as of {as_of!r}"
    table = load_table(cat, PREDICTIONS)
    if table is None:
        raise LakeError(f"{what}: {cat.identifier(PREDICTIONS)} does not exist yet, so it has no history")
    sid = resolve_as_of(table, as_of, what=what)
    assert sid is not None
    return sid, table.snapshot_by_id(sid).timestamp_ms


def _scan_at(
    cat: LakeCatalog, name: str, flt: dict[str, Any], ms: int | None, columns: list[str]
) -> pa.Table:
    """A secondary table (quarantine, batches) as it stood at ms (empty before its first commit).

    Finalize commits a batch's quarantine rows before its predictions, so the moment of a
    predictions snapshot sees the quarantine that went with it."""
    if ms is not None:
        table = load_table(cat, name)
        if table is None or table.snapshot_as_of_timestamp(ms) is None:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
    return scan(cat, name, flt, columns=columns, as_of=ms)


def scored_versions(cat: LakeCatalog, batch_id: str, *, as_of: AsOf | None = None) -> list[str]:
    """Model versions that have committed rows of this batch (predictions, quarantine, or, now, a
    row in ``batches``: an all-empty batch), sorted."""
    return _versions(cat, batch_id, *_moment(cat, as_of))


def _versions(cat: LakeCatalog, batch_id: str, sid: int | None, ms: int | None) -> list[str]:
    def of(t: pa.Table) -> set[str]:
        return set(t.column("model_version").to_pylist())

    found = of(scan(cat, PREDICTIONS, _batch_filter(batch_id), columns=["model_version"], snapshot_id=sid))
    found |= of(_scan_at(cat, QUARANTINE, {"batch_id": batch_id}, ms, ["model_version"]))
    if sid is None:
        found |= of(scan(cat, BATCHES, {"batch_id": batch_id}, columns=["model_version"]))
    return sorted(v for v in found if v)


def predictions_preview(
    cat: LakeCatalog,
    batch_id: str,
    model_version: str | None = None,
    rows: int = 5,
    *,
    as_of: AsOf | None = None,
) -> dict[str, Any]:
    """What `zalando predictions BATCH_ID` shows: counts per group, reconciliation, and a few rows,
    counted from the committed rows (now, or ``as_of`` a timestamp or a predictions snapshot id).

    ``model_version`` default: the newest committed version (by name) for this batch.
    """
    sid, ms = _moment(cat, as_of)
    versions = _versions(cat, batch_id, sid, ms)
    table = load_table(cat, PREDICTIONS)
    when = f" as of {as_of}" if as_of is not None else ""
    if not versions:
        raise NotCommittedError(
            f"batch {batch_id}: no committed predictions in {cat.identifier(PREDICTIONS)}{when}"
        )
    version = model_version or versions[-1]
    if version not in versions:
        raise NotCommittedError(
            f"batch {batch_id}: not scored with model {version}{when} (scored with: {versions})"
        )
    flt = prediction_partition(batch_date_of(batch_id), version, batch_id)
    counted = scan(cat, PREDICTIONS, flt, columns=["pred_group", "needs_review"], snapshot_id=sid)
    quarantine = _scan_at(cat, QUARANTINE, quarantine_partition(batch_id, version), ms, ["reason"])
    first = scan(cat, PREDICTIONS, flt, snapshot_id=sid, limit=rows) if rows else None
    groups = pc.value_counts(counted.column("pred_group")).to_pylist() if counted.num_rows else []
    by_group = {int(g["values"]): int(g["counts"]) for g in groups}
    reasons = pc.value_counts(quarantine.column("reason")).to_pylist() if quarantine.num_rows else []
    low = int(pc.sum(counted.column("needs_review")).as_py() or 0) if counted.num_rows else 0
    return {
        "batch_id": batch_id,
        "model_version": version,
        "other_versions": [v for v in versions if v != version],
        "predictions_table": cat.identifier(PREDICTIONS),
        "metadata_location": table.metadata_location if table is not None else None,
        "snapshot_id": sid,
        "as_of": datetime.fromtimestamp(ms / 1000, UTC).isoformat() if ms is not None else None,
        "counts": {
            "records": counted.num_rows + quarantine.num_rows,
            "scored": counted.num_rows,
            "quarantined": quarantine.num_rows,
            "low_confidence": low,
        },
        "group_counts": {GROUP_KEYS[g]: by_group.get(g, 0) for g in range(NUM_GROUPS)},
        "reasons": dict(sorted((r["values"], int(r["counts"])) for r in reasons)),
        "rows": first.slice(0, rows).to_pylist() if first is not None else [],
    }


def recent_batches(cat: LakeCatalog, limit: int = 10) -> list[dict[str, Any]]:
    """The most recently committed batches with their counts, newest first (for the web page)."""
    columns = [
        "batch_id", "batch_date", "model_version", "committed_at", "records", "scored", "quarantined",
        "low_confidence", "shards", "runtimes", "predictions_snapshot_id",
    ]  # fmt: skip
    table = scan(cat, BATCHES, columns=columns)
    if not table.num_rows:
        return []
    table = table.sort_by([("committed_at", "descending")])
    return table.slice(0, limit).to_pylist()
