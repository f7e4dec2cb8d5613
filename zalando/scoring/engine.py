"""The scoring engine: score one shard exactly once, then commit the batch (manifest last).

``score_shard`` reads only its rows (whole Parquet row groups, two columns), rejects bad rows into
quarantine rows with a reason code, predicts in sub-batches, writes its part files under names
that are a pure function of (batch date, model version, batch id, shard id), and writes its
shard marker LAST. A shard whose marker matches is skipped, so a re-run after a crash scores only
the missing shards and overwrites (never duplicates) a half-written one. ``finalize_batch``
reconciles every marker against the plan (input records = scored + quarantined; one row per image
id), commits the per-group view, the needs-review and embedding-sample partitions and the
quarantine, and commits the batch manifest last of all.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from zalando.errors import DataError, LakeError, ModelError, ZalandoError
from zalando.images import ImagePrepConfig, ImageRejected, decode_image, sniff_format
from zalando.labels import GROUP_KEYS, GROUP_NAMES, NUM_GROUPS
from zalando.lake import MANIFEST, Lake
from zalando.runtime import Predictor
from zalando.scoring import layout
from zalando.scoring.batch import (
    CORRUPT_PARQUET,
    DUPLICATE_ID,
    ID_COLUMN,
    IMAGE_COLUMN,
    Batch,
    ShardRef,
    image_id_for_file,
    open_input,
)

log = logging.getLogger(__name__)

IMAGE_BYTES = 28 * 28

# row-level reason codes (image decoding adds zalando.images' codes)
MISSING_ID = "missing_id"
MISSING_IMAGE = "missing_image"
NAN_VALUES = "nan_values"
OUT_OF_RANGE = "out_of_range"
WRONG_SHAPE = "wrong_shape"
INPUT_CHANGED = "input_changed"
UNREADABLE = "unreadable"

PROB_COLUMNS = tuple(f"prob_{k}" for k in GROUP_KEYS)
PREDICTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("pred_group", pa.int8()),
        ("pred_group_name", pa.string()),
        *[(c, pa.float32()) for c in PROB_COLUMNS],
        ("confidence", pa.float32()),
        ("model_version", pa.string()),
        ("batch_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("image", pa.binary()),
        ("batch_id", pa.string()),
        ("shard_id", pa.int32()),
    ]
)
CONFIDENCE_BINS = 20

_GROUP_NAME_ARRAY = pa.array(GROUP_NAMES, pa.string())


class ScoringError(ZalandoError):
    """A batch cannot be committed (shards missing, counts that do not reconcile)."""


class ScoringOptions(BaseModel):
    """Knobs of a scoring run (small, serialisable: passed to every shard)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sub_batch: int = Field(default=256, ge=1, le=65536, description="images per predictor call")
    confidence_threshold: float = Field(default=0.6, ge=0, le=1, description="below: also in needs_review/")
    image_prep: ImagePrepConfig = Field(default_factory=ImagePrepConfig)
    keep_rejected_bytes: int = Field(
        default=65536, ge=0, description="quarantine rows keep inputs up to this size"
    )
    compression: str = "zstd"


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
    skipped: bool = False  # already committed by an earlier attempt
    runtime: str = ""
    seconds: float = 0.0
    timings: dict[str, float] = Field(default_factory=dict)


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


# ------------------------------------------------------------------------------------ decoding


def _detail(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else e.__class__.__name__)[:300]


def decode_image_column(
    col: pa.Array, cfg: ImagePrepConfig, *, source: str = "", row_offset: int = 0
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """An ``image`` column -> uint8 (N, 28, 28) and the bad rows as (index, reason, detail).

    Accepts fixed_size_binary(784) / binary of raw pixels (vectorised, zero-copy when contiguous),
    binary holding encoded images (PNG, JPEG, ...: decoded with :func:`decode_image`), and lists of
    784 numbers (checked for NaN and 0..255).
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    bad: list[tuple[int, str, str]] = []
    if n == 0:
        return images, bad
    valid = np.ones(n, bool) if col.null_count == 0 else ~col.is_null().to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~valid):
        bad.append((int(i), MISSING_IMAGE, f"{source} row {row_offset + int(i)}: image is null"))
    t = col.type
    if pa.types.is_fixed_size_binary(t) and t.byte_width == IMAGE_BYTES:
        data = np.frombuffer(col.buffers()[1], dtype=np.uint8)
        start = col.offset * IMAGE_BYTES
        images[:] = data[start : start + n * IMAGE_BYTES].reshape(n, 28, 28)
        images[~valid] = 0
        return images, bad
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return _decode_binary(col, images, bad, valid, cfg, source, row_offset)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _decode_lists(col, images, bad, valid, source, row_offset)
    raise DataError(f"{source}: image column type {t} is not supported")


def _decode_binary(
    col: pa.Array,
    images: np.ndarray,
    bad: list[tuple[int, str, str]],
    valid: np.ndarray,
    cfg: ImagePrepConfig,
    source: str,
    row_offset: int,
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    n = len(col)
    t = col.type
    if pa.types.is_fixed_size_binary(t):
        w = t.byte_width
        offsets = (np.arange(n + 1, dtype=np.int64) + col.offset) * w
        data_buf = col.buffers()[1]
    else:
        otype = np.int64 if pa.types.is_large_binary(t) else np.int32
        offsets = np.frombuffer(col.buffers()[1], dtype=otype)[col.offset : col.offset + n + 1].astype(
            np.int64
        )
        data_buf = col.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    first = np.full(n, -1, dtype=np.int64)
    nonempty = lengths > 0
    if len(data):
        first[nonempty] = data[offsets[:-1][nonempty]]
    # 784 bytes that do not start like an image file are raw pixels
    maybe_magic = np.isin(first, [0x89, 0xFF, 0x47, 0x42, 0x49, 0x4D, 0x52])
    raw = valid & (lengths == IMAGE_BYTES)
    if maybe_magic.any():
        for i in np.flatnonzero(raw & maybe_magic):
            o = int(offsets[i])
            if sniff_format(bytes(data[o : o + 16])) is not None:
                raw[i] = False
    raw_idx = np.flatnonzero(raw)
    if raw_idx.size == n and np.all(lengths == IMAGE_BYTES):  # contiguous raw pixels: one reshape
        o = int(offsets[0])
        images[:] = data[o : o + n * IMAGE_BYTES].reshape(n, 28, 28)
    else:
        for i in raw_idx:
            o = int(offsets[i])
            images[i] = data[o : o + IMAGE_BYTES].reshape(28, 28)
    for i in np.flatnonzero(valid & ~raw):
        o, ln = int(offsets[i]), int(lengths[i])
        blob = bytes(data[o : o + ln])
        where = f"{source} row {row_offset + int(i)}"
        if ln == 0:
            bad.append((int(i), MISSING_IMAGE, f"{where}: image is empty (0 bytes)"))
            continue
        if sniff_format(blob) is None:
            bad.append(
                (int(i), WRONG_SHAPE, f"{where}: {ln} bytes is neither 784 raw pixels nor an image file")
            )
            continue
        try:
            images[i] = decode_image(blob, cfg, name=where)
        except ImageRejected as e:
            bad.append((int(i), e.reason, e.detail))
    return images, bad


def _decode_lists(
    col: pa.Array,
    images: np.ndarray,
    bad: list[tuple[int, str, str]],
    valid: np.ndarray,
    source: str,
    row_offset: int,
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    n = len(col)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    lengths = np.where(valid, np.nan_to_num(lengths.astype(np.float64), nan=-1), -1).astype(np.int64)
    flat = pc.list_flatten(col).cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
    starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]])
    for i in range(n):
        if not valid[i]:
            continue
        where = f"{source} row {row_offset + i}"
        if lengths[i] != IMAGE_BYTES:
            bad.append((i, WRONG_SHAPE, f"{where}: {lengths[i]} values, expected 784 (28x28)"))
            continue
        v = flat[starts[i] : starts[i] + IMAGE_BYTES]
        if np.isnan(v).any():
            bad.append((i, NAN_VALUES, f"{where}: {int(np.isnan(v).sum())} NaN or null pixel values"))
            continue
        if v.min() < 0 or v.max() > 255:
            bad.append((i, OUT_OF_RANGE, f"{where}: pixel values {v.min():g}..{v.max():g} outside 0..255"))
            continue
        images[i] = np.rint(v).astype(np.uint8).reshape(28, 28)
    return images, bad


# ------------------------------------------------------------------------------------ reading


class _ShardInput:
    """What a shard read: ids, images, which rows are usable, and the quarantine records."""

    def __init__(self, n: int) -> None:
        self.ids: list[str | None] | pa.Array = []
        self.images = np.zeros((n, 28, 28), np.uint8)
        self.ok = np.ones(n, bool)
        self.rows = np.arange(n, dtype=np.int64)
        self.sources: list[str] = []
        self.quarantine: list[dict[str, Any]] = []

    def reject(
        self,
        i: int,
        image_id: str | None,
        source: str,
        row: int,
        reason: str,
        detail: str,
        blob: bytes | None,
    ) -> None:
        self.ok[i] = False
        self.quarantine.append(
            {
                "image_id": image_id,
                "source": source,
                "row": row,
                "reason": reason,
                "detail": detail,
                "image": blob,
            }
        )


class _Unreadable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _read_or_classify(read: Callable[[], Any], fs: Any, path: str, uri: str) -> Any:
    """Run ``read``; tell a storage fault (raised as LakeError: the task retries) from a bad file.

    A failed read is retried once. When the storage itself does not answer, or the file is gone,
    this is not the input's fault and must not quarantine good rows: LakeError. When the file is
    there and fails twice the same way, it is corrupt: :class:`_Unreadable` (quarantine).
    """
    err: BaseException | None = None
    for _attempt in range(2):
        try:
            return read()
        except (OSError, pa.ArrowException, ValueError, DataError) as e:
            err = e
            try:
                info = fs.get_file_info(path)
            except OSError as e2:
                raise LakeError(f"input {uri}: storage fault while reading ({_detail(e2)})") from None
            if info.type != pafs.FileType.File:
                raise _Unreadable(INPUT_CHANGED, "the file is gone since the batch was planned") from None
    assert err is not None
    raise _Unreadable(CORRUPT_PARQUET, _detail(err))


def _read_parquet_shard(lake: Lake, ref: ShardRef, opts: ScoringOptions) -> _ShardInput:
    n = ref.records
    out = _ShardInput(n)
    out.rows = np.arange(ref.row_start, ref.row_end, dtype=np.int64)
    assert ref.uri is not None
    fs, path = open_input(ref.uri, lake)

    def read_rows() -> pa.Table:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, pre_buffer=True)
            md = pf.metadata
            groups, first_row, pos = [], None, 0
            for g in range(md.num_row_groups):
                rows = md.row_group(g).num_rows
                if pos < ref.row_end and pos + rows > ref.row_start:
                    groups.append(g)
                    first_row = pos if first_row is None else first_row
                pos += rows
            if pos < ref.row_end:
                raise DataError(f"has {pos} rows, the plan expected at least {ref.row_end} (file changed?)")
            table = pf.read_row_groups(groups, columns=[ID_COLUMN, IMAGE_COLUMN], use_threads=True)
        return table.slice(ref.row_start - (first_row or 0), n)

    try:
        table = _read_or_classify(read_rows, fs, path, ref.uri)
    except _Unreadable as e:
        # corrupt pages (read twice, the file still there): every row of the shard goes to quarantine
        detail = f"{ref.name} rows {ref.row_start}..{ref.row_end}: {e.detail}"
        ids = _try_ids(fs, path, ref)
        out.ids = ids
        for i in range(n):
            out.reject(i, ids[i], ref.uri, int(out.rows[i]), e.reason, detail, None)
        return out
    ids_col = table.column(ID_COLUMN).combine_chunks()
    if not pa.types.is_string(ids_col.type):
        ids_col = ids_col.cast(pa.string())
    image_col = table.column(IMAGE_COLUMN).combine_chunks()
    out.ids = ids_col
    images, bad = decode_image_column(
        image_col, opts.image_prep, source=ref.name or "", row_offset=ref.row_start
    )
    out.images = images
    bad_by_row = {i: (reason, detail) for i, reason, detail in bad}
    missing_id = np.flatnonzero(
        ~pc.fill_null(pc.greater(pc.utf8_length(ids_col), 0), False).to_numpy(zero_copy_only=False)
    )
    dups = {r - ref.row_start for r in ref.duplicate_rows}
    if not (bad_by_row or dups or missing_id.size):
        return out
    blob_ok = (
        pa.types.is_binary(image_col.type)
        or pa.types.is_large_binary(image_col.type)
        or pa.types.is_fixed_size_binary(image_col.type)
    )
    missing = set(missing_id.tolist())
    for i in sorted(set(bad_by_row) | dups | missing):
        image_id = ids_col[i].as_py()
        where = f"{ref.name} row {ref.row_start + i}"
        if i in dups:
            reason, detail = (
                DUPLICATE_ID,
                f"{where}: image_id {image_id!r} already appears earlier in the batch",
            )
        elif i in missing:
            reason, detail = MISSING_ID, f"{where}: image_id is null or empty"
        else:
            reason, detail = bad_by_row[i]
        blob = None
        if blob_ok and image_col[i].is_valid:
            b = image_col[i].as_py()
            blob = b if len(b) <= opts.keep_rejected_bytes else None
        out.reject(i, image_id, ref.uri or "", ref.row_start + i, reason, detail, blob)
    return out


def _try_ids(fs: Any, path: str, ref: ShardRef) -> list[str | None]:
    try:
        with fs.open_input_file(path) as f:
            ids = pq.read_table(f, columns=[ID_COLUMN]).column(ID_COLUMN)
        ids = ids.slice(ref.row_start, ref.records).cast(pa.string()).to_pylist()
        if len(ids) == ref.records:
            return ids
    except Exception:  # noqa: BLE001 - a corrupt file fails in many ways; ids are only a courtesy
        pass
    return [None] * ref.records


def _read_image_shard(lake: Lake, ref: ShardRef, opts: ScoringOptions) -> _ShardInput:
    n = len(ref.files)
    out = _ShardInput(n)
    ids: list[str | None] = []
    dups = set(ref.duplicate_rows)
    cfg = opts.image_prep
    for i, (name, uri, sha) in enumerate(ref.files):
        image_id = image_id_for_file(name)
        ids.append(image_id)
        if i in dups:
            out.reject(
                i,
                image_id,
                uri,
                0,
                DUPLICATE_ID,
                f"{name}: image_id {image_id!r} already appears earlier in the batch",
                None,
            )
            continue
        fs, path = open_input(uri, lake)
        try:
            info = fs.get_file_info(path)
        except OSError as e:  # the storage, not the file: let the task retry
            raise LakeError(f"input {uri}: storage fault ({_detail(e)})") from None
        if info.type != pafs.FileType.File:
            out.reject(i, image_id, uri, 0, INPUT_CHANGED, f"{name}: gone since the batch was planned", None)
            continue
        if (info.size or 0) > cfg.max_bytes:
            out.reject(
                i,
                image_id,
                uri,
                0,
                "too_large",
                f"{name}: {info.size} bytes > max_bytes {cfg.max_bytes}",
                None,
            )
            continue

        def read_all(fs: Any = fs, path: str = path) -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read()

        try:
            blob = _read_or_classify(read_all, fs, path, uri)
        except _Unreadable as e:
            out.reject(
                i,
                image_id,
                uri,
                0,
                e.reason if e.reason != CORRUPT_PARQUET else UNREADABLE,
                f"{name}: {e.detail}",
                None,
            )
            continue
        if sha is not None and hashlib.sha256(blob).hexdigest() != sha:
            out.reject(
                i,
                image_id,
                uri,
                0,
                INPUT_CHANGED,
                f"{name}: content changed since the batch was planned",
                None,
            )
            continue
        try:
            out.images[i] = decode_image(blob, cfg, name=name)
        except ImageRejected as e:
            keep = blob if len(blob) <= opts.keep_rejected_bytes else None
            out.reject(i, image_id, uri, 0, e.reason, e.detail, keep)
    out.ids = pa.array(ids, pa.string())
    out.rows = np.zeros(n, dtype=np.int64)
    return out


def _read_bad_file(ref: ShardRef) -> _ShardInput:
    out = _ShardInput(1)
    out.ids = pa.array([None], pa.string())
    out.reject(0, None, ref.uri or "", -1, ref.error or UNREADABLE, ref.error_detail or "", None)
    return out


# ------------------------------------------------------------------------------------ writing


def _parquet_bytes(table: pa.Table, compression: str) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    return buf.getvalue()


def _put(lake: Lake, key: str, table: pa.Table, compression: str) -> dict[str, Any]:
    data = _parquet_bytes(table, compression)
    lake.write_bytes(key, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": table.num_rows}


def _repeat(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), n)


def prediction_table(
    ids: pa.Array, probs: np.ndarray, model_version: str, batch_id: str, scored_at: datetime
) -> pa.Table:
    """The prediction rows of scored images (schema :data:`PREDICTION_SCHEMA`)."""
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
        _repeat(model_version, n, pa.string()),
        _repeat(batch_id, n, pa.string()),
        _repeat(scored_at, n, pa.timestamp("us", tz="UTC")),
    ]
    return pa.Table.from_arrays(cols, schema=PREDICTION_SCHEMA)


def _quarantine_table(records: list[dict[str, Any]], batch_id: str, shard_id: int) -> pa.Table:
    rows = [{**r, "batch_id": batch_id, "shard_id": shard_id} for r in records]
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


# ------------------------------------------------------------------------------------ score_shard


def shard_is_committed(lake: Lake, ref: ShardRef, model_version: str) -> dict[str, Any] | None:
    """The shard's marker when it matches this shard and model and its files exist, else None."""
    key = layout.shard_marker_key(ref.batch_date, model_version, ref.batch_id, ref.shard_id)
    if not lake.exists(key):
        return None
    try:
        marker = lake.read_json(key)
    except (ZalandoError, ValueError):
        return None
    if marker.get("fingerprint") != ref.fingerprint or marker.get("model_version") != model_version:
        log.info("shard %s/%d: marker is for another plan or model; rescoring", ref.batch_id, ref.shard_id)
        return None
    if not all(lake.exists(k) for k in marker.get("files", {})):
        log.warning("shard %s/%d: marker lists files that are gone; rescoring", ref.batch_id, ref.shard_id)
        return None
    return marker


def score_shard(
    lake: Lake,
    shard: ShardRef,
    predictor: Predictor,
    model_version: str,
    options: ScoringOptions | None = None,
) -> ShardResult:
    """Score one shard exactly once: skip when committed, else read, validate, predict, write, mark.

    Memory: one shard of images (shard_size x 784 bytes) plus one sub-batch of floats.
    """
    opts = options or ScoringOptions()
    t0 = time.perf_counter()
    marker = shard_is_committed(lake, shard, model_version)
    if marker is not None:
        return _result_from_marker(marker, skipped=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if shard.kind == "parquet":
        data = _read_parquet_shard(lake, shard, opts)
    elif shard.kind == "images":
        data = _read_image_shard(lake, shard, opts)
    else:
        data = _read_bad_file(shard)
    timings["read_decode"] = time.perf_counter() - t

    ok_idx = np.flatnonzero(data.ok)
    ids_all = data.ids if isinstance(data.ids, pa.Array) else pa.array(data.ids, pa.string())
    good_ids = ids_all.take(pa.array(ok_idx)) if ok_idx.size != len(data.ok) else ids_all
    images = data.images[ok_idx] if ok_idx.size != len(data.ok) else data.images

    t = time.perf_counter()
    probs, emb_sample = _predict(predictor, images, opts.sub_batch, shard.embedding_sample)
    timings["predict"] = time.perf_counter() - t

    t = time.perf_counter()
    scored_at = datetime.now(UTC).replace(microsecond=0)
    table = prediction_table(good_ids, probs, model_version, shard.batch_id, scored_at)
    outputs: dict[str, pa.Table] = {}  # lake key -> table; written concurrently below
    d, b, v, sid = shard.batch_date, shard.batch_id, model_version, shard.shard_id
    part = layout.part_name(sid)
    if table.num_rows:
        outputs[f"{layout.predictions_key(d, v, b)}/{part}"] = table
        pred = table.column("pred_group").to_numpy()
        for g in range(NUM_GROUPS):
            idx = np.flatnonzero(pred == g)
            if idx.size:
                outputs[f"{layout.group_key(d, g, v, b)}/{part}"] = table.take(pa.array(idx))
        conf = table.column("confidence").to_numpy()
        low = np.flatnonzero(conf < opts.confidence_threshold)
        if low.size:
            outputs[f"{layout.review_key(d, v, b)}/{part}"] = table.take(pa.array(low))
        if emb_sample is not None and len(emb_sample):
            k = len(emb_sample)
            outputs[f"{layout.embeddings_key(d, v, b)}/{part}"] = pa.table(
                {
                    "image_id": good_ids.slice(0, k),
                    "embedding": pa.FixedSizeListArray.from_arrays(
                        pa.array(emb_sample.astype(np.float32).ravel()), emb_sample.shape[1]
                    ),
                }
            )
    else:
        conf = np.zeros(0, np.float32)
        pred = np.zeros(0, np.int8)
    if data.quarantine:
        outputs[f"{layout.quarantine_key(b, v)}/{part}"] = _quarantine_table(data.quarantine, b, sid)
    with ThreadPoolExecutor(max_workers=max(1, len(outputs))) as ex:  # object stores answer in parallel
        written = list(ex.map(lambda kv: _put(lake, kv[0], kv[1], opts.compression), outputs.items()))
    files: dict[str, dict[str, Any]] = dict(zip(outputs, written, strict=True))
    timings["write"] = time.perf_counter() - t

    reasons = Counter(r["reason"] for r in data.quarantine)
    marker = {
        "batch_id": b,
        "batch_date": d.isoformat(),
        "shard_id": sid,
        "model_version": v,
        "fingerprint": shard.fingerprint,
        "records": shard.records,
        "scored": int(table.num_rows),
        "quarantined": len(data.quarantine),
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
    if marker["scored"] + marker["quarantined"] != shard.records:  # a bug, never bad input
        raise ScoringError(
            f"shard {b}/{sid}: {marker['scored']} scored + {marker['quarantined']} quarantined != {shard.records} records"
        )
    lake.write_json(layout.shard_marker_key(d, v, b, sid), marker)  # the shard's commit point
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


def _pixel_hist(images: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """256-bin histogram of the pixels (for drift monitoring), in chunks to bound temporaries."""
    flat = images.reshape(-1)
    hist = np.zeros(256, dtype=np.int64)
    for i in range(0, flat.size, chunk):
        hist += np.bincount(flat[i : i + chunk], minlength=256)
    return hist


def _predict(
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
        skipped=skipped,
        runtime=marker.get("runtime", ""),
        seconds=0.0 if skipped else float(marker.get("seconds", 0.0)),
        timings={} if skipped else marker.get("timings", {}),
    )


# ------------------------------------------------------------------------------------ finalize


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


def read_shard_markers(
    lake: Lake, shards: Sequence[ShardRef], model_version: str, threads: int = 8
) -> list[dict[str, Any] | None]:
    """Every shard's matching marker (None where missing or stale), read in parallel."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as ex:
        return list(ex.map(lambda s: shard_is_committed(lake, s, model_version), shards))


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
    records = sum(m["records"] for m in done)
    scored = sum(m["scored"] for m in done)
    quarantined = sum(m["quarantined"] for m in done)
    if records != batch.records or scored + quarantined != records:
        raise ScoringError(
            f"batch {b}: counts do not reconcile: {batch.records} input records, shards cover {records}, "
            f"{scored} scored + {quarantined} quarantined"
        )
    by_prefix: dict[str, dict[str, dict[str, Any]]] = {}
    for m in done:
        for key, entry in m["files"].items():
            prefix, _, name = key.rpartition("/")
            by_prefix.setdefault(prefix, {})[name] = entry
    pred_key = layout.predictions_key(d, v, b)
    pred_files = dict(sorted(by_prefix.get(pred_key, {}).items()))
    if not pred_files:  # an empty or all-bad batch still commits a (zero-row) table
        pred_files[layout.EMPTY_PART] = _put(
            lake, f"{pred_key}/{layout.EMPTY_PART}", PREDICTION_SCHEMA.empty_table(), opts.compression
        )
    if verify_ids:
        _verify_shard_files(lake, done, pred_key, b)
    schema_text = str(PREDICTION_SCHEMA)
    for entry in pred_files.values():
        entry["schema"] = schema_text
    reasons: Counter[str] = Counter()
    for m in done:
        reasons.update(m["reasons"])
    group_counts = (
        np.sum([m["group_counts"] for m in done], axis=0).astype(int) if done else np.zeros(NUM_GROUPS, int)
    )
    pixel_hist = (
        np.sum([m["pixel_hist"] for m in done], axis=0).astype(np.int64) if done else np.zeros(256, np.int64)
    )
    conf_hist = (
        np.sum([m["confidence_hist"] for m in done], axis=0).astype(int)
        if done
        else np.zeros(CONFIDENCE_BINS, int)
    )
    low = sum(m["low_confidence"] for m in done)
    common = {"batch_id": b, "batch_date": d.isoformat(), "model_version": v}

    # side partitions first (each one's manifest is its commit; independent, so in parallel),
    # stale ones from an earlier plan removed; the batch manifest below is the last write
    review = layout.review_key(d, v, b)
    review_files = dict(sorted(by_prefix.get(review, {}).items()))
    if not review_files:
        review_files[layout.EMPTY_PART] = _put(
            lake, f"{review}/{layout.EMPTY_PART}", PREDICTION_SCHEMA.empty_table(), opts.compression
        )
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
        (review, review_files, {**common, "confidence_threshold": opts.confidence_threshold}),
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
    _remove_stale_parts(lake, pred_key, set(pred_files))

    total_px = int(pixel_hist.sum())
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean = float((pixel_hist * levels).sum() / total_px) if total_px else None
    std = (
        float(np.sqrt(max((pixel_hist * levels**2).sum() / total_px - mean**2, 0.0)))
        if total_px and mean is not None
        else None
    )
    seconds = sum(m.get("timings", {}).get(k, 0.0) for m in done for k in ("read_decode", "predict", "write"))
    manifest_extra = {
        **common,
        "kind": "predictions",
        "inputs": batch.input_manifest(),
        "counts": {"records": records, "scored": scored, "quarantined": quarantined, "low_confidence": low},
        "reconciled": True,
        "reasons": dict(sorted(reasons.items())),
        "group_counts": {GROUP_KEYS[g]: int(group_counts[g]) for g in range(NUM_GROUPS)},
        "confidence_hist": {"bins": CONFIDENCE_BINS, "range": [0.0, 1.0], "counts": conf_hist.tolist()},
        "pixel_stats": {
            "mean": mean,
            "std": std,
            "frac_zero": float(pixel_hist[0] / total_px) if total_px else None,
            "hist": pixel_hist.tolist(),
        },
        "shards": len(shards),
        "runtimes": sorted({m.get("runtime", "") for m in done}),
        "shard_seconds": round(seconds, 3),
        "confidence_threshold": opts.confidence_threshold,
        "partitions": {
            "by_group": [
                layout.group_key(d, g, v, b)
                for g in range(NUM_GROUPS)
                if layout.group_key(d, g, v, b) in by_prefix
            ],
            "needs_review": review,
            "embeddings": emb if emb in by_prefix else None,
            "quarantine": qkey if qkey in by_prefix else None,
        },
        **(extra or {}),
    }
    _commit_existing(lake, pred_key, pred_files, run_id, manifest_extra)  # the batch's commit point
    skipped = sum(1 for r in results or () if r.skipped)
    result = BatchResult(
        batch_id=b,
        batch_date=d,
        model_version=v,
        predictions_key=pred_key,
        records=records,
        scored=scored,
        quarantined=quarantined,
        reasons=dict(sorted(reasons.items())),
        group_counts=manifest_extra["group_counts"],
        low_confidence=low,
        shards=len(shards),
        shards_skipped=skipped,
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "batch %s (model %s) committed: %d records = %d scored + %d quarantined %s",
        b,
        v,
        records,
        scored,
        quarantined,
        dict(reasons) or "",
    )
    return result


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


def results_summary(results: Iterable[ShardResult]) -> dict[str, Any]:
    rs = list(results)
    return {
        "shards": len(rs),
        "skipped": sum(r.skipped for r in rs),
        "scored": sum(r.scored for r in rs),
        "quarantined": sum(r.quarantined for r in rs),
    }


ProgressFn = Callable[[ShardResult], None]

__all__ = [
    "BatchResult",
    "PREDICTION_SCHEMA",
    "QUARANTINE_SCHEMA",
    "ScoringError",
    "ScoringOptions",
    "ShardResult",
    "decode_image_column",
    "finalize_batch",
    "is_batch_committed",
    "prediction_table",
    "reset_batch",
    "score_shard",
]
