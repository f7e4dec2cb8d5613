"""The lake's Iceberg tables: names, Arrow schemas, partition specs, schema checks and evolution.

One namespace (``zalando``). Each table is a :class:`TableSpec`: the Arrow schema writers build and
readers get back, and how the table is partitioned. The Iceberg schema is derived from it (every
column optional; int8/int16 are stored as Iceberg ``int``, and read back as the spec's type).

A write whose Arrow schema differs from the live table's (a missing, extra or mistyped column) is
refused with a LakeError naming the columns; the table's schema changes only through
:func:`evolve_schema`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from zalando.errors import LakeError
from zalando.labels import GROUP_KEYS
from zalando.lake.catalog import LakeCatalog

log = logging.getLogger(__name__)

IMAGE_BYTES = 28 * 28
UTC_US = pa.timestamp("us", tz="UTC")

TABLE_PROPERTIES = {
    "format-version": "2",
    # one manifest per commit would make every scan plan read all of them: merge small ones
    "commit.manifest-merge.enabled": "true",
    # keep the metadata folder bounded: old metadata.json files go once 20 newer ones exist
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
    "write.parquet.compression-codec": "zstd",
}


@dataclass(frozen=True)
class PartitionBy:
    """One partition field: a source column and an Iceberg transform ('identity', 'day', 'bucket[16]')."""

    column: str
    transform: str = "identity"

    @property
    def name(self) -> str:
        return (
            self.column if self.transform == "identity" else f"{self.column}_{self.transform.split('[')[0]}"
        )


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    partition_by: tuple[PartitionBy, ...] = ()
    doc: str = ""
    properties: Mapping[str, str] = field(default_factory=dict)  # on top of TABLE_PROPERTIES


# exact (not 16-character) bounds of the batch id in every data file's statistics: a replace filtered
# on batch_id then drops whole files from the statistics alone instead of reading each one back
FULL_BATCH_ID_METRICS = {"write.metadata.metrics.column.batch_id": "full"}


def _metric_keys() -> list[tuple[str, pa.DataType]]:
    return [("run_id", pa.string()), ("experiment", pa.string()), ("model_version", pa.string())]


# a metric table gets one commit per model and run, each replacing its (run_id, experiment): by run,
# a commit's delete prunes the other runs' manifests from the manifest list instead of reading each
_BY_RUN = (PartitionBy("run_id"),)


PROB_COLUMNS = tuple(f"prob_{k}" for k in GROUP_KEYS)

_SPECS = (
    TableSpec(
        "raw_images",
        pa.schema(
            [
                ("image_id", pa.string()),
                ("image", pa.binary(IMAGE_BYTES)),
                ("label", pa.int8()),
                ("label_name", pa.string()),
                ("group", pa.int8()),
                ("group_name", pa.string()),
                ("split", pa.string()),
                ("source_digest", pa.string()),
            ]
        ),
        (PartitionBy("split"),),
        "accepted images (data.arrays.RAW_SCHEMA + split + the source's digest); a re-ingest replaces a split",
    ),
    TableSpec(
        "quarantine",
        pa.schema(
            [
                ("run_id", pa.string()),
                ("image_id", pa.string()),
                ("source", pa.string()),
                ("split", pa.string()),
                ("label", pa.int8()),
                ("row", pa.int64()),
                ("reason", pa.string()),
                ("detail", pa.string()),
                ("image", pa.binary()),
                ("batch_id", pa.string()),
                ("model_version", pa.string()),
                ("shard_id", pa.int32()),
                ("size", pa.int64()),
                ("sha256", pa.string()),
            ]
        ),
        (),
        "rejected records of ingest (split, label) and of scoring (row, batch_id, shard_id), with reason; "
        "evidence, never payloads: size and sha256 of every rejected input, and in image only the first "
        "bytes (at most 64 KiB) of one that claims to be an image",
        FULL_BATCH_ID_METRICS,
    ),
    TableSpec(
        "datasets",
        pa.schema([("dataset_version", pa.string()), ("image_id", pa.string()), ("subset", pa.string())]),
        (PartitionBy("dataset_version"),),
        "split indices: which training image is in 'train' or 'val' for each dataset version",
    ),
    TableSpec(
        "dataset_versions",
        pa.schema(
            [
                ("dataset_version", pa.string()),
                ("mean", pa.float64()),
                ("std", pa.float64()),
                ("n_train", pa.int64()),
                ("n_val", pa.int64()),
                ("n_test", pa.int64()),
                ("seed", pa.int64()),
                ("val_fraction", pa.float64()),
                ("source_digest", pa.string()),
                ("created_at", UTC_US),
            ]
        ),
        (),
        "one row per dataset version: the normalisation stats (data.split.DatasetVersion)",
    ),
    TableSpec(
        "predictions",
        pa.schema(
            [
                ("image_id", pa.string()),
                ("pred_group", pa.int8()),
                ("pred_group_name", pa.string()),
                *[(c, pa.float32()) for c in PROB_COLUMNS],
                ("confidence", pa.float32()),
                ("needs_review", pa.bool_()),
                ("model_version", pa.string()),
                ("batch_id", pa.string()),
                ("batch_date", pa.date32()),
                ("scored_at", UTC_US),
                ("shadow", pa.bool_()),
            ]
        ),
        (PartitionBy("batch_date"), PartitionBy("model_version")),
        "scored rows, one data file per shard; the per-group view is the filter pred_group = g, the "
        "review queue needs_review (confidence below the batch's threshold)",
        FULL_BATCH_ID_METRICS,
    ),
    TableSpec(
        "batches",
        pa.schema(
            [
                ("batch_id", pa.string()),
                ("batch_date", pa.date32()),
                ("model_version", pa.string()),
                ("committed_at", UTC_US),
                ("run_id", pa.string()),
                ("location", pa.string()),
                ("records", pa.int64()),
                ("scored", pa.int64()),
                ("quarantined", pa.int64()),
                ("low_confidence", pa.int64()),
                ("duplicates", pa.int64()),
                ("shards", pa.int64()),
                ("data_files", pa.int64()),
                ("runtimes", pa.string()),
                ("shard_seconds", pa.float64()),
                ("confidence_threshold", pa.float64()),
                ("predictions_snapshot_id", pa.int64()),
                ("reasons", pa.string()),
                ("group_counts", pa.string()),
                ("confidence_hist", pa.string()),
                ("pixel_stats", pa.string()),
                ("inputs", pa.string()),
                ("embeddings", pa.string()),
            ]
        ),
        (),
        "one row per committed batch and model version (what a batch manifest said): counts, reasons, "
        "histograms and inputs (JSON text), the predictions snapshot and the embedding sample's objects",
        FULL_BATCH_ID_METRICS,
    ),
    TableSpec(
        "metrics_per_group",
        pa.schema(
            [
                *_metric_keys(),
                ("split", pa.string()),
                ("group", pa.int8()),
                ("group_name", pa.string()),
                ("recall", pa.float64()),
                ("precision", pa.float64()),
                ("npv", pa.float64()),
                ("f1", pa.float64()),
                ("support", pa.int64()),
                ("tp", pa.int64()),
                ("fp", pa.int64()),
                ("tn", pa.int64()),
                ("fn", pa.int64()),
                ("created_at", UTC_US),
            ]
        ),
        _BY_RUN,
        "evaluate.PER_GROUP_SCHEMA (run_id and experiment as plain strings)",
    ),
    TableSpec(
        "metrics_confusion",
        pa.schema(
            [
                *_metric_keys(),
                ("split", pa.string()),
                ("true_group", pa.int8()),
                ("pred_group", pa.int8()),
                ("count", pa.int64()),
                ("created_at", UTC_US),
            ]
        ),
        _BY_RUN,
        "evaluate.CONFUSION_SCHEMA: the 5x5 group confusion matrix in long format",
    ),
    TableSpec(
        "metrics_summary",
        pa.schema(
            [
                *_metric_keys(),
                ("split", pa.string()),
                ("n", pa.int64()),
                ("accuracy", pa.float64()),
                ("macro_recall", pa.float64()),
                ("macro_precision", pa.float64()),
                ("macro_f1", pa.float64()),
                ("weighted_recall", pa.float64()),
                ("weighted_precision", pa.float64()),
                ("weighted_f1", pa.float64()),
                ("created_at", UTC_US),
            ]
        ),
        _BY_RUN,
        "evaluate.SUMMARY_SCHEMA: accuracy and macro / weighted averages per split",
    ),
    TableSpec(
        "metrics_performance",
        pa.schema(
            [
                *_metric_keys(),
                ("runtime", pa.string()),
                ("params", pa.int64()),
                ("size_mb_torch", pa.float64()),
                ("size_mb_onnx", pa.float64()),
                ("n_images", pa.int64()),
                ("batch_size", pa.int64()),
                ("wall_s", pa.float64()),
                ("images_per_s", pa.float64()),
                ("p50_ms", pa.float64()),
                ("p95_ms", pa.float64()),
                ("created_at", UTC_US),
            ]
        ),
        _BY_RUN,
        "evaluate.PERFORMANCE_SCHEMA: one row per scoring runtime",
    ),
    TableSpec(
        "metrics_energy",
        pa.schema(
            [
                *_metric_keys(),
                ("label", pa.string()),
                ("country_iso_code", pa.string()),
                ("duration_s", pa.float64()),
                ("cpu_power_w", pa.float64()),
                ("gpu_power_w", pa.float64()),
                ("ram_power_w", pa.float64()),
                ("cpu_energy_kwh", pa.float64()),
                ("gpu_energy_kwh", pa.float64()),
                ("ram_energy_kwh", pa.float64()),
                ("energy_kwh", pa.float64()),
                ("emissions_kg", pa.float64()),
                ("images", pa.int64()),
                ("kwh_per_1000_images", pa.float64()),
                ("power_method", pa.string()),
                ("created_at", UTC_US),
            ]
        ),
        _BY_RUN,
        "evaluate.ENERGY_SCHEMA: one row per measured phase",
    ),
    TableSpec(
        "monitoring",
        pa.schema(
            [
                ("batch_date", pa.date32()),
                ("batch_id", pa.string()),
                ("model_version", pa.string()),
                ("statistic", pa.string()),
                ("value", pa.float64()),
                ("threshold", pa.float64()),
                ("p_value", pa.float64()),
                ("alarm", pa.bool_()),
                ("trusted", pa.bool_()),  # below min_n images a statistic is reported, never alarms
                ("min_n", pa.int64()),
                ("batch_value", pa.string()),
                ("reference_value", pa.string()),
                ("detail", pa.string()),
            ]
        ),
        (PartitionBy("batch_date"),),
        "drift statistics per batch (monitor.DRIFT_COLUMNS, batch_value/reference_value as text)",
    ),
    TableSpec(
        "registry_decisions",
        pa.schema(
            [
                ("decision_id", pa.string()),
                ("at", UTC_US),
                ("action", pa.string()),
                ("model_version", pa.string()),
                ("experiment", pa.string()),
                ("previous_champion", pa.string()),
                ("champion_after", pa.string()),
                ("actor", pa.string()),
                ("reason", pa.string()),
                ("decision", pa.string()),
            ]
        ),
        (),
        "every promotion, rejection and rollback (registry.DECISION_COLUMNS; decision as JSON), append-only",
    ),
)

TABLES: dict[str, TableSpec] = {s.name: s for s in _SPECS}
"""Every table of the lake by name."""

DECISION_ID_PROPERTY = "zalando.decision-id"
"""Snapshot property of a registry_decisions append: the newest decision id it committed (so the
next decision's id is made later without reading the log)."""


def table_spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise LakeError(f"iceberg table {name!r}: unknown; the lake's tables are {sorted(TABLES)}") from None


# ---------------------------------------------------------------------------------------------- types


class _Ids:
    def __init__(self) -> None:
        self.last = 0

    def next(self) -> int:
        self.last += 1
        return self.last


def iceberg_type(t: pa.DataType, ids: _Ids | None = None) -> Any:
    """The Iceberg type that stores Arrow type t; a LakeError for types Iceberg cannot hold."""
    from pyiceberg import types as it

    ids = ids or _Ids()
    if pa.types.is_dictionary(t):
        return iceberg_type(t.value_type, ids)
    simple = [
        (pa.types.is_string, it.StringType),
        (pa.types.is_large_string, it.StringType),
        (pa.types.is_boolean, it.BooleanType),
        (pa.types.is_date32, it.DateType),
        (pa.types.is_float32, it.FloatType),
        (pa.types.is_float64, it.DoubleType),
        (pa.types.is_int64, it.LongType),
        (pa.types.is_uint32, it.LongType),
        (pa.types.is_binary, it.BinaryType),
        (pa.types.is_large_binary, it.BinaryType),
    ]
    for test, ice in simple:
        if test(t):
            return ice()
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_int32(t):
        return it.IntegerType()
    if pa.types.is_uint8(t) or pa.types.is_uint16(t):
        return it.IntegerType()
    if pa.types.is_fixed_size_binary(t):
        return it.FixedType(t.byte_width)
    if pa.types.is_timestamp(t):
        return it.TimestamptzType() if t.tz else it.TimestampType()
    if pa.types.is_decimal(t):
        return it.DecimalType(t.precision, t.scale)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        elem_id = ids.next()
        return it.ListType(elem_id, iceberg_type(t.value_type, ids), element_required=False)
    if pa.types.is_struct(t):
        fields = []
        for f in t:
            fid = ids.next()
            fields.append(it.NestedField(fid, f.name, iceberg_type(f.type, ids), required=False))
        return it.StructType(*fields)
    raise LakeError(f"Arrow type {t} has no Iceberg type")


def type_text(t: Any) -> str:
    """An Iceberg type as text, without field ids (to compare two schemas' types)."""
    from pyiceberg import types as it

    if isinstance(t, it.ListType):
        return f"list<{type_text(t.element_type)}>"
    if isinstance(t, it.MapType):
        return f"map<{type_text(t.key_type)}, {type_text(t.value_type)}>"
    if isinstance(t, it.StructType):
        return "struct<" + ", ".join(f"{f.name}: {type_text(f.field_type)}" for f in t.fields) + ">"
    return str(t)


def iceberg_schema(spec: TableSpec) -> Any:
    """The Iceberg schema of a spec: every column optional, fresh field ids in column order."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import NestedField

    ids = _Ids()
    fields = []
    for f in spec.schema:
        fid = ids.next()
        fields.append(NestedField(fid, f.name, iceberg_type(f.type, ids), required=False))
    return Schema(*fields)


def partition_spec(spec: TableSpec, schema: Any) -> Any:
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import parse_transform

    fields = []
    for i, p in enumerate(spec.partition_by):
        source = schema.find_field(p.column)
        fields.append(
            PartitionField(
                source_id=source.field_id,
                field_id=1000 + i,
                transform=parse_transform(p.transform),
                name=p.name,
            )
        )
    return PartitionSpec(*fields)


# ---------------------------------------------------------------------------------------------- tables


def table_location_key(cat: LakeCatalog, name: str) -> str:
    """Where a SQL catalog keeps a table, as a lake key: ``<namespace>/<name>``."""
    return f"{cat.namespace}/{table_spec(name).name}"


def load_table(cat: LakeCatalog, name: str) -> Any | None:
    """The table as committed now (a fresh load), or None when the catalog has no such table."""
    from pyiceberg.exceptions import NoSuchTableError

    table_spec(name)

    def _load() -> Any | None:
        try:
            return cat.catalog.load_table(cat.identifier(name))
        except NoSuchTableError:
            return None

    return cat.call(f"load table {cat.identifier(name)}", _load)


def ensure_table(cat: LakeCatalog, name: str) -> Any:
    """The table, created (empty, with its spec's schema and partitioning) if the catalog lacks it.

    Refuses to create a table over a location that already holds Iceberg metadata: that means the
    catalog database was lost or replaced, and a new table would orphan (and maintenance delete)
    the old one's files.
    """
    from pyiceberg.exceptions import TableAlreadyExistsError

    table = load_table(cat, name)
    if table is not None:
        return table
    spec = table_spec(name)
    schema = iceberg_schema(spec)
    kwargs: dict[str, Any] = {
        "partition_spec": partition_spec(spec, schema),
        "properties": {**TABLE_PROPERTIES, **spec.properties},
    }
    if cat.kind == "sql":
        key = table_location_key(cat, name)
        old = [k for k in cat.lake.list_keys(f"{key}/metadata") if k.endswith(".metadata.json")]
        if old and (table := _created_meanwhile(cat, name)) is not None:
            return table
        if old:
            # another process may be creating the table right now (metadata written, catalog row not yet)
            for delay in (0.1, 0.2, 0.4, 0.8, 1.5):
                time.sleep(delay)
                table = load_table(cat, name)
                if table is not None:
                    return table
            raise LakeError(
                f"iceberg table {cat.identifier(name)} is not in {cat.describe}, but {cat.lake.uri(key)} "
                f"holds its metadata ({len(old)} metadata files, newest {old[-1].rsplit('/', 1)[-1]}): "
                "the catalog database was lost or replaced; restore it, or register the table with "
                "zalando.lake.tables.register_table"
            )
        kwargs["location"] = cat.lake.uri(key)

    def _create() -> Any:
        try:
            table = cat.catalog.create_table(cat.identifier(name), schema=schema, **kwargs)
            log.info("created iceberg table %s at %s", cat.identifier(name), table.location())
            return table
        except TableAlreadyExistsError:  # another writer created it first
            return cat.catalog.load_table(cat.identifier(name))

    return cat.call(f"create table {cat.identifier(name)}", _create)


def _created_meanwhile(cat: LakeCatalog, name: str, waits: tuple[float, ...] = (0.05, 0.2, 0.5, 1.0)) -> Any:
    """The table, if a concurrent writer is creating it right now: pyiceberg writes the first
    metadata file before the catalog row, so for a moment the files exist and the row does not."""
    for wait in waits:
        time.sleep(wait)
        table = load_table(cat, name)
        if table is not None:
            return table
    return None


def ensure_tables(cat: LakeCatalog, names: Sequence[str] | None = None) -> list[str]:
    """Create every missing table (all of the lake's, or names); returns the names."""
    names = list(names or TABLES)
    for n in names:
        ensure_table(cat, n)
    return names


def table_schema(cat: LakeCatalog, name: str) -> Any:
    """The table's live Iceberg schema (created if missing): what shard writers conform to."""
    return ensure_table(cat, name).schema()


def register_table(cat: LakeCatalog, name: str, metadata_uri: str) -> Any:
    """Register an existing table from one of its metadata files (recovery after a lost catalog)."""
    table_spec(name)
    uri = cat.uri_of(metadata_uri)
    return cat.call(
        f"register table {cat.identifier(name)}",
        lambda: cat.catalog.register_table(cat.identifier(name), uri),
    )


# ---------------------------------------------------------------------------------------------- schemas


def schema_differences(table_schema: Any, data_schema: pa.Schema) -> dict[str, list[str]]:
    """Columns the data lacks, has extra, or holds with another type than the table (by name)."""
    fields = {f.name: f for f in table_schema.fields}
    names = data_schema.names
    missing = [n for n in fields if n not in names]
    extra = [n for n in names if n not in fields]
    extra += sorted({f"{n} (twice)" for n in names if names.count(n) > 1})
    mistyped = []
    for f in data_schema:
        if f.name not in fields or pa.types.is_null(f.type):
            continue  # an all-null column fits any optional column
        want = type_text(fields[f.name].field_type)
        try:
            got = type_text(iceberg_type(f.type))
        except LakeError:
            got = "no Iceberg type"
        if got != want:
            mistyped.append(f"{f.name} ({f.type} -> {got}, table has {want})")
    return {"missing": missing, "extra": extra, "mistyped": mistyped}


def check_schema(table_schema: Any, data_schema: pa.Schema, *, where: str) -> None:
    """A LakeError naming every missing, extra and mistyped column, when there is any."""
    diff = schema_differences(table_schema, data_schema)
    if any(diff.values()):
        parts = [f"{k} {', '.join(v)}" for k, v in diff.items() if v]
        raise LakeError(
            f"{where}: the data's schema differs from the table's: {'; '.join(parts)} "
            "(the table's schema changes only through evolve_schema)"
        )


def conform(schema: Any, data: pa.Table, *, where: str) -> pa.Table:
    """data checked against a table's Iceberg schema, then cast to its exact Arrow types, field ids
    and column order."""
    check_schema(schema, data.schema, where=where)
    target = schema.as_arrow()
    cols = []
    for f in target:
        col = data.column(f.name)
        if pa.types.is_null(col.type):
            col = pa.nulls(len(data), f.type)
        elif col.type != f.type:
            try:
                col = col.cast(f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise LakeError(
                    f"{where}: column {f.name!r}: cannot store {col.type} as {f.type}: {e}"
                ) from None
        required = schema.find_field(f.name).required
        if required and col.null_count:
            raise LakeError(f"{where}: column {f.name!r} is required but holds {col.null_count} nulls")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=target)


def to_app_schema(name: str, data: pa.Table) -> pa.Table:
    """A scan's result with the spec's Arrow types (int8 back from int, string from large_string)."""
    want = {f.name: f.type for f in table_spec(name).schema}
    cols, fields = [], []
    for f, col in zip(data.schema, data.columns, strict=True):
        t = want.get(f.name)
        if t is not None and col.type != t:
            try:
                col = col.cast(t, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                t = col.type  # an evolved column keeps what the table holds
        cols.append(col)
        fields.append(pa.field(f.name, col.type))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def evolve_schema(
    cat: LakeCatalog,
    name: str,
    *,
    add: Sequence[pa.Field] = (),
    rename: Mapping[str, str] | None = None,
    promote: Mapping[str, pa.DataType] | None = None,
    drop: Sequence[str] = (),
) -> Any:
    """The one way to change a table's schema: add optional columns, rename, widen a type
    (int -> long, float -> double), drop. One commit; returns the new Iceberg schema."""
    if not (add or rename or promote or drop):
        raise LakeError(f"evolve_schema {cat.identifier(name)}: nothing to change")

    from pyiceberg.exceptions import ValidationError

    def _evolve() -> Any:
        table = ensure_table(cat, name)
        try:
            with table.update_schema() as update:
                for f in add:
                    update.add_column(f.name, iceberg_type(f.type))
                for old, new in (rename or {}).items():
                    update.rename_column(old, new)
                for col, t in (promote or {}).items():
                    update.update_column(col, field_type=iceberg_type(t))
                for col in drop:
                    update.delete_column(col)
        except (ValueError, ValidationError) as e:
            raise LakeError(
                f"evolve_schema {cat.identifier(name)}: {str(e).strip().splitlines()[0]}"
            ) from None
        cols = ", ".join(f"{f.name}: {type_text(f.field_type)}" for f in table.schema().fields)
        log.info("evolved the schema of %s: %s", cat.identifier(name), cols)
        return table.schema()

    return cat.commit(f"evolve schema of {cat.identifier(name)}", _evolve)
