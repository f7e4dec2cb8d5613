"""Where a shard's inputs are read and decoded: the one place that turns input files into images.

:func:`read_shard` reads one shard's rows (whole Parquet row groups, the id and image columns only;
or the image files of an image shard) and decodes them with :func:`decode_image_column` (raw
pixels, encoded PNG/JPEG/..., or lists of numbers) into uint8 (N, 28, 28) images. Bad rows are not
errors: each becomes a quarantine record with a reason code (those below, the file-level ones of
:mod:`zalando.scoring.batch`, the decoding ones of :mod:`zalando.images`). A storage that does not
answer is a :class:`~zalando.errors.LakeError` (the task retries), never a quarantined row.

A quarantine record keeps evidence, never a payload: the reason, the input's size and sha256, and
its first bytes (at most ``keep_rejected_bytes``, 64 KiB) only when the input claims to be an image
(:func:`claims_image`: a signature and a header Pillow can read) or is 784 raw pixels of a Parquet
image column. A text file, HTML named .jpg or a corrupt Parquet file is never stored.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from zalando.data.arrays import IMAGE_BYTES
from zalando.errors import DataError, LakeError
from zalando.images import ImagePrepConfig, ImageRejected, decode_image, sniff_format
from zalando.lake import Lake, storage_fault_is_transient
from zalando.scoring.batch import (
    CORRUPT_PARQUET,
    DUPLICATE_ID,
    ID_COLUMN,
    IMAGE_COLUMN,
    ShardRef,
    image_id_for_file,
)
from zalando.scoring.locations import open_input

# row-level reason codes (image decoding adds zalando.images' codes)
MISSING_ID = "missing_id"
MISSING_IMAGE = "missing_image"
NAN_VALUES = "nan_values"
OUT_OF_RANGE = "out_of_range"
WRONG_SHAPE = "wrong_shape"
INPUT_CHANGED = "input_changed"
UNREADABLE = "unreadable"

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


def read_shard(lake: Lake, ref: ShardRef, cfg: ImagePrepConfig, keep_rejected_bytes: int) -> ShardInput:
    """Read and decode one shard's inputs; bad rows become quarantine records, never errors.

    ``keep_rejected_bytes``: at most this many first bytes of a rejected input that claims to be an
    image are kept in its quarantine record (:class:`Evidence`).
    Raises :class:`LakeError` when the storage does not answer (a retry may succeed).
    """
    if ref.kind == "parquet":
        return _read_parquet_shard(lake, ref, cfg, keep_rejected_bytes)
    if ref.kind == "images":
        return _read_image_shard(lake, ref, cfg, keep_rejected_bytes)
    return _read_bad_file(ref)


class ShardInput:
    """What a shard read: ids, images, which rows are usable, and the quarantine records.

    A reader other than :func:`read_shard` (the catalogue's) may also leave records out whose last
    score stands (``unchanged_ids``: neither scored nor quarantined, counted in the marker), and give
    ``annotate``: called with the prediction table of the usable rows and their indices into this
    input, it returns that table with more of its columns filled (same schema, same rows).
    """

    def __init__(self, n: int) -> None:
        self.ids: list[str | None] | pa.Array = []
        self.images = np.zeros((n, 28, 28), np.uint8)
        self.ok = np.ones(n, bool)
        self.rows = np.arange(n, dtype=np.int64)
        self.sources: list[str] = []
        self.quarantine: list[dict[str, Any]] = []
        self.unchanged_ids: list[str] = []
        self.annotate: Callable[[pa.Table, np.ndarray], pa.Table] | None = None
        self.timings: dict[str, float] = {}  # a reader's own parts of read_decode (the catalogue's fetch)

    def reject(
        self,
        i: int,
        image_id: str | None,
        source: str,
        row: int,
        reason: str,
        detail: str,
        evidence: Evidence | None = None,
    ) -> None:
        self.ok[i] = False
        ev = evidence or Evidence()
        self.quarantine.append(
            {
                "image_id": image_id,
                "source": source,
                "row": row,
                "reason": reason,
                "detail": detail,
                "image": ev.head,
                "size": ev.size,
                "sha256": ev.sha256,
            }
        )


class Evidence:
    """What a quarantine record keeps of a rejected input: size, sha256, and (images only) its head."""

    __slots__ = ("head", "sha256", "size")

    def __init__(self, size: int | None = None, sha256: str | None = None, head: bytes | None = None) -> None:
        self.size = size
        self.sha256 = sha256
        self.head = head

    @classmethod
    def of(cls, blob: bytes, cap: int, *, raw_pixels: bool = False) -> Evidence:
        """Size and sha256 of blob; its first ``cap`` bytes only when it claims to be an image, or
        is 784 raw pixels of a Parquet image column (``raw_pixels``)."""
        keep = cap > 0 and ((raw_pixels and len(blob) == IMAGE_BYTES) or claims_image(blob))
        return cls(len(blob), hashlib.sha256(blob).hexdigest(), blob[:cap] if keep else None)


def claims_image(blob: bytes) -> bool:
    """True when blob starts like an image file: a known signature and a header Pillow can read
    (the pixels need not decode: a truncated PNG claims to be one)."""
    if sniff_format(blob[:16]) is None:
        return False
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            Image.open(io.BytesIO(blob))  # lazy: the header only
        except Image.DecompressionBombError:
            return True  # a header, declaring too many pixels
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return False
    return True


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
                raise LakeError(
                    f"input {uri}: storage fault while reading ({_detail(e2)})",
                    transient=storage_fault_is_transient(e2),
                ) from None
            if info.type != pafs.FileType.File:
                raise _Unreadable(INPUT_CHANGED, "the file is gone since the batch was planned") from None
    assert err is not None
    raise _Unreadable(CORRUPT_PARQUET, _detail(err))


def _read_parquet_shard(
    lake: Lake, ref: ShardRef, cfg: ImagePrepConfig, keep_rejected_bytes: int
) -> ShardInput:
    n = ref.records
    out = ShardInput(n)
    out.rows = np.arange(ref.row_start, ref.row_end, dtype=np.int64)
    assert ref.uri is not None
    fs, path = open_input(ref.uri, lake)
    try:
        table = _read_or_classify(lambda: _read_rows(fs, path, ref), fs, path, ref.uri)
    except _Unreadable as e:
        # corrupt pages (read twice, the file still there): every row of the shard goes to quarantine
        detail = f"{ref.name} rows {ref.row_start}..{ref.row_end}: {e.detail}"
        ids = _try_ids(fs, path, ref)
        out.ids = ids
        whole_file = Evidence(ref.size, ref.sha256)  # the evidence is the file; its bytes are not an image
        for i in range(n):
            out.reject(i, ids[i], ref.uri, int(out.rows[i]), e.reason, detail, whole_file)
        return out
    ids_col = table.column(ID_COLUMN).combine_chunks()
    if not pa.types.is_string(ids_col.type):
        ids_col = ids_col.cast(pa.string())
    image_col = table.column(IMAGE_COLUMN).combine_chunks()
    out.ids = ids_col
    images, bad = decode_image_column(image_col, cfg, source=ref.name or "", row_offset=ref.row_start)
    out.images = images
    _reject_bad_rows(out, ref, ids_col, image_col, bad, keep_rejected_bytes)
    return out


def _read_rows(fs: Any, path: str, ref: ShardRef) -> pa.Table:
    """The shard's rows of the id and image columns, reading only the row groups that hold them."""
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
    return table.slice(ref.row_start - (first_row or 0), ref.records)


def _reject_bad_rows(
    out: ShardInput,
    ref: ShardRef,
    ids_col: pa.Array,
    image_col: pa.Array,
    bad: list[tuple[int, str, str]],
    keep_rejected_bytes: int,
) -> None:
    """Quarantine the rows that cannot be scored: duplicate ids, missing ids, undecodable images."""
    bad_by_row = {i: (reason, detail) for i, reason, detail in bad}
    missing_id = np.flatnonzero(
        ~pc.fill_null(pc.greater(pc.utf8_length(ids_col), 0), False).to_numpy(zero_copy_only=False)
    )
    dups = {r - ref.row_start for r in ref.duplicate_rows}
    if not (bad_by_row or dups or missing_id.size):
        return
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
        evidence = _row_evidence(image_col, i, keep_rejected_bytes)
        out.reject(i, image_id, ref.uri or "", ref.row_start + i, reason, detail, evidence)


def _row_evidence(image_col: pa.Array, i: int, cap: int) -> Evidence:
    """A Parquet row's evidence: its image value's size and sha256 (lists: of their values' bytes),
    and its first bytes when it is an image file or 784 raw pixels."""
    value = image_col[i]
    if not value.is_valid:
        return Evidence(0)
    t = image_col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return Evidence.of(value.as_py(), cap, raw_pixels=True)
    values = value.values  # a list of numbers: never kept, only measured
    if values.null_count:
        values = values.fill_null(0)
    data = values.to_numpy(zero_copy_only=False).tobytes()
    return Evidence(len(data), hashlib.sha256(data).hexdigest())


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


def _read_image_shard(
    lake: Lake, ref: ShardRef, cfg: ImagePrepConfig, keep_rejected_bytes: int
) -> ShardInput:
    n = len(ref.files)
    out = ShardInput(n)
    ids: list[str | None] = []
    dups = set(ref.duplicate_rows)
    for i, (name, uri, sha) in enumerate(ref.files):
        image_id = image_id_for_file(name)
        ids.append(image_id)
        fs, path = open_input(uri, lake)
        try:
            info = fs.get_file_info(path)
        except OSError as e:  # the storage, not the file: let the task retry
            raise LakeError(
                f"input {uri}: storage fault ({_detail(e)})", transient=storage_fault_is_transient(e)
            ) from None
        planned = Evidence(info.size, sha)  # what describe_batch measured: no need to read it again
        if i in dups:
            detail = f"{name}: image_id {image_id!r} already appears earlier in the batch"
            out.reject(i, image_id, uri, 0, DUPLICATE_ID, detail, planned)
            continue
        if info.type != pafs.FileType.File:
            out.reject(i, image_id, uri, 0, INPUT_CHANGED, f"{name}: gone since the batch was planned")
            continue
        if (info.size or 0) > cfg.max_bytes:
            detail = f"{name}: {info.size} bytes > max_bytes {cfg.max_bytes}"
            head = _read_head(fs, path, keep_rejected_bytes)
            planned.head = head if head and claims_image(head) else None
            out.reject(i, image_id, uri, 0, "too_large", detail, planned)
            continue

        def read_all(fs: Any = fs, path: str = path) -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read()

        try:
            blob = _read_or_classify(read_all, fs, path, uri)
        except _Unreadable as e:
            reason = e.reason if e.reason != CORRUPT_PARQUET else UNREADABLE
            out.reject(i, image_id, uri, 0, reason, f"{name}: {e.detail}", planned)
            continue
        evidence = Evidence.of(blob, keep_rejected_bytes)
        if sha is not None and evidence.sha256 != sha:
            detail = f"{name}: content changed since the batch was planned"
            out.reject(i, image_id, uri, 0, INPUT_CHANGED, detail, evidence)
            continue
        try:
            out.images[i] = decode_image(blob, cfg, name=name)
        except ImageRejected as e:
            out.reject(i, image_id, uri, 0, e.reason, e.detail, evidence)
    out.ids = pa.array(ids, pa.string())
    out.rows = np.zeros(n, dtype=np.int64)
    return out


def _read_head(fs: Any, path: str, n: int) -> bytes | None:
    """The first n bytes of a file (evidence of a too-large one); None when it cannot be read."""
    if n <= 0:
        return None
    try:
        with fs.open_input_stream(path) as f:
            return f.read(n)
    except OSError:
        return None


def _read_bad_file(ref: ShardRef) -> ShardInput:
    """A whole unusable file (corrupt or wrong-schema Parquet, zero bytes): one record, its size and
    sha256; a Parquet file's bytes are not an image, so none are kept."""
    out = ShardInput(1)
    out.ids = pa.array([None], pa.string())
    evidence = Evidence(ref.size, ref.sha256)
    out.reject(0, None, ref.uri or "", -1, ref.error or UNREADABLE, ref.error_detail or "", evidence)
    return out
