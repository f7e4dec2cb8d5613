"""A lake written before its tables were Iceberg tables: found, refused, and migrated.

Before, each table was a folder of Parquet partitions, each committed by a ``_MANIFEST.json`` written
after its files (:mod:`zalando.lake.keys` names the prefixes). :func:`check_layout` refuses such a
lake in one line whenever a catalog opens on it (every table read and write), and
:func:`migrate_lake` (``zalando lake migrate``) moves it:

- only COMMITTED files move: the files a manifest lists, each checked against its sha256; files a
  manifest does not list (a crashed writer's) and partitions without one are left out, and named;
- every legacy file needs a cast (its table keys were path segments, ``run_id``/``experiment`` were
  dictionary-encoded, older files lack newer columns), so each partition's rows are rewritten, not
  registered with ``add_files``: one ``replace_partition`` on the partition's own keys per table,
  so a retry (or a second run after a crash) replaces the same rows and never duplicates them;
- once a partition's rows are committed its manifest is renamed ``_MIGRATED.json`` (the files stay
  where they were, for anyone who wants to compare), so a later run never overwrites newer rows
  with legacy ones; the decision log's objects move to ``registry/decisions/_migrated/``;
- last, ``_lake/migrated.json`` records the migration, and later opens skip the check.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from zalando.errors import LakeError
from zalando.lake import MANIFEST, Lake
from zalando.lake import keys as k
from zalando.lake.catalog import LakeCatalog

log = logging.getLogger(__name__)

Rows = list[tuple[str, pa.Table, dict[str, Any]]]  # (table, rows, the replace filter)


@dataclass(frozen=True)
class LegacySource:
    """One kind of legacy partition: where it lived, which of its partitions it owns, and how a
    partition's committed files become rows of the tables."""

    name: str
    prefix: str
    owns: Callable[[str], bool]  # a partition key under prefix -> is it this source's?
    rows: Callable[[Lake, str, dict[str, Any]], Rows]  # (lake, partition key, manifest) -> rows


@dataclass
class MigrationReport:
    """What ``zalando lake migrate`` did: rows per table, partitions and decisions moved, files left out."""

    rows: dict[str, int] = field(default_factory=dict)
    partitions: list[str] = field(default_factory=list)
    decisions: int = 0
    left_out: list[str] = field(default_factory=list)  # uncommitted legacy files (not in any manifest)

    @property
    def nothing_to_do(self) -> bool:
        return not self.partitions and not self.decisions


# ---------------------------------------------------------------------------------------------- reading


def _segments(key: str) -> dict[str, str]:
    """``a=1/b=2`` path segments of a key as a dict."""
    return dict(seg.split("=", 1) for seg in key.split("/") if "=" in seg)


def _read_committed(lake: Lake, key: str, manifest: dict[str, Any], name: str | None = None) -> pa.Table:
    """The Parquet files the manifest lists (or the one named), each checked against its sha256."""
    names = sorted(n for n in manifest["files"] if n.endswith(".parquet") and (name is None or n == name))
    tables = [pq.read_table(io.BytesIO(lake.read_file(key, n))) for n in names]
    if not tables:
        raise LakeError(f"legacy partition {lake.uri(key)}: its manifest lists no Parquet file")
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _with(table: pa.Table, **columns: Any) -> pa.Table:
    """table with constant columns set (replacing any of the same name); None -> a null column."""
    for name, value in columns.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        arr = pa.nulls(table.num_rows) if value is None else pa.array([value] * table.num_rows)
        table = table.append_column(name, arr)
    return table


def _raw_rows(lake: Lake, key: str, manifest: dict[str, Any]) -> Rows:
    split = _segments(key)["split"]
    rows = _with(
        _read_committed(lake, key, manifest),
        split=split,
        source_digest=manifest["extra"].get("source_digest"),
    )
    return [("raw_images", rows, {"split": split})]


def _ingest_quarantine_rows(lake: Lake, key: str, manifest: dict[str, Any]) -> Rows:
    run_id = _segments(key)["run_id"]
    return [("quarantine", _with(_read_committed(lake, key, manifest), run_id=run_id), {"run_id": run_id})]


def _dataset_rows(lake: Lake, key: str, manifest: dict[str, Any]) -> Rows:
    version = key.rsplit("/", 1)[-1]
    stats = dict(manifest["extra"]["stats"])
    stats["created_at"] = datetime.fromisoformat(manifest["created_at"])
    split = _with(_read_committed(lake, key, manifest), dataset_version=version)
    flt = {"dataset_version": version}
    return [("datasets", split, flt), ("dataset_versions", pa.Table.from_pylist([stats]), flt)]


def _metrics_rows(lake: Lake, key: str, manifest: dict[str, Any]) -> Rows:
    seg = _segments(key)
    flt = {"run_id": seg["run_id"], "experiment": seg["experiment"]}
    out = []
    for name in sorted(n for n in manifest["files"] if n.endswith(".parquet")):
        rows = _with(_read_committed(lake, key, manifest, name), **flt)
        out.append((f"metrics_{name.removesuffix('.parquet')}", rows, flt))
    return out


def _drift_rows(lake: Lake, key: str, manifest: dict[str, Any]) -> Rows:
    seg = _segments(key)
    rows = _with(
        _read_committed(lake, key, manifest),
        batch_date=date.fromisoformat(seg["batch_date"]),
        batch_id=seg["batch_id"],
        model_version=seg["model_version"],
    )
    return [("monitoring", rows, {"batch_id": seg["batch_id"], "model_version": seg["model_version"]})]


def _prediction_rows(lake: Lake, key: str, manifest: dict[str, Any]) -> Rows:
    """A scored batch (``predictions/batch_date=…/model_version=…/batch_id=…``): its part files, plus the
    ``batch_date`` of its path and ``shadow`` false (shadow scoring came with the table)."""
    seg = _segments(key)
    rows = _read_committed(lake, key, manifest)
    rows = _with(rows, batch_date=date.fromisoformat(seg["batch_date"]))
    if "shadow" not in rows.column_names:
        rows = _with(rows, shadow=False)
    return [("predictions", rows, {"batch_id": seg["batch_id"], "model_version": seg["model_version"]})]


def _scoring_quarantine_rows(lake: Lake, key: str, manifest: dict[str, Any]) -> Rows:
    """A batch's rejected inputs (``quarantine/run_id=score-…``)."""
    seg = _segments(key)
    rows = _with(
        _read_committed(lake, key, manifest), run_id=seg["run_id"], model_version=seg["model_version"]
    )
    return [("quarantine", rows, {"run_id": seg["run_id"], "model_version": seg["model_version"]})]


def _is_ingest_quarantine(key: str) -> bool:
    return _segments(key).get("run_id", "").startswith("ingest-")


def _is_scoring_quarantine(key: str) -> bool:
    return _segments(key).get("run_id", "").startswith("score-")


TRAINING_SOURCES: tuple[LegacySource, ...] = (
    LegacySource("raw images", k.LEGACY_RAW, lambda key: "split" in _segments(key), _raw_rows),
    LegacySource("ingest quarantine", k.LEGACY_QUARANTINE, _is_ingest_quarantine, _ingest_quarantine_rows),
    LegacySource("dataset versions", k.LEGACY_DATASETS, lambda key: key.count("/") == 1, _dataset_rows),
    LegacySource(
        "metrics",
        k.LEGACY_METRICS,
        lambda key: {"run_id", "experiment"} <= set(_segments(key)),
        _metrics_rows,
    ),
    LegacySource("drift", k.LEGACY_MONITORING, lambda key: "batch_id" in _segments(key), _drift_rows),
)
"""The tables of ingest, training and monitoring (the decision log is migrated beside them)."""

SCORING_SOURCES: tuple[LegacySource, ...] = (
    LegacySource(
        "predictions", k.LEGACY_PREDICTIONS, lambda key: "batch_id" in _segments(key), _prediction_rows
    ),
    LegacySource("scoring quarantine", k.LEGACY_QUARANTINE, _is_scoring_quarantine, _scoring_quarantine_rows),
)
"""Scoring's outputs before Iceberg (scoring now writes the predictions and quarantine tables, and its
plain objects under ``scoring/``)."""

SOURCES: tuple[LegacySource, ...] = TRAINING_SOURCES + SCORING_SOURCES
"""What :func:`check_layout` refuses and :func:`migrate_lake` moves."""


# ---------------------------------------------------------------------------------------------- finding


def legacy_partitions(
    lake: Lake, sources: Sequence[LegacySource] = SOURCES
) -> list[tuple[LegacySource, str]]:
    """Every committed, not yet migrated legacy partition: (its source, its key)."""
    out = []
    suffix = "/" + MANIFEST
    for src in sources:
        for key in lake.list_keys(src.prefix):
            if key.endswith(suffix) and src.owns(key[: -len(suffix)]):
                out.append((src, key[: -len(suffix)]))
    return out


def legacy_decisions(lake: Lake) -> list[str]:
    """Keys of the decision log's objects from before the registry_decisions table."""
    n = len(k.LEGACY_DECISIONS) + 1
    return [
        key
        for key in lake.list_keys(k.LEGACY_DECISIONS)
        if key.endswith(".json") and "/" not in key[n:] and not key[n:].startswith("_")
    ]


def check_layout(cat: LakeCatalog, sources: Sequence[LegacySource] = SOURCES) -> None:
    """Refuse, in one line, a lake that still holds tables in the layout before Iceberg."""
    lake = cat.lake
    if lake.exists(k.MIGRATED_MARKER):
        return
    found = [key for _, key in legacy_partitions(lake, sources)[:1]] or legacy_decisions(lake)[:1]
    if found:
        raise LakeError(
            f"lake {lake.uri()} holds tables in the layout before Iceberg ({found[0]}): "
            "run `zalando lake migrate` to move them into the Iceberg tables"
        )


# ---------------------------------------------------------------------------------------------- migrating


def _fill_missing(cat: LakeCatalog, table_name: str, rows: pa.Table) -> pa.Table:
    """Columns the table has and an older legacy file lacks, as nulls (every column is optional)."""
    from zalando.lake.tables import table_schema

    missing = [f for f in table_schema(cat, table_name).fields if f.name not in rows.column_names]
    if missing:
        log.info("legacy rows of %s lack %s: stored as nulls", table_name, ", ".join(f.name for f in missing))
    return _with(rows, **{f.name: None for f in missing})


def _left_out(lake: Lake, key: str, manifest: dict[str, Any]) -> list[str]:
    """Files of a partition folder its manifest does not list (sub-partitions not counted)."""
    listed = set(manifest["files"]) | {MANIFEST, k.MIGRATED_MANIFEST}
    n = len(key) + 1
    return [f for f in lake.list_keys(key) if "/" not in f[n:] and f[n:] not in listed]


def migrate_partition(cat: LakeCatalog, src: LegacySource, key: str, report: MigrationReport) -> None:
    """One legacy partition's committed rows into its tables, then its manifest renamed."""
    from zalando.lake.commit import replace_partition

    lake = cat.lake
    manifest = lake.read_manifest(key)
    for table_name, rows, flt in src.rows(lake, key, manifest):
        result = replace_partition(
            cat,
            table_name,
            _fill_missing(cat, table_name, rows),
            flt,
            properties={"zalando.migrated-from": key},
        )
        report.rows[table_name] = report.rows.get(table_name, 0) + result.added_rows
    report.left_out += _left_out(lake, key, manifest)
    lake.write_json(
        f"{key}/{k.MIGRATED_MANIFEST}", {**manifest, "migrated_at": datetime.now(UTC).isoformat()}
    )
    lake.delete(f"{key}/{MANIFEST}")
    report.partitions.append(key)
    log.info("migrated %s %s", src.name, lake.uri(key))


def migrate_decisions(cat: LakeCatalog, report: MigrationReport) -> None:
    """The decision log's objects into registry_decisions (those not there yet), then moved aside."""
    from zalando.lake.commit import append, scan
    from zalando.lake.tables import DECISION_ID_PROPERTY

    lake = cat.lake
    keys = legacy_decisions(lake)
    if not keys:
        return
    records = [lake.read_json(key) for key in keys]
    have = set(scan(cat, "registry_decisions", columns=["decision_id"]).column("decision_id").to_pylist())
    new = [r for r in records if r.get("decision_id") not in have]
    if new:
        rows = [
            {
                **{c: r.get(c) for c in ("decision_id", "action", "model_version", "experiment")},
                **{c: r.get(c) for c in ("previous_champion", "champion_after", "actor", "reason")},
                "at": datetime.fromisoformat(r["at"]),
                "decision": None if r.get("decision") is None else json.dumps(r["decision"], sort_keys=True),
            }
            for r in new
        ]
        newest = max(have | {r["decision_id"] for r in rows})
        props = {"zalando.migrated-from": k.LEGACY_DECISIONS, DECISION_ID_PROPERTY: newest}
        result = append(cat, "registry_decisions", pa.Table.from_pylist(rows), properties=props)
        report.rows["registry_decisions"] = report.rows.get("registry_decisions", 0) + result.added_rows
    for key in keys:
        lake.write_bytes(f"{k.MIGRATED_DECISIONS}/{key.rsplit('/', 1)[-1]}", lake.read_bytes(key))
        lake.delete(key)
    report.decisions += len(keys)


def migrate_lake(lake: Lake, sources: Sequence[LegacySource] = SOURCES) -> MigrationReport:
    """``zalando lake migrate``: every committed legacy partition (and the decision log) into the
    Iceberg tables; idempotent (a second run finds nothing left to move)."""
    cat = lake.catalog(check_layout=False)
    report = MigrationReport()
    for src, key in legacy_partitions(lake, sources):
        migrate_partition(cat, src, key, report)
    migrate_decisions(cat, report)
    report.left_out += _orphan_partitions(lake, sources)
    if legacy_partitions(lake, sources) or legacy_decisions(lake):  # pragma: no cover - a writer raced us
        raise LakeError(f"lake {lake.uri()}: legacy partitions appeared while migrating; run it again")
    if not lake.exists(k.MIGRATED_MARKER) and not report.nothing_to_do:
        lake.write_json(
            k.MIGRATED_MARKER,
            {
                "migrated_at": datetime.now(UTC).isoformat(),
                "rows": report.rows,
                "partitions": len(report.partitions),
            },
        )
    return report


def _orphan_partitions(lake: Lake, sources: Sequence[LegacySource]) -> list[str]:
    """Parquet files under a legacy prefix in a folder that never got a manifest (a crashed writer's)."""
    out = []
    for prefix in dict.fromkeys(src.prefix for src in sources):
        keys = lake.list_keys(prefix)
        committed = {key.rsplit("/", 1)[0] for key in keys if key.endswith((MANIFEST, k.MIGRATED_MANIFEST))}
        for key in keys:
            folder = key.rsplit("/", 1)[0]
            owned = any(src.prefix == prefix and src.owns(folder) for src in sources)
            if key.endswith(".parquet") and owned and folder not in committed:
                out.append(key)
    return out
