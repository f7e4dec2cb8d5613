"""Commit primitives on the lake's Iceberg tables, scans with time travel, and maintenance.

Every commit is one atomic Iceberg commit: readers (ours, DuckDB, Spark, a plain pyarrow scan
through the catalog) see all of it or nothing. A commit that loses a race against a concurrent
writer is retried on the fresh snapshot (pyiceberg retries first, then :meth:`LakeCatalog.commit`
redoes the whole operation on a freshly loaded table), so nothing is lost and a partition replace
still leaves exactly the replacing rows. Each commit carries a ``zalando.commit-id`` snapshot
property: a retry after an ambiguous failure first looks for it, and never commits twice.

Shard files: a shard writes its rows with :func:`write_data_file` under :func:`data_file_key`
(deterministic for one run, so a retried shard overwrites its own uncommitted file; it needs the
lake and the table's schema, not the catalog); the batch's finalize then commits them all with
:func:`add_data_files`, replacing the batch's earlier rows in the same commit. Until then no
Iceberg reader sees them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from zalando.errors import LakeError
from zalando.lake import Lake, table_to_parquet_bytes, validate_key
from zalando.lake.catalog import LakeCatalog, storage_path
from zalando.lake.tables import (
    TABLES,
    check_schema,
    conform,
    ensure_table,
    load_table,
    table_location_key,
    table_spec,
    to_app_schema,
)

log = logging.getLogger(__name__)

COMMIT_ID = "zalando.commit-id"
OPERATION = "zalando.operation"

Filter = str | Mapping[str, Any] | Any  # a mapping column -> value, a pyiceberg expression or its text


@dataclass(frozen=True)
class CommitResult:
    """What one commit did: its last snapshot, rows and files added / deleted, and the attempts it took."""

    table: str
    operation: str
    snapshot_id: int | None
    added_rows: int
    deleted_rows: int
    added_files: int
    attempts: int
    seconds: float


# ---------------------------------------------------------------------------------------------- filters


def row_filter(flt: Filter | None) -> Any:
    """A pyiceberg expression: None -> everything; {"batch_id": "b1", ...} -> an AND of equalities
    (None -> IS NULL, a date -> its ISO text); a string is parsed by pyiceberg."""
    from pyiceberg.expressions import AlwaysTrue, And, EqualTo, IsNull
    from pyiceberg.expressions.parser import parse

    if flt is None:
        return AlwaysTrue()
    if isinstance(flt, Mapping):
        if not flt:
            raise LakeError("row filter: an empty mapping selects nothing; give column=value pairs")
        terms = [IsNull(c) if v is None else EqualTo(c, _literal(v)) for c, v in flt.items()]
        return terms[0] if len(terms) == 1 else And(*terms)
    if isinstance(flt, str):
        try:
            return parse(flt)
        except Exception as e:  # noqa: BLE001 - pyiceberg's parser raises its own errors
            raise LakeError(f"row filter {flt!r}: {str(e).splitlines()[0]}") from None
    return flt


def _literal(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, date):
        return v.isoformat()
    return v


def _rows_outside(data: pa.Table, flt: Filter, schema: Any) -> int:
    """How many rows of data the filter does not select (a replace must only hold its own rows)."""
    if isinstance(flt, Mapping):
        mask = None
        for c, v in flt.items():
            if c not in data.column_names:
                return data.num_rows
            col = data.column(c)
            m = pc.is_null(col) if v is None else pc.equal(col, pa.scalar(v).cast(col.type))
            m = pc.fill_null(m, False)
            mask = m if mask is None else pc.and_(mask, m)
        return data.num_rows - pc.sum(mask).as_py() if data.num_rows else 0
    from pyiceberg.expressions.visitors import bind
    from pyiceberg.io.pyarrow import expression_to_pyarrow

    expr = expression_to_pyarrow(bind(schema, row_filter(flt), case_sensitive=True), schema)
    return data.num_rows - data.filter(expr).num_rows


# ---------------------------------------------------------------------------------------------- commits


def _commit(
    cat: LakeCatalog,
    name: str,
    operation: str,
    build: Callable[[Any, dict[str, str]], None],
    properties: Mapping[str, Any] | None,
) -> CommitResult:
    """Run build(table, snapshot_properties) on a freshly loaded table until it commits."""
    commit_id = uuid.uuid4().hex
    props = {COMMIT_ID: commit_id, OPERATION: operation}
    props.update({str(k): str(v) for k, v in (properties or {}).items()})
    attempts = 0
    t0 = time.perf_counter()

    def _once() -> Any:
        nonlocal attempts
        attempts += 1
        table = ensure_table(cat, name)
        if attempts > 1 and commit_snapshots(table, commit_id):
            log.info("%s of %s: an earlier attempt landed; not committing again", operation, name)
            return table
        build(table, props)
        return table

    table = cat.commit(f"{operation} {cat.identifier(name)}", _once)
    snaps = commit_snapshots(table, commit_id)

    def total(key: str) -> int:
        return sum(int(s.summary[key] or 0) for s in snaps)

    result = CommitResult(
        table=name,
        operation=operation,
        snapshot_id=snaps[-1].snapshot_id if snaps else None,
        added_rows=total("added-records"),
        deleted_rows=total("deleted-records"),
        added_files=total("added-data-files"),
        attempts=attempts,
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "%s %s: +%d rows (%d files), -%d rows, snapshot %s, %d attempt(s), %.2fs",
        operation, cat.identifier(name), result.added_rows, result.added_files, result.deleted_rows,
        result.snapshot_id, attempts, result.seconds,
    )  # fmt: skip
    return result


def commit_snapshots(table: Any, commit_id: str) -> list[Any]:
    """The snapshots one commit made (a replace makes a delete and an append), oldest first."""
    return [
        s for s in table.metadata.snapshots if s.summary is not None and s.summary[COMMIT_ID] == commit_id
    ]


def append(
    cat: LakeCatalog, table_name: str, data: pa.Table, *, properties: Mapping[str, Any] | None = None
) -> CommitResult:
    """Append rows (schema-checked) in one commit."""

    def build(table: Any, props: dict[str, str]) -> None:
        rows = conform(table.schema(), data, where=f"append to {cat.identifier(table_name)}")
        with table.transaction() as tx:
            tx.append(rows, snapshot_properties=props)

    return _commit(cat, table_name, "append", build, properties)


def replace_partition(
    cat: LakeCatalog,
    table_name: str,
    data: pa.Table,
    filter: Filter,
    *,
    properties: Mapping[str, Any] | None = None,
) -> CommitResult:
    """Replace every row the filter selects (e.g. ``{"batch_id": b, "model_version": v}``) by data,
    in one atomic overwrite. Every row of data must match the filter; an empty data deletes."""
    expr = _replace_filter(filter, table_name)
    where = f"replace in {cat.identifier(table_name)}"

    def build(table: Any, props: dict[str, str]) -> None:
        rows = conform(table.schema(), data, where=where)
        outside = _rows_outside(rows, filter, table.schema())
        if outside:
            raise LakeError(f"{where}: {outside} of {rows.num_rows} rows do not match the filter {filter!r}")
        with table.transaction() as tx, _quiet_empty_delete():
            tx.overwrite(rows, overwrite_filter=expr, snapshot_properties=props)

    return _commit(cat, table_name, "replace", build, properties)


@contextlib.contextmanager
def _quiet_empty_delete() -> Iterator[None]:
    """pyiceberg warns when a delete matches nothing: for a batch's first commit that is expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Delete operation did not match any records")
        yield


def _replace_filter(flt: Filter, table_name: str) -> Any:
    from pyiceberg.expressions import AlwaysTrue

    if flt is None or (isinstance(flt, str) and not flt.strip()):
        raise LakeError(
            f"replace in {table_name}: needs a filter (pass AlwaysTrue() to replace the whole table)"
        )
    return row_filter(flt) if not isinstance(flt, AlwaysTrue) else flt


def data_file_key(
    cat: LakeCatalog,
    table_name: str,
    *,
    run_id: str,
    shard_id: int,
    partition: Mapping[str, Any] | None = None,
) -> str:
    """The deterministic lake key of one shard's data file, under the table's ``data/`` folder:
    ``<ns>/<table>/data/<col=value/…>/run_id=<run_id>/part-<shard:05d>.parquet``.

    One run's retried shard writes the same key; another run gets other keys, so a committed file
    is never rewritten in place (snapshots that reference it stay readable).
    """
    if cat.kind == "sql":
        base = table_location_key(cat, table_name)
    else:
        location = ensure_table(cat, table_name).location()
        base = cat.key_of(location)
        if base is None:
            raise LakeError(
                f"iceberg table {cat.identifier(table_name)} lives at {location}, outside the lake"
            )
    segs = [f"{k}={_literal(v)}" for k, v in (partition or {}).items()]
    return validate_key(
        "/".join([base, "data", *segs, f"run_id={run_id}", f"part-{int(shard_id):05d}.parquet"])
    )


@dataclass(frozen=True)
class WrittenFile:
    """One data file written for a later commit: its key, size, sha256 (to tell later that nobody
    rewrote it) and rows."""

    key: str
    bytes: int
    sha256: str
    rows: int


def write_data_file(lake: Lake, key: str, data: pa.Table, *, schema: Any) -> WrittenFile:
    """Write one shard's rows as Parquet under key, for a later :func:`add_data_files`; not visible
    to any reader until then. Checked against and cast to ``schema``, the table's Iceberg schema
    (:func:`zalando.lake.tables.table_schema`, taken once by the driver): no catalog call here,
    so a shard on any worker can write."""
    rows = conform(schema, data, where=f"data file {lake.uri(key)}")
    payload = table_to_parquet_bytes(rows)
    lake.write_bytes(key, payload)
    return WrittenFile(key, len(payload), hashlib.sha256(payload).hexdigest(), rows.num_rows)


def add_data_files(
    cat: LakeCatalog,
    table_name: str,
    keys: Sequence[str],
    *,
    replace: Filter | None = None,
    properties: Mapping[str, Any] | None = None,
) -> CommitResult:
    """Commit Parquet files written earlier (lake keys or full URIs) as the table's data files, in
    one commit; with ``replace``, the rows that filter selects are deleted in the same commit.

    Each file's schema is checked first; its partition values are read from its column statistics,
    so a file must hold one value of each identity-partition column.
    """
    uris = [cat.uri_of(k) for k in keys]
    if len(set(uris)) != len(uris):
        raise LakeError(f"add files to {cat.identifier(table_name)}: the same file is listed twice")
    expr = _replace_filter(replace, table_name) if replace is not None else None

    def build(table: Any, props: dict[str, str]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(uris)))) as ex:  # footers, in parallel
            schemas = list(ex.map(lambda uri: _file_schema(table, uri), uris))
        for uri, schema in zip(uris, schemas, strict=True):
            check_schema(table.schema(), schema, where=f"data file {uri}")
        with table.transaction() as tx, _quiet_empty_delete():
            if expr is not None:
                tx.delete(expr, snapshot_properties=props)
            if uris:
                tx.add_files(uris, snapshot_properties=props)

    return _commit(cat, table_name, "add_files" if expr is None else "replace_files", build, properties)


def _file_schema(table: Any, uri: str) -> pa.Schema:
    try:
        with table.io.new_input(uri).open() as f:
            return pq.read_schema(f)
    except FileNotFoundError:
        raise LakeError(f"data file {uri} does not exist; write it before committing it") from None


# ---------------------------------------------------------------------------------------------- reads


def scan(
    cat: LakeCatalog,
    table_name: str,
    filter: Filter | None = None,
    *,
    columns: Sequence[str] | None = None,
    snapshot_id: int | None = None,
    as_of: datetime | int | str | None = None,
    limit: int | None = None,
) -> pa.Table:
    """Committed rows the filter selects, as of now, of a snapshot id, or of a moment (``as_of``:
    a datetime (naive = UTC), epoch milliseconds, an ISO timestamp, or a snapshot id as text).

    A table not created yet reads as empty. The columns come back with the spec's Arrow types.
    """
    table = load_table(cat, table_name)
    what = f"scan {cat.identifier(table_name)}"
    if table is None:
        if snapshot_id is not None or as_of is not None:
            raise LakeError(f"{what}: the table does not exist yet, so it has no history")
        empty = table_spec(table_name).schema.empty_table()
        return empty.select(list(columns)) if columns else empty
    sid = snapshot_id if snapshot_id is not None else resolve_as_of(table, as_of, what=what)
    if sid is not None and table.snapshot_by_id(sid) is None:
        raise LakeError(f"{what}: snapshot {sid} does not exist (never made, or expired by maintenance)")
    expr = row_filter(filter)
    fields = tuple(columns) if columns else ("*",)
    out = cat.call(
        what,
        lambda: table.scan(row_filter=expr, selected_fields=fields, snapshot_id=sid, limit=limit).to_arrow(),
    )
    return to_app_schema(table_name, out)


def resolve_as_of(table: Any, as_of: datetime | int | str | None, *, what: str = "as of") -> int | None:
    """The snapshot id current at as_of (None: the current one). A moment inside one of our commits
    (between a replace's delete and its append) resolves to that commit's last snapshot."""
    if as_of is None:
        return None
    if isinstance(as_of, str):
        text = as_of.strip()
        if text.isdigit():  # a snapshot id, else epoch milliseconds
            if table.snapshot_by_id(int(text)) is not None:
                return int(text)
            as_of = int(text)
        else:
            try:
                as_of = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise LakeError(f"{what}: {as_of!r} is neither an ISO timestamp nor a snapshot id") from None
    if isinstance(as_of, datetime):
        ms = int((as_of if as_of.tzinfo else as_of.replace(tzinfo=UTC)).timestamp() * 1000)
    else:
        ms = int(as_of)
    try:
        moment = datetime.fromtimestamp(ms / 1000, UTC).isoformat()
    except (OverflowError, OSError, ValueError):  # a number no clock reaches: a mistyped snapshot id
        raise LakeError(f"{what}: {as_of!r} is no snapshot of the table and no time") from None
    snap = table.snapshot_as_of_timestamp(ms)
    if snap is None:
        raise LakeError(f"{what}: no snapshot at or before {moment}")
    commit_id = snap.summary[COMMIT_ID] if snap.summary is not None else None
    if commit_id:
        later = [s for s in commit_snapshots(table, commit_id) if s.sequence_number > snap.sequence_number]
        if later:
            snap = later[-1]
    return snap.snapshot_id


def snapshot_log(cat: LakeCatalog, table_name: str) -> list[dict[str, Any]]:
    """The table's history, oldest first: snapshot id, when, operation, commit id, rows added / deleted."""
    table = load_table(cat, table_name)
    if table is None:
        return []
    out = []
    for entry in table.history():
        s = table.snapshot_by_id(entry.snapshot_id)
        if s is None:
            continue
        out.append(
            {
                "snapshot_id": s.snapshot_id,
                "committed_at": datetime.fromtimestamp(s.timestamp_ms / 1000, UTC),
                "operation": str(s.summary.operation.value) if s.summary else None,
                "commit_id": s.summary[COMMIT_ID] if s.summary else None,
                "zalando_operation": s.summary[OPERATION] if s.summary else None,
                "added_rows": int(s.summary["added-records"] or 0) if s.summary else 0,
                "deleted_rows": int(s.summary["deleted-records"] or 0) if s.summary else 0,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------- maintenance


@dataclass
class MaintenanceReport:
    """What ``maintain`` did per table: snapshots expired, orphan files removed (their lake keys)."""

    expired: dict[str, int] = field(default_factory=dict)
    orphans: dict[str, list[str]] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def orphan_count(self) -> int:
        return sum(len(v) for v in self.orphans.values())


def _cutoff(older_than: timedelta | datetime) -> datetime:
    if isinstance(older_than, timedelta):
        return datetime.now(UTC) - older_than
    return older_than if older_than.tzinfo else older_than.replace(tzinfo=UTC)


def _live_tables(cat: LakeCatalog, tables: Iterable[str] | None) -> list[str]:
    if tables is not None:
        return list(tables)
    listed = cat.call("list tables", lambda: cat.catalog.list_tables(cat.namespace))
    return sorted(ident[-1] for ident in listed)


def _load_any(cat: LakeCatalog, name: str) -> Any:
    return cat.call(
        f"load table {cat.identifier(name)}", lambda: cat.catalog.load_table(cat.identifier(name))
    )


def expire_snapshots(
    cat: LakeCatalog, older_than: timedelta | datetime, *, tables: Iterable[str] | None = None
) -> dict[str, int]:
    """Expire every snapshot older than the cutoff except each branch's head (the current one):
    time travel past the cutoff ends. Files only they referenced become orphans (see
    :func:`remove_orphan_files`). Returns the number expired per table."""
    cutoff_ms = int(_cutoff(older_than).timestamp() * 1000)
    out: dict[str, int] = {}
    for name in _live_tables(cat, tables):

        def _expire(name: str = name) -> int:
            table = _load_any(cat, name)
            heads = {ref.snapshot_id for ref in table.metadata.refs.values()}
            ids = [
                s.snapshot_id
                for s in table.metadata.snapshots
                if s.timestamp_ms < cutoff_ms and s.snapshot_id not in heads
            ]
            if ids:
                table.maintenance.expire_snapshots().by_ids(ids).commit()
            return len(ids)

        out[name] = cat.commit(f"expire snapshots of {cat.identifier(name)}", _expire)
    log.info("expired snapshots older than %s: %s", datetime.fromtimestamp(cutoff_ms / 1000, UTC), out)
    return out


def live_data_files(
    cat: LakeCatalog, table_name: str, flt: Filter | None = None
) -> list[tuple[str, int, int]]:
    """(lake key, bytes, rows) of every data file the table's current snapshot holds for the filter, in
    key order: what a reader of the table sees now, never a file of a failed or replaced commit that
    lies beside them in the table's folder."""
    t = load_table(cat, table_name)
    if t is None or t.current_snapshot() is None:
        return []
    tasks = cat.call(
        f"plan {cat.identifier(table_name)}", lambda: list(t.scan(row_filter=row_filter(flt)).plan_files())
    )
    out = []
    for task in tasks:
        key = cat.key_of(task.file.file_path)
        if key is None:
            raise LakeError(
                f"iceberg table {cat.identifier(table_name)}: data file {task.file.file_path} lies outside the lake"
            )
        out.append((key, int(task.file.file_size_in_bytes), int(task.file.record_count)))
    return sorted(out)


def table_folder_of(cat: LakeCatalog, key: str) -> str | None:
    """The table whose folder holds a lake key, or None (a SQL catalog keeps every table at
    ``<namespace>/<table>``; another catalog says where, so its existing tables are asked)."""
    key = key.strip("/")
    for name in TABLES:
        if cat.kind == "sql":
            folder: str | None = table_location_key(cat, name)
        else:
            t = load_table(cat, name)
            folder = cat.key_of(t.location()) if t is not None else None
        if folder is not None and (key == folder or key.startswith(folder + "/")):
            return name
    return None


def referenced_files(table: Any) -> set[str]:
    """Storage paths of every file the table's live metadata references: metadata files (current and
    logged), manifest lists, manifests, data and delete files of every live snapshot, statistics."""
    meta = table.metadata
    refs = {storage_path(table.metadata_location)}
    refs |= {storage_path(e.metadata_file) for e in meta.metadata_log}
    refs |= {storage_path(s.statistics_path) for s in (meta.statistics or [])}
    refs |= {storage_path(s.statistics_path) for s in (getattr(meta, "partition_statistics", None) or [])}
    seen: set[str] = set()
    for snap in meta.snapshots:
        refs.add(storage_path(snap.manifest_list))
        for manifest in snap.manifests(table.io):
            path = storage_path(manifest.manifest_path)
            refs.add(path)
            if path in seen:
                continue
            seen.add(path)
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                refs.add(storage_path(entry.data_file.file_path))
    return refs


def remove_orphan_files(
    cat: LakeCatalog,
    older_than: timedelta | datetime = timedelta(days=3),
    *,
    tables: Iterable[str] | None = None,
    dry_run: bool = False,
) -> dict[str, list[str]]:
    """Delete files under each table's location that no live snapshot or metadata file references
    and that are older than the cutoff (younger ones may belong to a commit in flight, or to shard
    files waiting for their batch's commit). Returns the lake keys removed (or, dry_run, found)."""
    cutoff = _cutoff(older_than)
    out: dict[str, list[str]] = {}
    for name in _live_tables(cat, tables):
        table = _load_any(cat, name)
        base = cat.key_of(table.location())
        if base is None:
            log.warning("orphans of %s: location %s is outside the lake; skipped", name, table.location())
            continue
        listed = _list_files(cat, base)  # listed first: a file committed after this is referenced below
        refs = referenced_files(_load_any(cat, name))
        orphans = [
            i
            for i in listed
            if storage_path(i.path) not in refs and i.mtime is not None and _aware(i.mtime) < cutoff
        ]
        keys = [cat.key_of(i.path) or i.path for i in orphans]
        if not dry_run:
            for info in orphans:
                try:
                    cat.lake.fs.delete_file(info.path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise LakeError(
                        f"orphans of {cat.identifier(name)}: cannot delete {info.path}: {e}"
                    ) from None
        out[name] = keys
        if keys:
            log.info(
                "%s %d orphan files (%d bytes) of %s",
                "found" if dry_run else "removed", len(keys), sum(i.size or 0 for i in orphans), name,
            )  # fmt: skip
    return out


def _list_files(cat: LakeCatalog, key: str) -> list[pafs.FileInfo]:
    sel = pafs.FileSelector(f"{cat.lake.root}/{key}", recursive=True, allow_not_found=True)
    try:
        infos = cat.lake.fs.get_file_info(sel)
    except OSError as e:
        raise LakeError(f"lake list {cat.lake.uri(key)}: {e}") from None
    return [i for i in infos if i.type == pafs.FileType.File]


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def maintain(
    cat: LakeCatalog,
    *,
    snapshots_older_than: timedelta = timedelta(days=7),
    orphans_older_than: timedelta = timedelta(days=3),
    dry_run: bool = False,
) -> MaintenanceReport:
    """``zalando lake maintain``: expire old snapshots, then remove the files nothing references."""
    report = MaintenanceReport(dry_run=dry_run)
    if not dry_run:
        report.expired = expire_snapshots(cat, snapshots_older_than)
    report.orphans = remove_orphan_files(cat, orphans_older_than, dry_run=dry_run)
    return report
