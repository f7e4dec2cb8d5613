"""Commit a scored batch: reconcile every shard marker against the plan, then commit its partitions.

:func:`finalize_batch` checks that every shard committed and that the counts reconcile (input
records = scored + quarantined; one row per image id), commits the per-group view, the
needs-review and embedding-sample partitions and the quarantine (each one's manifest is its
commit), and commits the batch manifest LAST of all: until then no reader sees the batch.
:func:`reset_batch` un-commits a batch for a forced re-run; :func:`batch_summary` reads one back.
"""

from __future__ import annotations

import hashlib
import io
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
from zalando.lake import MANIFEST, Lake
from zalando.scoring import layout
from zalando.scoring.batch import Batch, ShardRef
from zalando.scoring.schema import CONFIDENCE_BINS, PREDICTION_SCHEMA
from zalando.scoring.shard import ScoringError, ScoringOptions, ShardResult, read_shard_markers, write_part

log = logging.getLogger(__name__)


class BatchResult(BaseModel):
    """A committed batch (or one found already committed)."""

    batch_id: str
    batch_date: date
    model_version: str
    predictions_key: str
    records: int
    scored: int
    quarantined: int
    reasons: dict[str, int] = Field(default_factory=dict)
    group_counts: dict[str, int] = Field(default_factory=dict)
    low_confidence: int = 0
    shards: int = 0
    shards_skipped: int = 0
    skipped: bool = False  # the batch was already committed and not forced
    seconds: float = 0.0
    images_per_s: float = 0.0
    timings: dict[str, float] = Field(default_factory=dict)  # plan / shards / finalize seconds


@dataclass(frozen=True)
class _Totals:
    """The shard markers added up."""

    records: int
    scored: int
    quarantined: int
    low_confidence: int
    reasons: Counter[str]
    group_counts: np.ndarray
    pixel_hist: np.ndarray
    confidence_hist: np.ndarray


# ------------------------------------------------------------------------------------ state


def is_batch_committed(lake: Lake, batch_date: date | str, batch_id: str, model_version: str) -> bool:
    return lake.is_committed(layout.predictions_key(batch_date, model_version, batch_id))


def reset_batch(lake: Lake, batch: Batch, model_version: str) -> None:
    """Un-commit a batch's outputs (manifests first, then markers) so that it is scored again."""
    d, b, v = batch.batch_date, batch.batch_id, model_version
    lake.delete(f"{layout.predictions_key(d, v, b)}/{MANIFEST}")
    for key in _side_partitions(d, v, b):
        lake.delete(f"{key}/{MANIFEST}")
    lake.delete_prefix(f"{layout.predictions_key(d, v, b)}/_shards")
    log.info("batch %s (model %s): un-committed for a forced re-run", b, v)


def _side_partitions(d: date, v: str, b: str) -> list[str]:
    return [
        *[layout.group_key(d, g, v, b) for g in range(NUM_GROUPS)],
        layout.review_key(d, v, b),
        layout.embeddings_key(d, v, b),
        layout.quarantine_key(b, v),
    ]


def batch_summary(lake: Lake, batch_date: date | str, batch_id: str, model_version: str) -> BatchResult:
    """The BatchResult of a committed batch, from its manifest."""
    key = layout.predictions_key(batch_date, model_version, batch_id)
    m = lake.read_manifest(key)
    x = m["extra"]
    c = x["counts"]
    return BatchResult(
        batch_id=batch_id,
        batch_date=date.fromisoformat(str(batch_date)) if isinstance(batch_date, str) else batch_date,
        model_version=model_version,
        predictions_key=key,
        records=c["records"],
        scored=c["scored"],
        quarantined=c["quarantined"],
        reasons=x.get("reasons", {}),
        group_counts=x.get("group_counts", {}),
        low_confidence=c.get("low_confidence", 0),
        shards=x.get("shards", 0),
        skipped=True,
    )


# ------------------------------------------------------------------------------------ finalize


def finalize_batch(
    lake: Lake,
    batch: Batch,
    shards: Sequence[ShardRef],
    model_version: str,
    *,
    run_id: str | None = None,
    options: ScoringOptions | None = None,
    results: Iterable[ShardResult] | None = None,
    verify_ids: bool = True,
    extra: dict[str, Any] | None = None,
) -> BatchResult:
    """Reconcile every shard marker, commit the side partitions, and commit the batch manifest LAST.

    Reads only the shard markers (and, with ``verify_ids``, the image_id column of the part files).
    ``results`` (the shard tasks' return values) are only used to count skipped shards.
    Raises :class:`ScoringError` when shards are missing or counts do not reconcile.
    """
    t0 = time.perf_counter()
    opts = options or ScoringOptions()
    d, b, v = batch.batch_date, batch.batch_id, model_version
    run_id = run_id or f"score-{b}-{v}"
    done, totals = _reconcile(lake, batch, shards, v)
    by_prefix: dict[str, dict[str, dict[str, Any]]] = {}  # partition key -> part name -> entry
    for m in done:
        for key, entry in m["files"].items():
            prefix, _, name = key.rpartition("/")
            by_prefix.setdefault(prefix, {})[name] = entry
    pred_key = layout.predictions_key(d, v, b)
    pred_files = _files_or_empty_part(lake, pred_key, by_prefix)  # an all-bad batch: a zero-row table
    if verify_ids:
        _verify_shard_files(lake, done, pred_key, b)
    schema_text = str(PREDICTION_SCHEMA)
    for entry in pred_files.values():
        entry["schema"] = schema_text

    # side partitions first, stale ones from an earlier plan removed; the batch manifest is the last write
    _commit_side_partitions(lake, batch, v, by_prefix, run_id, totals.reasons, opts.confidence_threshold)
    _remove_stale_parts(lake, pred_key, set(pred_files))
    manifest_extra = {
        **_manifest_extra(batch, v, len(shards), done, totals, by_prefix, opts.confidence_threshold),
        **(extra or {}),
    }
    _commit_existing(lake, pred_key, pred_files, run_id, manifest_extra)  # the batch's commit point
    result = BatchResult(
        batch_id=b,
        batch_date=d,
        model_version=v,
        predictions_key=pred_key,
        records=totals.records,
        scored=totals.scored,
        quarantined=totals.quarantined,
        reasons=dict(sorted(totals.reasons.items())),
        group_counts=manifest_extra["group_counts"],
        low_confidence=totals.low_confidence,
        shards=len(shards),
        shards_skipped=sum(1 for r in results or () if r.skipped),
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "batch %s (model %s) committed: %d records = %d scored + %d quarantined %s",
        b,
        v,
        totals.records,
        totals.scored,
        totals.quarantined,
        dict(totals.reasons) or "",
    )
    return result


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
    if totals.records != batch.records or totals.scored + totals.quarantined != totals.records:
        raise ScoringError(
            f"batch {b}: counts do not reconcile: {batch.records} input records, shards cover "
            f"{totals.records}, {totals.scored} scored + {totals.quarantined} quarantined"
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
        reasons=reasons,
        group_counts=total("group_counts", np.zeros(NUM_GROUPS, int), int),
        pixel_hist=total("pixel_hist", np.zeros(256, np.int64), np.int64),
        confidence_hist=total("confidence_hist", np.zeros(CONFIDENCE_BINS, int), int),
    )


def _files_or_empty_part(
    lake: Lake, key: str, by_prefix: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """The partition's part files, sorted; with none, a zero-row part file is written (and listed)."""
    files = dict(sorted(by_prefix.get(key, {}).items()))
    if not files:
        files[layout.EMPTY_PART] = write_part(
            lake, f"{key}/{layout.EMPTY_PART}", PREDICTION_SCHEMA.empty_table()
        )
    return files


def _common(batch: Batch, model_version: str) -> dict[str, Any]:
    return {
        "batch_id": batch.batch_id,
        "batch_date": batch.batch_date.isoformat(),
        "model_version": model_version,
    }


def _commit_side_partitions(
    lake: Lake,
    batch: Batch,
    model_version: str,
    by_prefix: dict[str, dict[str, dict[str, Any]]],
    run_id: str,
    reasons: Counter[str],
    confidence_threshold: float,
) -> None:
    """Commit the per-group, needs-review, embeddings and quarantine partitions (in parallel: independent).

    A partition no shard wrote is removed (stale from an earlier plan); needs-review always commits.
    """
    d, b, v = batch.batch_date, batch.batch_id, model_version
    common = _common(batch, v)
    review = layout.review_key(d, v, b)
    review_files = _files_or_empty_part(lake, review, by_prefix)
    emb = layout.embeddings_key(d, v, b)
    qkey = layout.quarantine_key(b, v)
    side: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = [
        (
            layout.group_key(d, g, v, b),
            by_prefix.get(layout.group_key(d, g, v, b)),
            {**common, "group": GROUP_KEYS[g]},
        )
        for g in range(NUM_GROUPS)
    ]
    side += [
        (review, review_files, {**common, "confidence_threshold": confidence_threshold}),
        (emb, by_prefix.get(emb), common),
        (qkey, by_prefix.get(qkey), {**common, "reasons": dict(reasons)}),
    ]

    def commit_side(item: tuple[str, dict[str, Any] | None, dict[str, Any]]) -> None:
        key, entries, side_extra = item
        if entries:
            _commit_existing(lake, key, dict(sorted(entries.items())), run_id, side_extra)
        else:
            lake.delete_prefix(key)

    with ThreadPoolExecutor(max_workers=len(side)) as ex:
        list(ex.map(commit_side, side))


def _manifest_extra(
    batch: Batch,
    model_version: str,
    num_shards: int,
    done: list[dict[str, Any]],
    totals: _Totals,
    by_prefix: dict[str, dict[str, dict[str, Any]]],
    confidence_threshold: float,
) -> dict[str, Any]:
    """What the batch manifest says: inputs, counts, histograms for drift, runtimes, partitions."""
    d, b, v = batch.batch_date, batch.batch_id, model_version
    emb = layout.embeddings_key(d, v, b)
    qkey = layout.quarantine_key(b, v)
    seconds = sum(m.get("timings", {}).get(k, 0.0) for m in done for k in ("read_decode", "predict", "write"))
    counts = {
        "records": totals.records,
        "scored": totals.scored,
        "quarantined": totals.quarantined,
        "low_confidence": totals.low_confidence,
    }
    return {
        **_common(batch, v),
        "kind": "predictions",
        "inputs": batch.input_manifest(),
        "counts": counts,
        "reconciled": True,
        "reasons": dict(sorted(totals.reasons.items())),
        "group_counts": {GROUP_KEYS[g]: int(totals.group_counts[g]) for g in range(NUM_GROUPS)},
        "confidence_hist": {
            "bins": CONFIDENCE_BINS,
            "range": [0.0, 1.0],
            "counts": totals.confidence_hist.tolist(),
        },
        "pixel_stats": _pixel_stats(totals.pixel_hist),
        "shards": num_shards,
        "runtimes": sorted({m.get("runtime", "") for m in done}),
        "shard_seconds": round(seconds, 3),
        "confidence_threshold": confidence_threshold,
        "partitions": {
            "by_group": [
                layout.group_key(d, g, v, b)
                for g in range(NUM_GROUPS)
                if layout.group_key(d, g, v, b) in by_prefix
            ],
            "needs_review": layout.review_key(d, v, b),
            "embeddings": emb if emb in by_prefix else None,
            "quarantine": qkey if qkey in by_prefix else None,
        },
    }


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


def _commit_existing(
    lake: Lake, key: str, entries: dict[str, dict[str, Any]], run_id: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """Commit files already written under key: the manifest (Lake's format) is the only write."""
    manifest = {
        "partition": key,
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(),
        "files": entries,
        "rows": int(sum(e.get("rows", 0) for e in entries.values())),
        "extra": extra,
    }
    lake.write_json(f"{key}/{MANIFEST}", manifest)
    return manifest


def _verify_shard_files(lake: Lake, markers: list[dict[str, Any]], pred_key: str, batch_id: str) -> None:
    """Every file a marker lists still has its checksum, and the part files hold each image id once.

    A mismatch means two runs scored the same shard at the same time (same names, other bytes):
    that shard's marker is removed, so the next run scores it again, and the batch is not committed.
    """
    jobs = [(m, key, entry) for m in markers for key, entry in m["files"].items()]

    def check(job: tuple[dict[str, Any], str, dict[str, Any]]) -> tuple[int | None, pa.Array | None]:
        marker, key, entry = job
        data = lake.read_bytes(key)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return int(marker["shard_id"]), None
        if key.rsplit("/", 1)[0] == pred_key:
            return None, pq.read_table(io.BytesIO(data), columns=["image_id"]).column(
                "image_id"
            ).combine_chunks()
        return None, None

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(jobs)))) as ex:
        outcomes = list(ex.map(check, jobs))
    broken = sorted({sid for sid, _ in outcomes if sid is not None})
    if broken:
        for m in markers:
            if int(m["shard_id"]) in broken:
                lake.delete(
                    layout.shard_marker_key(m["batch_date"], m["model_version"], batch_id, m["shard_id"])
                )
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


def _remove_stale_parts(lake: Lake, key: str, keep: set[str]) -> None:
    for k in lake.list_keys(key):
        name = k[len(key) + 1 :]
        if "/" not in name and name.endswith(".parquet") and name not in keep:
            log.info("removing stale part file %s", k)
            lake.delete(k)
