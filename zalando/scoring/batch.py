"""Batches and shards: what is to be scored, cut into small serialisable references.

A *batch* is a location (a lake key, or an ``s3://`` / ``file://`` URI) holding Parquet files
(``image_id`` + ``image``) and/or image files (PNG, JPEG, ...). :func:`describe_batch` lists its
inputs once (sizes, sha256, Parquet row counts and row groups, file-level problems) and decides
the duplicate image ids (first occurrence in input order wins). :func:`plan_shards` cuts it into
:class:`ShardRef` objects: a few hundred bytes each (file URI + row range), never images.

A batch's location is a boundary, checked before anything is listed
(:mod:`zalando.scoring.locations`: the batch roots and buckets, no ``.`` or ``..`` segments):

* Inside a file-system batch **no symbolic link is ever followed**, not even one that points inside
  the batch: a link, FIFO, socket or device is listed (``lstat``), never opened, and becomes one
  quarantine record with reason ``not_regular_file``. Every open walks from ``/`` with ``O_NOFOLLOW``
  and reads regular files only, so a link or FIFO swapped in after planning is refused too.
* A batch without input files is an error naming the location, unless ``allow_empty``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import stat
from datetime import UTC, date, datetime
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from zalando.errors import LakeError
from zalando.lake import MANIFEST, Lake, validate_key
from zalando.lake.catalog import LakeCatalog
from zalando.scoring.localfs import NotRegularFile, walk, what_is
from zalando.scoring.locations import (
    BatchBoundary,
    Location,
    ScoringInputError,
    resolve_location,
)

log = logging.getLogger(__name__)

DEMO_SOURCE = "fashion-mnist-test"  # the demo batch: the raw_images table's test split

# reason codes of whole files (row-level ones live in zalando.scoring.inputs and zalando.images)
CORRUPT_PARQUET = "corrupt_parquet"
WRONG_SCHEMA = "wrong_schema"
EMPTY_FILE = "empty_file"
DUPLICATE_ID = "duplicate_id"
NOT_REGULAR_FILE = "not_regular_file"  # a link, FIFO, socket or device: listed, never opened

ID_COLUMN = "image_id"
IMAGE_COLUMN = "image"

_HASH_CHUNK = 8 * 1024 * 1024


# ------------------------------------------------------------------------------------ batch model


class InputFile(BaseModel):
    """One file of a batch, as found when the batch was described."""

    model_config = ConfigDict(frozen=True)

    name: str  # path relative to the batch location
    uri: str
    kind: Literal["parquet", "image"]
    size: int
    sha256: str | None = None
    rows: int | None = None  # Parquet rows (None when the footer is unreadable); 1 for an image file
    row_groups: tuple[int, ...] = ()  # rows per row group (Parquet)
    error: str | None = None  # reason code when the whole file is unusable
    error_detail: str | None = None

    @property
    def records(self) -> int:
        """Input records this file counts for: its rows, or 1 when the whole file is unusable."""
        if self.error is not None or self.kind == "image":
            return 1
        return int(self.rows or 0)


class Batch(BaseModel):
    """A described batch: id, date, source and every input file (the batch's input manifest)."""

    batch_id: str
    batch_date: date
    source: str  # the slug in the id
    location: str  # as given
    location_uri: str
    inputs: list[InputFile]
    # input index -> rows in that file whose image_id appeared earlier in the batch
    duplicates: dict[int, list[int]] = Field(default_factory=dict)
    described_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def records(self) -> int:
        return sum(f.records for f in self.inputs)

    @property
    def duplicate_count(self) -> int:
        return sum(len(v) for v in self.duplicates.values())

    def input_manifest(self) -> dict:
        """The manifest of inputs recorded in the batch manifest: files, sizes, sha256, rows."""
        return {
            "location": self.location_uri,
            "files": [
                {k: v for k, v in f.model_dump().items() if k not in ("row_groups",) and v is not None}
                for f in self.inputs
            ],
            "records": self.records,
            "duplicates": self.duplicate_count,
        }


class ShardTarget(BaseModel):
    """Where one shard's outputs go: deterministic for one plan (a retried shard rewrites its own
    files), new for every plan (a committed file is never rewritten in place). Set by the driver."""

    model_config = ConfigDict(frozen=True)

    write_id: str  # the plan that chose these names
    predictions: str  # lake key of the shard's predictions data file (under the table's data/)
    quarantine: str  # lake key of its quarantine data file
    embeddings: str  # lake key of its embedding sample (a plain object)


class ShardRef(BaseModel):
    """A small, serialisable reference to a slice of a batch: what a worker is handed."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    batch_date: date
    shard_id: int
    num_shards: int
    kind: Literal["parquet", "images", "bad_file", "catalogue"]
    # parquet: one file and a row range; images: a list of files; bad_file: the file and its problem;
    # catalogue: a row range of a catalogue batch's products file (zalando.catalogue.scoring reads it)
    uri: str | None = None
    name: str | None = None
    sha256: str | None = None
    size: int | None = None  # parquet and bad_file: the file's bytes (quarantine evidence)
    row_start: int = 0
    row_end: int = 0
    files: tuple[tuple[str, str, str | None], ...] = ()  # images: (name, uri, sha256)
    duplicate_rows: tuple[int, ...] = ()  # parquet: absolute row numbers; images: indices into files
    error: str | None = None
    error_detail: str | None = None
    embedding_sample: int = 0  # rows of embeddings to keep for drift monitoring
    target: ShardTarget | None = None  # where its outputs go (prepare_batch sets it)

    @property
    def records(self) -> int:
        if self.kind in ("parquet", "catalogue"):
            return self.row_end - self.row_start
        if self.kind == "images":
            return len(self.files)
        return 1

    @property
    def fingerprint(self) -> str:
        """Changes whenever what this shard covers changes (inputs, rows, duplicates)."""
        payload = self.model_dump(mode="json", exclude={"num_shards", "embedding_sample", "target"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------ ids


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:60].strip("-") or "batch"


def default_source_slug(location: str) -> str:
    """The last meaningful segments of a location: 'incoming/shop-a/day=3' -> 'shop-a-3'; a split of
    the raw_images table (``<ns>/raw_images/data/split=test``) -> 'fashion-mnist-test'."""
    path = urlparse(location).path if "://" in location else location
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[1:3] == ["raw_images", "data"] and parts[3].startswith("split="):
        return slugify(f"fashion-mnist-{parts[3].split('=', 1)[1]}")
    segs = [s.split("=", 1)[-1] for s in parts if s]
    segs = [s for s in segs if s not in ("raw", "lake", "batches", "incoming")]
    return slugify("-".join(segs[-2:]) if segs else "batch")


def make_batch_id(batch_date: date, source: str) -> str:
    """``<YYYY-MM-DD>-<source slug>``: the same date and source always give the same id."""
    return f"{batch_date.isoformat()}-{slugify(source)}"


# ------------------------------------------------------------------------------------ describe


def _sha256_of(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# a listed entry: (name, size, why it is refused or None)
_Entry = tuple[str, int, str | None]


def _refusal(name: str, what: str) -> str:
    return f"{name}: {what}; a batch reads regular files only and never follows a symbolic link"


def _list_files(
    lake: Lake, loc: Location, catalog: LakeCatalog | None = None
) -> tuple[list[_Entry], dict[str, str]]:
    """The batch's entries (name, size, refusal), and sha256 known from a lake manifest."""
    known: dict[str, str] = {}
    if loc.lake_key is not None and (table_files := _table_files(lake, loc, catalog)) is not None:
        return table_files, known
    if loc.lake_key is not None and lake.is_committed(loc.lake_key):
        # a committed lake partition: only the files its manifest lists, with their checksums
        manifest = lake.read_manifest(loc.lake_key)
        out: list[_Entry] = []
        for name, entry in sorted(manifest["files"].items()):
            try:
                validate_key(name)
            except LakeError:
                raise ScoringInputError(
                    f"batch location {loc.uri}: its manifest names {name!r}, a path that leaves the batch "
                    "('..', absolute or odd characters)"
                ) from None
            out.append((name, int(entry["bytes"]), None))
            known[name] = entry["sha256"]
        return out, known
    if loc.local:
        return _list_local(loc), known
    sel = pafs.FileSelector(loc.root, recursive=True, allow_not_found=True)
    try:
        infos = loc.fs.get_file_info(sel)
    except OSError as e:
        raise ScoringInputError(f"batch location {loc.uri}: cannot list ({e})") from None
    n = len(loc.root) + 1
    out = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        name = i.path[n:]
        if any(seg.startswith((".", "_")) for seg in name.split("/")):
            continue  # hidden files, manifests, markers
        out.append((name, int(i.size or 0), None))
    return sorted(out), known


def _table_files(lake: Lake, loc: Location, catalog: LakeCatalog | None) -> list[_Entry] | None:
    """A folder inside an Iceberg table of the lake: only the data files the table's current snapshot
    holds under it (never a replaced, failed or uncommitted file beside them); None for other keys
    (and for a lake without a catalog, which has no tables)."""
    from zalando.lake.commit import live_data_files, table_folder_of

    if catalog is None and not lake.has_catalog:
        return None
    cat = catalog or lake.catalog()
    prefix = (loc.lake_key or "").strip("/")
    table = table_folder_of(cat, prefix)
    if table is None:
        return None
    n = len(prefix) + 1
    return [
        (key[n:], size, None) for key, size, _ in live_data_files(cat, table) if key.startswith(prefix + "/")
    ]


def _list_local(loc: Location) -> list[_Entry]:
    """A local folder's entries, listed without following links (lstat); links, FIFOs, sockets and
    devices are kept as refused entries, so the batch says what it did not read."""
    try:
        entries = list(walk(loc.root))
    except FileNotFoundError:
        if loc.lake_key is not None:
            return []  # a lake prefix with nothing in it, as on S3
        raise ScoringInputError(f"batch location {loc.uri}: does not exist") from None
    except OSError as e:
        raise ScoringInputError(f"batch location {loc.uri}: cannot list ({e})") from None
    out: list[_Entry] = []
    for name, st in entries:
        if stat.S_ISREG(st.st_mode):
            out.append((name, int(st.st_size), None))
        else:
            out.append((name, 0, _refusal(name, what_is(st.st_mode))))
    return out


def _describe_parquet(
    fs: pafs.FileSystem, path: str, name: str, uri: str, size: int, sha: str | None
) -> tuple[InputFile, pa.Array | None]:
    """The InputFile of a Parquet file, and its image_id column (for duplicate detection)."""
    base = {"name": name, "uri": uri, "kind": "parquet", "size": size, "sha256": sha}
    if size == 0:
        return InputFile(**base, error=EMPTY_FILE, error_detail=f"{name}: zero bytes"), None
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            schema = pf.schema_arrow
            row_groups = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
            problem = _schema_problem(schema)
            if problem:
                return InputFile(
                    **base,
                    rows=md.num_rows,
                    row_groups=row_groups,
                    error=WRONG_SCHEMA,
                    error_detail=f"{name}: {problem}",
                ), None
            ids = pf.read(columns=[ID_COLUMN]).column(ID_COLUMN)
    except (OSError, pa.ArrowException, ValueError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        return InputFile(**base, error=CORRUPT_PARQUET, error_detail=f"{name}: {detail[:300]}"), None
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if not pa.types.is_string(ids.type):
        ids = ids.cast(pa.string())
    return InputFile(**base, rows=md.num_rows, row_groups=row_groups), ids


def _schema_problem(schema: pa.Schema) -> str | None:
    names = schema.names
    if ID_COLUMN not in names or IMAGE_COLUMN not in names:
        return f"needs columns {ID_COLUMN!r} and {IMAGE_COLUMN!r}, has {names}"
    id_type = schema.field(ID_COLUMN).type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
        return f"column {ID_COLUMN!r} must be a string (or integer), is {id_type}"
    t = schema.field(IMAGE_COLUMN).type
    ok_binary = pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
    ok_list = (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
        pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)
    )
    if not (ok_binary or ok_list):
        return (
            f"column {IMAGE_COLUMN!r} must be binary (784 pixels or image bytes) or a list of numbers, is {t}"
        )
    return None


def describe_batch(
    lake: Lake,
    location: str,
    *,
    batch_date: date | str | None = None,
    source: str | None = None,
    hash_inputs: bool = True,
    allow_empty: bool = False,
    boundary: BatchBoundary | None = None,
    catalog: LakeCatalog | None = None,
) -> Batch:
    """List a batch's inputs (sizes, sha256, row counts, file problems) and pick its duplicate ids.

    Reads Parquet footers and ``image_id`` columns only. ``source`` defaults to the location's
    last segments (the demo batch: ``fashion-mnist-test``); ``batch_date`` to today (UTC).
    A location outside the boundary (:func:`resolve_location`) is refused before anything is read;
    one without input files is a :class:`ScoringInputError` unless ``allow_empty`` (a file://
    folder must exist even then). Links, FIFOs, sockets and devices of a local folder are inputs
    with the error ``not_regular_file``: never opened, each one quarantine record.
    """
    loc = resolve_location(lake, location, boundary)
    if loc.fs.get_file_info(loc.root).type == pafs.FileType.File:  # a single file: its folder, one input
        parent, _, base = loc.root.rpartition("/")
        loc = Location(loc.fs, parent, loc.uri.rsplit("/", 1)[0], None, loc.local)
        files: list[_Entry] = [(base, int(loc.fs.get_file_info(loc.path(base)).size or 0), None)]
        known_sha: dict[str, str] = {}
    else:
        files, known_sha = _list_files(lake, loc, catalog)
    if not files and not allow_empty:
        named = location if location == loc.uri else f"{location} ({loc.uri})"
        raise ScoringInputError(
            f"batch location {named}: no input files (a batch that may be empty: --allow-empty, "
            "or allow_empty=True)"
        )
    bdate = _as_date(batch_date)
    slug = slugify(source) if source else default_source_slug(location)
    inputs: list[InputFile] = []
    id_arrays: list[tuple[int, pa.Array]] = []
    for name, size, refused in files:
        f, ids = _describe_input(loc, name, size, refused, known_sha.get(name), hash_inputs)
        if ids is not None:
            id_arrays.append((len(inputs), ids))
        inputs.append(f)
    duplicates = _find_duplicates(id_arrays)
    batch = Batch(
        batch_id=make_batch_id(bdate, slug),
        batch_date=bdate,
        source=slug,
        location=location,
        location_uri=loc.uri,
        inputs=inputs,
        duplicates=duplicates,
    )
    log.info(
        "batch %s: %d files, %d records, %d duplicate ids, %d unusable files",
        batch.batch_id,
        len(inputs),
        batch.records,
        batch.duplicate_count,
        sum(f.error is not None for f in inputs),
    )
    return batch


def has_inputs(lake: Lake, location: str) -> bool:
    """Whether a location holds at least one input (a missing folder holds none): a backfill skips
    the days without. The boundary is checked as for :func:`describe_batch`."""
    loc = resolve_location(lake, location)
    info = loc.fs.get_file_info(loc.root)
    if info.type == pafs.FileType.File:
        return True
    if loc.local and loc.lake_key is None and info.type == pafs.FileType.NotFound:
        return False
    return bool(_list_files(lake, loc)[0])


def _describe_input(
    loc: Location, name: str, size: int, refused: str | None, sha: str | None, hash_inputs: bool
) -> tuple[InputFile, pa.Array | None]:
    """One entry's InputFile, and its image ids (None when the whole file is unusable)."""
    path, uri = loc.path(name), loc.file_uri(name)
    kind: Literal["parquet", "image"] = "parquet" if name.lower().endswith(".parquet") else "image"
    if refused is None and sha is None and hash_inputs and size > 0:
        try:
            sha = _sha256_of(loc.fs, path)
        except NotRegularFile as e:  # replaced by a link or a FIFO since it was listed
            refused = _refusal(name, e.what)
        except OSError as e:
            raise ScoringInputError(f"batch input {uri}: cannot read ({e})") from None
    if refused is not None:
        return InputFile(
            name=name, uri=uri, kind=kind, size=0, error=NOT_REGULAR_FILE, error_detail=refused
        ), None
    if kind == "parquet":
        return _describe_parquet(loc.fs, path, name, uri, size, sha)
    image = InputFile(name=name, uri=uri, kind="image", size=size, sha256=sha, rows=1)
    return image, pa.array([image_id_for_file(name)], pa.string())


def image_id_for_file(name: str) -> str:
    """An image file's id: its path in the batch without the extension ('shoes/a.png' -> 'shoes/a')."""
    stem, dot, ext = name.rpartition(".")
    return stem if dot and "/" not in ext else name


def _find_duplicates(id_arrays: list[tuple[int, pa.Array]]) -> dict[int, list[int]]:
    """Rows whose (non-null) id appeared earlier in input order, per input index."""
    if not id_arrays:
        return {}
    lengths = np.array([len(a) for _, a in id_arrays], dtype=np.int64)
    if lengths.sum() == 0:
        return {}
    all_ids = pa.chunked_array([a for _, a in id_arrays], type=pa.string())
    valid = len(all_ids) - all_ids.null_count
    if pc.count_distinct(all_ids, mode="only_valid").as_py() == valid:
        return {}  # the usual case, decided without leaving Arrow
    all_ids = all_ids.combine_chunks()
    import pandas as pd

    s = pd.Series(all_ids.to_numpy(zero_copy_only=False), dtype=object)
    dup = s.duplicated(keep="first").to_numpy() & s.notna().to_numpy()
    if not dup.any():
        return {}
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out: dict[int, list[int]] = {}
    for (idx, _), start, n in zip(id_arrays, starts, lengths, strict=True):
        rows = np.flatnonzero(dup[start : start + n])
        if rows.size:
            out[idx] = [int(r) for r in rows]
    return out


def _as_date(value: date | str | None) -> date:
    if value is None:
        return datetime.now(UTC).date()
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ScoringInputError(f"batch date {value!r}: expected YYYY-MM-DD") from None


# ------------------------------------------------------------------------------------ shards


def plan_shards(
    batch: Batch,
    shard_size: int = 10_000,
    *,
    image_shard_size: int | None = None,
    embedding_sample: int = 2048,
) -> list[ShardRef]:
    """Cut a batch into shards of at most ``shard_size`` rows (images files: ``image_shard_size`` files).

    Parquet shards follow row-group boundaries when they can, so a shard reads whole row groups
    only. Deterministic: the same batch and sizes always give the same shards (ids 0..n-1).
    """
    if shard_size < 1:
        raise ScoringInputError(f"shard size must be >= 1, got {shard_size}")
    img_size = image_shard_size or min(shard_size, 256)
    specs: list[dict] = []
    pending_images: list[tuple[str, str, str | None]] = []
    pending_dups: list[int] = []

    def flush_images() -> None:
        if pending_images:
            specs.append(
                {"kind": "images", "files": tuple(pending_images), "duplicate_rows": tuple(pending_dups)}
            )
            pending_images.clear()
            pending_dups.clear()

    for idx, f in enumerate(batch.inputs):
        dups = batch.duplicates.get(idx, [])
        if f.kind == "image" and f.error is None:
            if dups:
                pending_dups.append(len(pending_images))
            pending_images.append((f.name, f.uri, f.sha256))
            if len(pending_images) >= img_size:
                flush_images()
            continue
        if f.error is not None:  # unusable as a whole (a Parquet problem, or not a regular file)
            specs.append(
                {
                    "kind": "bad_file",
                    "uri": f.uri,
                    "name": f.name,
                    "sha256": f.sha256,
                    "size": f.size,
                    "error": f.error,
                    "error_detail": f.error_detail,
                }
            )
            continue
        dup_arr = np.asarray(dups, dtype=np.int64)
        for start, end in _row_ranges(f.row_groups or ((f.rows or 0),), shard_size):
            in_range = dup_arr[(dup_arr >= start) & (dup_arr < end)]
            specs.append(
                {
                    "kind": "parquet",
                    "uri": f.uri,
                    "name": f.name,
                    "sha256": f.sha256,
                    "size": f.size,
                    "row_start": start,
                    "row_end": end,
                    "duplicate_rows": tuple(int(r) for r in in_range),
                }
            )
    flush_images()
    n = len(specs)
    per_shard = -(-embedding_sample // n) if n and embedding_sample > 0 else 0
    return [
        ShardRef(
            batch_id=batch.batch_id,
            batch_date=batch.batch_date,
            shard_id=i,
            num_shards=n,
            embedding_sample=per_shard,
            **spec,
        )
        for i, spec in enumerate(specs)
    ]


def _row_ranges(row_groups: tuple[int, ...], shard_size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most shard_size rows, cut at row-group boundaries where possible."""
    ranges: list[tuple[int, int]] = []
    start = pos = 0
    for rg in row_groups:
        if rg == 0:
            continue
        if pos + rg - start > shard_size and pos > start:
            ranges.append((start, pos))
            start = pos
        end_rg = pos + rg
        while end_rg - start > shard_size:  # a row group bigger than a shard: split it
            ranges.append((start, start + shard_size))
            start += shard_size
        pos = end_rg
    if pos > start:
        ranges.append((start, pos))
    return ranges


def find_demo_batch(lake: Lake) -> str:
    """The demo batch: the folder of the raw_images table's test split (the Fashion-MNIST test images
    ingest committed), as a lake key. Scoring it reads exactly the table's current files there."""
    from zalando.data.ingest import RAW_TABLE, raw_split_files
    from zalando.lake.tables import table_location_key

    cat = lake.catalog()
    files = raw_split_files(lake, "test")
    if not files:
        raise ScoringInputError(
            f"demo batch: the table {cat.identifier(RAW_TABLE)} of {lake.uri()} holds no test split: "
            "run `zalando ingest` (or `make run`) first"
        )
    folder = f"{table_location_key(cat, RAW_TABLE)}/data/split=test"
    if not all(key.startswith(folder + "/") for key, _, _ in files):
        raise ScoringInputError(
            f"demo batch: the test split's data files of {cat.identifier(RAW_TABLE)} are not all under "
            f"{lake.uri(folder)}; score them by naming their folder"
        )
    return folder


__all__ = [
    "NOT_REGULAR_FILE",
    "Batch",
    "BatchBoundary",
    "DEMO_SOURCE",
    "InputFile",
    "Location",
    "MANIFEST",
    "ScoringInputError",
    "ShardRef",
    "ShardTarget",
    "describe_batch",
    "find_demo_batch",
    "has_inputs",
    "make_batch_id",
    "plan_shards",
    "resolve_location",
]
