"""Score one shard exactly once: read its inputs, predict, write its data files, write its marker LAST.

:func:`score_shard` reads only its rows (:func:`zalando.scoring.inputs.read_shard`: bad rows become
quarantine records with a reason code), predicts in sub-batches, and writes its files under the
names its :class:`~zalando.scoring.batch.ShardTarget` gives: a ``predictions`` data file and a
``quarantine`` data file (checked against the tables' schemas, written under the tables' ``data/``
folders, invisible to every reader until the batch's commit), and the embedding sample (a plain
object). Its shard marker (the counts and histograms :mod:`zalando.scoring.commit` adds up, and the
files with their sha256) is its commit point. A shard whose marker matches is skipped, so a re-run
after a crash scores only the missing shards; a retried shard rewrites its own files, never
another plan's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from zalando.data.arrays import images_to_arrow
from zalando.errors import ModelError, ZalandoError
from zalando.images import ImagePrepConfig
from zalando.labels import GROUP_NAMES, NUM_GROUPS
from zalando.lake import Lake, table_to_parquet_bytes
from zalando.lake.commit import write_data_file
from zalando.lake.keys import shard_marker_key
from zalando.lake.tables import PREDICTIONS, PRODUCT_COLUMNS, QUARANTINE, TABLES, iceberg_schema
from zalando.runtime import Predictor
from zalando.scoring.batch import ShardRef, ShardTarget
from zalando.scoring.inputs import ShardInput, read_shard

log = logging.getLogger(__name__)

_GROUP_NAME_ARRAY = pa.array(GROUP_NAMES, pa.string())
SAMPLE_PIXELS = "pixels"  # the embedding sample's column of 784 uint8 pixels per sampled image
CONFIDENCE_BINS = 20  # bins of the confidence histogram in shard markers and the batch's row
EVIDENCE_CAP = 64 * 1024  # quarantine rows keep at most this many first bytes of an image input


# (lake, shard, image prep, keep_rejected_bytes) -> what the shard read
ReadShard = Callable[[Lake, ShardRef, ImagePrepConfig, int], ShardInput]


class ScoringError(ZalandoError):
    """A batch cannot be committed (shards missing, counts that do not reconcile)."""


class ScoringOptions(BaseModel):
    """Knobs of a scoring run (small, serialisable: passed to every shard)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sub_batch: int = Field(default=256, ge=1, le=65536, description="images per predictor call")
    confidence_threshold: float = Field(default=0.6, ge=0, le=1, description="below: needs_review is set")
    image_prep: ImagePrepConfig = Field(default_factory=ImagePrepConfig)
    keep_rejected_bytes: int = Field(
        default=EVIDENCE_CAP,
        ge=0,
        le=EVIDENCE_CAP,
        description="quarantine rows keep at most this many first bytes of a rejected input that "
        "claims to be an image (never any of a non-image)",
    )


class ShardResult(BaseModel):
    """What a shard did (small: what a Prefect task returns)."""

    batch_id: str
    shard_id: int
    model_version: str
    records: int
    scored: int
    quarantined: int
    reasons: dict[str, int] = Field(default_factory=dict)
    low_confidence: int = 0
    unchanged: int = 0  # records left out because their last score stands (catalogue batches)
    skipped: bool = False  # already committed by an earlier attempt
    runtime: str = ""
    seconds: float = 0.0
    timings: dict[str, float] = Field(default_factory=dict)


# ------------------------------------------------------------------------------------ tables


@functools.cache
def table_iceberg_schema(name: str) -> Any:
    """The Iceberg schema a shard writes ``name``'s data files with: its spec's (the driver checked,
    when it planned, that the live table still has exactly this schema)."""
    return iceberg_schema(TABLES[name])


def write_part(lake: Lake, key: str, table: pa.Table) -> dict[str, Any]:
    """Write ``table`` as one Parquet plain object at ``key``; its marker entry (bytes, sha256, rows)."""
    data = table_to_parquet_bytes(table)
    lake.write_bytes(key, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": table.num_rows}


def _write_table_file(lake: Lake, key: str, table_name: str, rows: pa.Table) -> dict[str, Any]:
    written = write_data_file(lake, key, rows, schema=table_iceberg_schema(table_name))
    return {"bytes": written.bytes, "sha256": written.sha256, "rows": written.rows, "table": table_name}


def _repeat(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), n)


def prediction_table(
    ids: pa.Array,
    probs: np.ndarray,
    model_version: str,
    batch_id: str,
    batch_date: date,
    scored_at: datetime,
    confidence_threshold: float,
) -> pa.Table:
    """The prediction rows of scored images, in the ``predictions`` table's schema."""
    n = len(ids)
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    pred = probs.argmax(axis=1).astype(np.int8) if n else np.zeros(0, np.int8)
    conf = probs.max(axis=1) if n else np.zeros(0, np.float32)
    cols: list[pa.Array] = [
        ids,
        pa.array(pred, pa.int8()),
        _GROUP_NAME_ARRAY.take(pa.array(pred.astype(np.int32))),
    ]
    cols += [pa.array(probs[:, g]) for g in range(NUM_GROUPS)]
    cols += [
        pa.array(conf.astype(np.float32)),
        pa.array(conf < confidence_threshold, pa.bool_()),
        _repeat(model_version, n, pa.string()),
        _repeat(batch_id, n, pa.string()),
        _repeat(batch_date, n, pa.date32()),
        _repeat(scored_at, n, pa.timestamp("us", tz="UTC")),
        _repeat(False, n, pa.bool_()),
        *[pa.nulls(n, f.type) for f in PRODUCT_COLUMNS],  # a catalogue shard's annotate fills them
    ]
    return pa.Table.from_arrays(cols, schema=TABLES[PREDICTIONS].schema)


def quarantine_table(
    records: list[dict[str, Any]], shard: ShardRef, model_version: str, write_id: str
) -> pa.Table:
    """The quarantine rows of a shard's rejected inputs, in the ``quarantine`` table's schema."""
    common = {
        "run_id": write_id,
        "batch_id": shard.batch_id,
        "model_version": model_version,
        "shard_id": shard.shard_id,
    }
    return pa.Table.from_pylist([{**r, **common} for r in records], schema=TABLES[QUARANTINE].schema)


# ------------------------------------------------------------------------------------ markers


def read_marker(lake: Lake, key: str) -> dict[str, Any] | None:
    """The marker at ``key``; None when it is absent or does not parse (after the torn-read re-reads)."""
    if not lake.exists(key):
        return None
    try:
        marker = lake.read_json(key)
    except (ZalandoError, ValueError):
        log.warning("shard marker %s does not parse; treating it as missing", lake.uri(key))
        return None
    return marker if isinstance(marker, dict) else None


def shard_is_committed(lake: Lake, ref: ShardRef, model_version: str) -> dict[str, Any] | None:
    """The shard's marker when it matches this shard and model and its files exist, else None."""
    marker = read_marker(lake, shard_marker_key(ref.batch_date, model_version, ref.batch_id, ref.shard_id))
    if marker is None:
        return None
    if marker.get("fingerprint") != ref.fingerprint or marker.get("model_version") != model_version:
        log.info("shard %s/%d: marker is for another plan or model; rescoring", ref.batch_id, ref.shard_id)
        return None
    if not all(lake.exists(k) for k in marker.get("files", {})):
        log.warning("shard %s/%d: marker lists files that are gone; rescoring", ref.batch_id, ref.shard_id)
        return None
    return marker


def read_shard_markers(
    lake: Lake, shards: Sequence[ShardRef], model_version: str, threads: int = 8
) -> list[dict[str, Any] | None]:
    """Every shard's matching marker (None where missing or stale), read in parallel."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as ex:
        return list(ex.map(lambda s: shard_is_committed(lake, s, model_version), shards))


def _result_from_marker(marker: dict[str, Any], *, skipped: bool) -> ShardResult:
    return ShardResult(
        batch_id=marker["batch_id"],
        shard_id=marker["shard_id"],
        model_version=marker["model_version"],
        records=marker["records"],
        scored=marker["scored"],
        quarantined=marker["quarantined"],
        reasons=marker.get("reasons", {}),
        low_confidence=marker.get("low_confidence", 0),
        unchanged=marker.get("unchanged", 0),
        skipped=skipped,
        runtime=marker.get("runtime", ""),
        seconds=0.0 if skipped else float(marker.get("seconds", 0.0)),
        timings={} if skipped else marker.get("timings", {}),
    )


# ------------------------------------------------------------------------------------ score_shard


def score_shard(
    lake: Lake,
    shard: ShardRef,
    predictor: Predictor,
    model_version: str,
    options: ScoringOptions | None = None,
    *,
    read: ReadShard = read_shard,
) -> ShardResult:
    """Score one shard exactly once: skip when committed, else read, validate, predict, write, mark.

    The shard needs its :class:`ShardTarget` (``prepare_batch`` sets it). Memory: one shard of
    images (shard_size x 784 bytes) plus one sub-batch of floats. ``read``: how the shard's inputs
    become a :class:`~zalando.scoring.inputs.ShardInput` (a catalogue batch fetches its products'
    images, :func:`zalando.catalogue.scoring.read_catalogue_shard`).
    """
    opts = options or ScoringOptions()
    if shard.target is None:
        raise ScoringError(f"shard {shard.batch_id}/{shard.shard_id}: no target; plan it with prepare_batch")
    t0 = time.perf_counter()
    marker = shard_is_committed(lake, shard, model_version)
    if marker is not None:
        return _result_from_marker(marker, skipped=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    data = read(lake, shard, opts.image_prep, opts.keep_rejected_bytes)
    timings["read_decode"] = time.perf_counter() - t
    timings.update(data.timings)

    ok_idx = np.flatnonzero(data.ok)
    ids_all = data.ids if isinstance(data.ids, pa.Array) else pa.array(data.ids, pa.string())
    good_ids = ids_all.take(pa.array(ok_idx)) if ok_idx.size != len(data.ok) else ids_all
    images = data.images[ok_idx] if ok_idx.size != len(data.ok) else data.images

    t = time.perf_counter()
    probs, emb_sample = predict_in_sub_batches(predictor, images, opts.sub_batch, shard.embedding_sample)
    timings["predict"] = time.perf_counter() - t

    t = time.perf_counter()
    scored_at = datetime.now(UTC).replace(microsecond=0)
    table = prediction_table(
        good_ids, probs, model_version, shard.batch_id, shard.batch_date, scored_at, opts.confidence_threshold
    )
    if data.annotate is not None:
        table = data.annotate(table, ok_idx)
    files = _write_outputs(
        lake, shard, shard.target, model_version, table, good_ids, emb_sample, images, data.quarantine
    )
    timings["write"] = time.perf_counter() - t

    marker = _shard_marker(
        shard, model_version, table, data.quarantine, images, files, timings, predictor, opts
    )
    b, sid = shard.batch_id, shard.shard_id
    if data.unchanged_ids:
        marker.update(unchanged=len(data.unchanged_ids), unchanged_ids=list(data.unchanged_ids))
    if marker["scored"] + marker["quarantined"] + len(data.unchanged_ids) != shard.records:  # a bug
        raise ScoringError(
            f"shard {b}/{sid}: {marker['scored']} scored + {marker['quarantined']} quarantined + "
            f"{len(data.unchanged_ids)} unchanged != {shard.records} records"
        )
    lake.write_json(shard_marker_key(shard.batch_date, model_version, b, sid), marker)  # commit point
    marker["seconds"] = time.perf_counter() - t0
    log.debug(
        "shard %s/%d: %d scored, %d quarantined in %.2fs",
        b,
        sid,
        marker["scored"],
        marker["quarantined"],
        marker["seconds"],
    )
    return _result_from_marker(marker, skipped=False)


def _write_outputs(
    lake: Lake,
    shard: ShardRef,
    target: ShardTarget,
    model_version: str,
    table: pa.Table,
    good_ids: pa.Array,
    emb_sample: np.ndarray | None,
    images: np.ndarray,
    quarantine: list[dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Write the shard's files (in parallel: object stores answer in parallel); lake key -> marker entry.

    The predictions and quarantine data files are schema-checked against their tables; a shard with
    no scored row (or no rejected one) writes no such file. The embedding sample is a plain object:
    the first scored ids, their embeddings and their 28x28 pixels as the model saw them (drift
    monitoring reads those instead of decoding the batch's inputs a second time).
    """
    jobs: list[tuple[str, Any]] = []
    if table.num_rows:
        jobs.append(
            (
                target.predictions,
                lambda: _write_table_file(lake, target.predictions, PREDICTIONS, table),
            )
        )
    if quarantine:
        rows = quarantine_table(quarantine, shard, model_version, target.write_id)
        jobs.append((target.quarantine, lambda: _write_table_file(lake, target.quarantine, QUARANTINE, rows)))
    if emb_sample is not None and len(emb_sample):
        k = len(emb_sample)
        sample = pa.table(
            {
                "image_id": good_ids.slice(0, k),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(emb_sample.astype(np.float32).ravel()), emb_sample.shape[1]
                ),
                SAMPLE_PIXELS: images_to_arrow(images[:k]),
            }
        )
        jobs.append(
            (target.embeddings, lambda: {**write_part(lake, target.embeddings, sample), "table": None})
        )
    if not jobs:
        return {}
    with ThreadPoolExecutor(max_workers=len(jobs)) as ex:
        written = list(ex.map(lambda job: job[1](), jobs))
    return {key: entry for (key, _), entry in zip(jobs, written, strict=True)}


def _shard_marker(
    shard: ShardRef,
    model_version: str,
    table: pa.Table,
    quarantine: list[dict[str, Any]],
    images: np.ndarray,
    files: dict[str, dict[str, Any]],
    timings: dict[str, float],
    predictor: Predictor,
    opts: ScoringOptions,
) -> dict[str, Any]:
    """The shard's marker: its plan fingerprint, counts, histograms for drift, and its files."""
    if table.num_rows:
        conf = table.column("confidence").to_numpy()
        pred = table.column("pred_group").to_numpy()
    else:
        conf = np.zeros(0, np.float32)
        pred = np.zeros(0, np.int8)
    reasons = Counter(r["reason"] for r in quarantine)
    return {
        "batch_id": shard.batch_id,
        "batch_date": shard.batch_date.isoformat(),
        "shard_id": shard.shard_id,
        "model_version": model_version,
        "fingerprint": shard.fingerprint,
        "write_id": shard.target.write_id if shard.target else None,
        "records": shard.records,
        "scored": int(table.num_rows),
        "quarantined": len(quarantine),
        "reasons": dict(sorted(reasons.items())),
        "low_confidence": int((conf < opts.confidence_threshold).sum()),
        "group_counts": np.bincount(pred.astype(np.int64), minlength=NUM_GROUPS).tolist(),
        "confidence_hist": np.histogram(conf, bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0].tolist(),
        "pixel_hist": _pixel_hist(images).tolist(),
        "runtime": getattr(predictor, "runtime", ""),
        "files": files,
        "timings": {k: round(x, 4) for k, x in timings.items()},
        "written_at": datetime.now(UTC).isoformat(),
    }


def _pixel_hist(images: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """256-bin histogram of the pixels (for drift monitoring), in chunks to bound temporaries."""
    flat = images.reshape(-1)
    hist = np.zeros(256, dtype=np.int64)
    for i in range(0, flat.size, chunk):
        hist += np.bincount(flat[i : i + chunk], minlength=256)
    return hist


def predict_in_sub_batches(
    predictor: Predictor, images: np.ndarray, sub_batch: int, n_embed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities of every image, sub-batch by sub-batch (``predictor.parallelism`` at once)."""
    n = len(images)
    if n == 0:
        return np.zeros((0, NUM_GROUPS), np.float32), None
    probs = np.empty((n, NUM_GROUPS), np.float32)
    starts = list(range(0, n, sub_batch))
    par = max(1, int(getattr(predictor, "parallelism", 1)))

    def run(i: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        p, e = predictor.predict(images[i : i + sub_batch])
        if p.shape != (min(sub_batch, n - i), NUM_GROUPS):
            raise ModelError(
                f"predictor returned probabilities of shape {p.shape}, expected (*, {NUM_GROUPS})"
            )
        probs[i : i + len(p)] = p
        return (
            i,
            p,
            (np.array(e[:n_embed], dtype=np.float32) if i < n_embed and e is not None and e.size else None),
        )

    if par > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=min(par, len(starts))) as ex:
            outs = list(ex.map(run, starts))
    else:
        outs = [run(i) for i in starts]
    if not np.isfinite(probs).all():
        raise ModelError("predictor returned NaN or infinite probabilities: the model is broken")
    emb_parts = [e for _, _, e in outs if e is not None]
    emb = np.concatenate(emb_parts)[:n_embed] if emb_parts else None
    return probs, emb
