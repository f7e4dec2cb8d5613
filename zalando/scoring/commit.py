"""Commit a scored batch: reconcile every shard marker against the plan, then commit it to the tables.

:func:`finalize_batch` checks that every shard committed and that the counts reconcile (input
records = scored + quarantined; one row per image id; every file still has the sha256 its shard
wrote), then commits, each an atomic Iceberg commit that replaces the batch's earlier rows:

1. ``quarantine``: the batch's rejected inputs (its shards' quarantine data files);
2. ``predictions``: THE batch's commit, exactly the batch's shard data files. Until it lands no
   reader (ours, DuckDB, Spark, a pyarrow scan through the catalog) sees any of the batch's rows;
   its snapshot summary carries the batch's counts;
3. ``batches``: the batch's one row (counts, reasons, histograms, inputs, the embedding sample's
   objects), what :func:`is_batch_committed` and :func:`batch_summary` read. Written last: a crash
   before it leaves the batch "not committed", and the re-run commits the same shard files again.

:func:`reset_batch` removes the shard markers for a forced re-run; the committed rows stay visible
until the re-run's commit replaces them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from zalando.labels import GROUP_KEYS, NUM_GROUPS
from zalando.lake import Lake
from zalando.lake.catalog import LakeCatalog
from zalando.lake.commit import CommitResult, add_data_files, replace_partition, scan
from zalando.lake.keys import shard_marker_key, shard_markers_prefix
from zalando.lake.store import TORN_READ_PAUSES_S
from zalando.lake.tables import (
    BATCHES,
    PREDICTIONS,
    QUARANTINE,
    TABLES,
    batch_row,
    prediction_partition,
    quarantine_partition,
)
from zalando.scoring.batch import Batch, ShardRef
from zalando.scoring.shadow import ShadowResult
from zalando.scoring.shard import (
    CONFIDENCE_BINS,
    ScoringError,
    ScoringOptions,
    ShardResult,
    read_marker,
    read_shard_markers,
)

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "zalando.batch."  # snapshot summary properties of a batch's predictions commit


class BatchResult(BaseModel):
    """A committed batch (or one found already committed)."""

    batch_id: str
    batch_date: date
    model_version: str
    predictions_table: str  # the catalog identifier; the batch is the filter batch_id = ...
    records: int
    scored: int
    quarantined: int
    reasons: dict[str, int] = Field(default_factory=dict)
    group_counts: dict[str, int] = Field(default_factory=dict)
    low_confidence: int = 0
    unchanged: int = 0  # records whose last score stands (catalogue batches): records - scored - quarantined
    shards: int = 0
    shards_skipped: int = 0
    skipped: bool = False  # the batch was already committed and not forced
    snapshot_id: int | None = None  # the predictions snapshot that committed the batch
    data_files: int = 0  # predictions data files the batch added (one per shard with scored rows)
    seconds: float = 0.0
    images_per_s: float = 0.0
    timings: dict[str, float] = Field(default_factory=dict)  # plan / shards / finalize seconds
    shadow: ShadowResult | None = None  # the challenger's shadow run, when one was asked for


@dataclass(frozen=True)
class _Totals:
    """The shard markers added up."""

    records: int
    scored: int
    quarantined: int
    low_confidence: int
    unchanged: int
    reasons: Counter[str]
    group_counts: np.ndarray
    pixel_hist: np.ndarray
    confidence_hist: np.ndarray


# ------------------------------------------------------------------------------------ state


def batch_record(cat: LakeCatalog, batch_id: str, model_version: str) -> dict[str, Any] | None:
    """The batch's row in ``batches`` (JSON columns decoded), or None when it is not committed."""
    rows = scan(cat, BATCHES, batch_row(batch_id, model_version)).to_pylist()
    if not rows:
        return None
    row = max(rows, key=lambda r: r["committed_at"])  # one, unless someone appended by hand
    for col in ("reasons", "group_counts", "confidence_hist", "pixel_stats", "inputs", "embeddings"):
        row[col] = json.loads(row[col]) if row[col] else None
    return row


def is_batch_committed(cat: LakeCatalog, batch_id: str, model_version: str) -> bool:
    return batch_record(cat, batch_id, model_version) is not None


def reset_batch(lake: Lake, batch: Batch, model_version: str) -> None:
    """Forget the shard markers of a batch so that a forced re-run scores every shard again. The
    committed rows (if any) stay visible until the re-run's commit replaces them."""
    lake.delete_prefix(shard_markers_prefix(batch.batch_date, model_version, batch.batch_id))
    log.info("batch %s (model %s): shard markers removed for a forced re-run", batch.batch_id, model_version)


def batch_summary(cat: LakeCatalog, batch_id: str, model_version: str) -> BatchResult:
    """The BatchResult of a committed batch, from its row in ``batches``."""
    from zalando.errors import NotCommittedError

    row = batch_record(cat, batch_id, model_version)
    if row is None:
        raise NotCommittedError(
            f"batch {batch_id} (model {model_version}) is not committed in {cat.identifier(BATCHES)}"
        )
    return BatchResult(
        batch_id=batch_id,
        batch_date=row["batch_date"],
        model_version=model_version,
        predictions_table=cat.identifier(PREDICTIONS),
        records=row["records"],
        scored=row["scored"],
        quarantined=row["quarantined"],
        reasons=row["reasons"] or {},
        group_counts=row["group_counts"] or {},
        low_confidence=row["low_confidence"],
        unchanged=row["records"] - row["scored"] - row["quarantined"],
        shards=row["shards"],
        snapshot_id=row["predictions_snapshot_id"],
        data_files=row["data_files"],
        skipped=True,
    )


# ------------------------------------------------------------------------------------ finalize


def finalize_batch(
    cat: LakeCatalog,
    batch: Batch,
    shards: Sequence[ShardRef],
    model_version: str,
    *,
    run_id: str | None = None,
    options: ScoringOptions | None = None,
    results: Iterable[ShardResult] | None = None,
    verify_ids: bool = True,
) -> BatchResult:
    """Reconcile every shard marker, then commit quarantine, predictions (the batch's commit) and
    the batch's row, each replacing the batch's earlier rows.

    Reads the shard markers (and, with ``verify_ids``, every file they list: sha256, and the
    image_id column of the predictions files). ``results`` (the shard tasks' return values) are
    only used to count skipped shards. Raises :class:`ScoringError` when shards are missing or
    counts do not reconcile, and a LakeError when a commit fails (nothing of the batch visible
    then but what an earlier run committed).
    """
    t0 = time.perf_counter()
    opts = options or ScoringOptions()
    d, b, v = batch.batch_date, batch.batch_id, model_version
    run_id = run_id or f"score-{b}-{v}"
    lake = cat.lake
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-record") as pool:
        # a re-run: its embedding sample goes once this one commits (read beside the checks: ~17 ms)
        earlier_read = pool.submit(batch_record, cat, b, v)
        done, totals = _reconcile(lake, batch, shards, v)
        files = _files_by_table(done)
        if verify_ids:
            _verify_shard_files(lake, done, b)
        earlier = earlier_read.result()
    counts = {
        "records": totals.records,
        "scored": totals.scored,
        "quarantined": totals.quarantined,
        "low_confidence": totals.low_confidence,
    }
    add_data_files(
        cat, QUARANTINE, files[QUARANTINE], replace=quarantine_partition(b, v),
        properties={f"{SNAPSHOT_PREFIX}id": b, f"{SNAPSHOT_PREFIX}model-version": v},
    )  # fmt: skip
    committed = add_data_files(
        cat,
        PREDICTIONS,
        files[PREDICTIONS],
        replace=prediction_partition(d, v, b),
        properties=_snapshot_properties(batch, v, run_id, len(shards), counts),
    )  # the batch's commit point for every reader
    group_counts = {GROUP_KEYS[g]: int(totals.group_counts[g]) for g in range(NUM_GROUPS)}
    row = _batch_row(batch, v, run_id, shards, done, totals, group_counts, files, committed, opts)
    replace_partition(cat, BATCHES, row, batch_row(b, v))
    for key in sorted(set((earlier or {}).get("embeddings") or []) - set(files[None])):
        lake.delete(key)  # a plain object only the replaced row listed (tables keep theirs for time travel)
    result = BatchResult(
        batch_id=b,
        batch_date=d,
        model_version=v,
        predictions_table=cat.identifier(PREDICTIONS),
        records=totals.records,
        scored=totals.scored,
        quarantined=totals.quarantined,
        reasons=dict(sorted(totals.reasons.items())),
        group_counts=group_counts,
        low_confidence=totals.low_confidence,
        unchanged=totals.unchanged,
        shards=len(shards),
        shards_skipped=sum(1 for r in results or () if r.skipped),
        snapshot_id=committed.snapshot_id,
        data_files=len(files[PREDICTIONS]),
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "batch %s (model %s) committed: %d records = %d scored + %d quarantined %s (snapshot %s)",
        b, v, totals.records, totals.scored, totals.quarantined, dict(totals.reasons) or "",
        committed.snapshot_id,
    )  # fmt: skip
    return result


def _files_by_table(done: list[dict[str, Any]]) -> dict[str | None, list[str]]:
    """The shards' files, in shard order: predictions and quarantine data files, embedding samples."""
    out: dict[str | None, list[str]] = {PREDICTIONS: [], QUARANTINE: [], None: []}
    for m in done:
        for key, entry in m["files"].items():
            out[entry.get("table")].append(key)
    return out


def _snapshot_properties(
    batch: Batch, model_version: str, run_id: str, shards: int, counts: dict[str, int]
) -> dict[str, Any]:
    """What the predictions snapshot says about the batch it committed (readable by any engine)."""
    p = SNAPSHOT_PREFIX
    return {
        f"{p}id": batch.batch_id,
        f"{p}date": batch.batch_date.isoformat(),
        f"{p}model-version": model_version,
        f"{p}run-id": run_id,
        f"{p}shards": shards,
        **{f"{p}{k.replace('_', '-')}": n for k, n in counts.items()},
    }


def _reconcile(
    lake: Lake, batch: Batch, shards: Sequence[ShardRef], model_version: str
) -> tuple[list[dict[str, Any]], _Totals]:
    """Every shard's marker, added up; raises ScoringError unless all committed and the counts agree."""
    b, v = batch.batch_id, model_version
    if shards and {s.batch_id for s in shards} != {b}:
        raise ScoringError(f"batch {b}: the shards belong to another batch")
    markers = read_shard_markers(lake, shards, v)
    missing = [s.shard_id for s, m in zip(shards, markers, strict=True) if m is None]
    if missing:
        raise ScoringError(
            f"batch {b} (model {v}): {len(missing)} of {len(shards)} shards not committed "
            f"(ids {missing[:10]}{'...' if len(missing) > 10 else ''}); run the batch again to finish them"
        )
    done: list[dict[str, Any]] = [m for m in markers if m is not None]
    totals = _add_up(done)
    if (
        totals.records != batch.records
        or totals.scored + totals.quarantined + totals.unchanged != totals.records
    ):
        raise ScoringError(
            f"batch {b}: counts do not reconcile: {batch.records} input records, shards cover "
            f"{totals.records}, {totals.scored} scored + {totals.quarantined} quarantined"
            + (f" + {totals.unchanged} unchanged" if totals.unchanged else "")
        )
    return done, totals


def _add_up(done: list[dict[str, Any]]) -> _Totals:
    reasons: Counter[str] = Counter()
    for m in done:
        reasons.update(m["reasons"])

    def total(field: str, empty: np.ndarray, dtype: type) -> np.ndarray:
        return np.sum([m[field] for m in done], axis=0).astype(dtype) if done else empty

    return _Totals(
        records=sum(m["records"] for m in done),
        scored=sum(m["scored"] for m in done),
        quarantined=sum(m["quarantined"] for m in done),
        low_confidence=sum(m["low_confidence"] for m in done),
        unchanged=sum(m.get("unchanged", 0) for m in done),
        reasons=reasons,
        group_counts=total("group_counts", np.zeros(NUM_GROUPS, int), int),
        pixel_hist=total("pixel_hist", np.zeros(256, np.int64), np.int64),
        confidence_hist=total("confidence_hist", np.zeros(CONFIDENCE_BINS, int), int),
    )


def _batch_row(
    batch: Batch,
    model_version: str,
    run_id: str,
    shards: Sequence[ShardRef],
    done: list[dict[str, Any]],
    totals: _Totals,
    group_counts: dict[str, int],
    files: dict[str | None, list[str]],
    committed: CommitResult,
    opts: ScoringOptions,
) -> pa.Table:
    """The batch's row in ``batches``: what the batch manifest said (inputs, counts, histograms for
    drift, runtimes), with the predictions snapshot and the embedding sample's objects."""
    seconds = sum(m.get("timings", {}).get(k, 0.0) for m in done for k in ("read_decode", "predict", "write"))
    row = {
        "batch_id": batch.batch_id,
        "batch_date": batch.batch_date,
        "model_version": model_version,
        "committed_at": datetime.now(UTC),
        "run_id": run_id,
        "location": batch.location_uri,
        "records": totals.records,
        "scored": totals.scored,
        "quarantined": totals.quarantined,
        "low_confidence": totals.low_confidence,
        "duplicates": batch.duplicate_count,
        "shards": len(shards),
        "data_files": len(files[PREDICTIONS]),
        "runtimes": ",".join(sorted({m.get("runtime", "") for m in done} - {""})),
        "shard_seconds": round(seconds, 3),
        "confidence_threshold": opts.confidence_threshold,
        "predictions_snapshot_id": committed.snapshot_id,
        "reasons": json.dumps(dict(sorted(totals.reasons.items()))),
        "group_counts": json.dumps(group_counts),
        "confidence_hist": json.dumps(
            {"bins": CONFIDENCE_BINS, "range": [0.0, 1.0], "counts": totals.confidence_hist.tolist()}
        ),
        "pixel_stats": json.dumps(_pixel_stats(totals.pixel_hist)),
        "inputs": json.dumps(batch.input_manifest(), default=str),
        "embeddings": json.dumps(files[None]),
    }
    return pa.Table.from_pylist([row], schema=TABLES[BATCHES].schema)


def _pixel_stats(pixel_hist: np.ndarray) -> dict[str, Any]:
    """Mean, std and share of black pixels (in 0..1) of the 256-bin pixel histogram."""
    total_px = int(pixel_hist.sum())
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean = float((pixel_hist * levels).sum() / total_px) if total_px else None
    std = (
        float(np.sqrt(max((pixel_hist * levels**2).sum() / total_px - mean**2, 0.0)))
        if total_px and mean is not None
        else None
    )
    return {
        "mean": mean,
        "std": std,
        "frac_zero": float(pixel_hist[0] / total_px) if total_px else None,
        "hist": pixel_hist.tolist(),
    }


def _verify_shard_files(lake: Lake, markers: list[dict[str, Any]], batch_id: str) -> None:
    """Every file a marker lists still has its checksum, and the predictions files hold each image
    id once.

    A mismatch is looked at again after a pause (:data:`TORN_READ_PAUSES_S`): the read may have
    been torn, or a second attempt at the shard (a task retried while its first attempt still ran:
    the same plan, so the same file names) may have rewritten its files and then its marker, which
    then lists the new checksum. Another plan of the batch never rewrites these files: its file
    names carry its own write id. A mismatch that stays means someone rewrote a file after its
    shard committed: that shard's marker is removed, so the next run scores it again, and the batch
    is not committed.
    """
    jobs = [(m, key, entry) for m in markers for key, entry in m["files"].items()]

    def matches(marker: dict[str, Any], key: str) -> bytes | None:
        data = lake.read_bytes(key)
        if hashlib.sha256(data).hexdigest() == marker["files"][key]["sha256"]:
            return data
        for pause in TORN_READ_PAUSES_S:
            time.sleep(pause)
            again = read_marker(
                lake,
                shard_marker_key(marker["batch_date"], marker["model_version"], batch_id, marker["shard_id"]),
            )
            if again is None or key not in again.get("files", {}):
                return None
            data = lake.read_bytes(key)
            if hashlib.sha256(data).hexdigest() == again["files"][key]["sha256"]:
                log.info("batch %s: shard %s's %s was rewritten by another attempt; its marker agrees",
                         batch_id, marker["shard_id"], key)  # fmt: skip
                return data
        return None

    def check(job: tuple[dict[str, Any], str, dict[str, Any]]) -> tuple[int | None, pa.Array | None]:
        marker, key, entry = job
        data = matches(marker, key)
        if data is None:
            return int(marker["shard_id"]), None
        if entry.get("table") == PREDICTIONS:
            ids = pq.read_table(io.BytesIO(data), columns=["image_id"]).column("image_id")
            return None, ids.combine_chunks().cast(pa.string())
        return None, None

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(jobs)))) as ex:
        outcomes = list(ex.map(check, jobs))
    broken = sorted({sid for sid, _ in outcomes if sid is not None})
    if broken:
        for m in markers:
            if int(m["shard_id"]) in broken:
                lake.delete(shard_marker_key(m["batch_date"], m["model_version"], batch_id, m["shard_id"]))
        raise ScoringError(
            f"batch {batch_id}: files of shards {broken} changed after they committed (another run scoring "
            "the same batch at once?); their markers were removed: run the batch again to rescore them"
        )
    arrays = [a for _, a in outcomes if a is not None]
    all_ids = pa.chunked_array(arrays, type=pa.string()) if arrays else pa.chunked_array([], pa.string())
    n_distinct = pc.count_distinct(all_ids).as_py()
    if n_distinct != len(all_ids) or all_ids.null_count:
        raise ScoringError(
            f"batch {batch_id}: {len(all_ids) - n_distinct} duplicate image ids across part files"
        )
