"""Every read and write of the review desk, in one place: the page and the feedback logic only see
its methods.

The layout (the lake's Iceberg tables through :meth:`~zalando.lake.Lake.catalog`, committed rows only;
plain objects' keys in :mod:`zalando.lake.keys`):

* runs: the ``metrics_per_group`` / ``metrics_summary`` tables (rows by ``run_id``); reports
  ``reports/run_id=R/`` (``report.md`` + PNGs; the manifest's extra may name a ``flow_run_id``);
  champion from the registry;
* batches: the ``batches`` table (one row per batch and model version: counts, inputs), the
  batch's rows in ``predictions`` (the review queue is the filter ``needs_review``), drift rows
  in ``monitoring`` (by ``batch_id`` and ``model_version``);
* pixels: read again from the batch's inputs as its ``batches`` row lists them (the demo batch: the
  raw test table; file batches: their Parquet files or image files), decoded as scoring decodes them;
* feedback: one committed partition per write, ``feedback/batch_id=B/written=<UTC time>-<id>/``
  holding ``feedback.parquet`` (:data:`zalando.feedback.FEEDBACK_SCHEMA`); never rewritten;
* labelled KPIs (issue 15): ``kpis/batch_id=B/model_version=V/kpis.parquet``
  (:data:`zalando.kpis.KPI_COLUMNS`), replaced when the batch's feedback is measured again; the
  manifest's extra says which feedback it measured (``feedback_state``) and whether its alarm was sent;
* feedback datasets (issue 15): ``reviewed_images/dataset_version=D/feedback.parquet``, the accepted
  feedback images (pixels, group, weight, train or feedback_val) that extend a base dataset version.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from zalando.errors import DataError, LakeError, NotCommittedError
from zalando.feedback import BatchPredictions, Decision, decisions_from_table, decisions_to_table
from zalando.labels import GROUP_NAMES
from zalando.lake import Lake, validate_key
from zalando.lake import keys as k
from zalando.lake.commit import scan
from zalando.lake.tables import BATCHES, PREDICTIONS, prediction_partition
from zalando.scoring.commit import batch_record
from zalando.scoring.query import batch_date_of, scored_versions
from zalando.steps.monitoring import MONITORING_TABLE
from zalando.steps.training import read_metric_tables
from zalando.ui.security import Refused, check_batch_id, check_image_id, check_model_version, check_run_id

log = logging.getLogger(__name__)

FEEDBACK_PREFIX = k.FEEDBACK
FILE_PREFIXES = (k.REPORTS + "/",)
_RUN_TABLES = ("per_group", "summary")
_DRIFT_COLUMNS = ["batch_id", "model_version", "statistic", "value", "threshold", "alarm"]
"""The only lake prefixes whose objects the page serves as files."""


class NotFoundError(DataError):
    """The page asked for a run, batch, image or file the lake does not hold."""


class ExperimentHeadline(BaseModel):
    experiment: str
    model_version: str | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    one_piece_recall: float | None = None
    one_piece_precision: float | None = None
    is_champion: bool = False


class RunSummary(BaseModel):
    """A training run's headline numbers (test split) per experiment."""

    run_id: str
    experiments: list[ExperimentHeadline] = Field(default_factory=list)
    has_report: bool = False


class RunReport(BaseModel):
    run_id: str
    key: str
    markdown: str
    files: list[str]
    champion: str | None = None
    flow_run_id: str | None = None
    created_at: str | None = None


class DriftStat(BaseModel):
    statistic: str
    value: float | None = None
    threshold: float | None = None
    alarm: bool = False


class BatchSummary(BaseModel):
    """A scored batch as its manifest tells it, with its drift statistics when it was monitored."""

    batch_id: str
    batch_date: date
    model_version: str
    other_versions: list[str] = Field(default_factory=list)
    records: int = 0
    scored: int = 0
    quarantined: int = 0
    needs_review: int = 0
    confidence_threshold: float | None = None
    committed_at: str | None = None
    reasons: dict[str, int] = Field(default_factory=dict)
    group_counts: dict[str, int] = Field(default_factory=dict)
    drift: list[DriftStat] = Field(default_factory=list)

    @property
    def alarms(self) -> list[str]:
        return [d.statistic for d in self.drift if d.alarm]


class KpiRecord(BaseModel):
    """A committed labelled-KPI table of one batch and model version, with what its manifest says."""

    key: str
    batch_id: str
    model_version: str
    rows: list[dict[str, Any]]
    extra: dict[str, Any] = Field(default_factory=dict)
    committed_at: str | None = None


class _Lru:
    """A small thread-safe LRU map (tables and decoded inputs; both are re-read when they change)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # outside the lock: reads may be slow, two threads may both read once
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


def audit_order(batch_id: str, image_ids: Sequence[str]) -> np.ndarray:
    """Row indices in the batch's audit order: by a hash of (batch id, image id), so the order is
    random with respect to the model, fixed across reloads, and the same for every reviewer."""
    keys = [hashlib.blake2b(f"{batch_id}/{i}".encode(), digest_size=8).digest() for i in image_ids]
    return np.asarray(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


class LakeStore:
    """The review desk's storage on today's lake. Thread-safe; caches only what cannot change unseen."""

    def __init__(self, lake: Lake, *, cached_tables: int = 8, cached_inputs: int = 8) -> None:
        self.lake = lake
        self._tables = _Lru(cached_tables)  # (partition key, manifest time) -> table
        self._inputs = _Lru(cached_inputs)  # (input uri, sha256) -> (id -> row, images)
        self._feedback: dict[str, list[Decision]] = {}  # partition key -> rows (append-only: never stale)
        self._feedback_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LakeStore({self.lake.uri()})"

    # ------------------------------------------------------------------------------ runs
    def recent_runs(self, limit: int = 20) -> list[RunSummary]:
        """The newest training runs (by run id, which starts with its UTC time), headline numbers first."""
        tables = read_metric_tables(self.lake, names=_RUN_TABLES)
        run_ids = set(tables["summary"]["run_id"].astype(str)) | set(
            tables["per_group"]["run_id"].astype(str)
        )
        reports = {_segment(p, "run_id") for p in self.lake.list_partitions(k.REPORTS) if p.count("/") == 1}
        champion = self._champion_version()
        out = []
        for run_id in sorted(run_ids, reverse=True)[:limit]:
            mine = {n: _of_run(df, run_id) for n, df in tables.items()}
            out.append(
                RunSummary(
                    run_id=run_id,
                    experiments=_headlines(mine["summary"], mine["per_group"], champion),
                    has_report=run_id in reports,
                )
            )
        return out

    def run_tables(self, run_id: str) -> dict[str, pd.DataFrame]:
        """The run's ``per_group`` and ``summary`` tables over all its experiments (all splits)."""
        tables = read_metric_tables(self.lake, check_run_id(run_id), names=_RUN_TABLES)
        if all(df.empty for df in tables.values()):
            raise NotFoundError(f"run {run_id!r} has no rows in the metrics tables of {self.lake.uri()}")
        return tables

    def run_report(self, run_id: str) -> RunReport:
        """The run's Markdown report and the names of its files (figures)."""
        key = k.report_key(check_run_id(run_id))
        try:
            manifest = self.lake.read_manifest(key)
        except NotCommittedError:
            raise NotFoundError(f"run {run_id!r} has no committed report at {self.lake.uri(key)}") from None
        if "report.md" not in manifest["files"]:
            raise NotFoundError(f"run {run_id!r}: the report at {self.lake.uri(key)} has no report.md")
        extra = manifest.get("extra") or {}
        return RunReport(
            run_id=run_id,
            key=key,
            markdown=self.lake.read_file(key, "report.md").decode("utf-8", errors="replace"),
            files=sorted(manifest["files"]),
            champion=extra.get("champion"),
            flow_run_id=extra.get("flow_run_id"),
            created_at=manifest.get("created_at"),
        )

    def report_file(self, key: str) -> bytes:
        """One file of a committed report partition (``reports/…``), checked against its manifest."""
        try:
            key = validate_key(key)
        except LakeError as e:
            raise Refused(str(e)) from None
        if not key.startswith(FILE_PREFIXES):
            raise NotFoundError(f"{key!r}: only files under {', '.join(FILE_PREFIXES)} are served")
        partition, _, name = key.rpartition("/")
        try:
            return self.lake.read_file(partition, name)
        except NotCommittedError:
            raise NotFoundError(f"{key!r}: no committed partition holds it") from None
        except LakeError as e:
            if "has no file" in str(e):
                raise NotFoundError(f"{key!r}: not in its partition's manifest") from None
            raise

    def _champion_version(self) -> str | None:
        from zalando.registry import get_champion

        champion = get_champion(self.lake)
        return champion["model_version"] if champion else None

    # ------------------------------------------------------------------------------ batches
    @property
    def cat(self) -> Any:
        """The lake's one catalog (opened once by the lake)."""
        return self.lake.catalog()

    def recent_batches(self, limit: int = 30) -> list[BatchSummary]:
        """The newest scored batches (by date, then id), each with its newest model version."""
        rows = scan(self.cat, BATCHES).to_pylist()
        by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in rows:
            mine = by_key[(r["batch_date"].isoformat(), r["batch_id"])]
            old = mine.get(r["model_version"])
            if old is None or r["committed_at"] > old["committed_at"]:
                mine[r["model_version"]] = r
        chosen = sorted(by_key, reverse=True)[:limit]
        drift = self._drift_rows({b for _, b in chosen})
        out = []
        for d, b in chosen:
            versions = sorted(by_key[(d, b)])
            row = _decoded(by_key[(d, b)][versions[-1]])
            out.append(self._summary(row, versions, drift.get((b, versions[-1]), [])))
        return out

    def batch(self, batch_id: str, model_version: str | None = None) -> BatchSummary:
        """One batch (the newest model version that scored it, unless one is named)."""
        versions = self._versions(batch_id)
        if model_version is not None and model_version not in versions:
            raise NotFoundError(
                f"batch {batch_id!r} was not scored with model {model_version!r} ({versions})"
            )
        row = self._record(batch_id, model_version or versions[-1])
        drift = self._drift_rows({batch_id}).get((batch_id, row["model_version"]), [])
        return self._summary(row, versions, drift)

    def _versions(self, batch_id: str) -> list[str]:
        check_batch_id(batch_id)
        try:
            versions = scored_versions(self.cat, batch_id)
        except DataError:
            versions = []
        if not versions:
            raise NotFoundError(f"batch {batch_id!r}: no committed predictions")
        return versions

    def _record(self, batch_id: str, version: str) -> dict[str, Any]:
        """The batch's row in ``batches`` (JSON columns decoded)."""
        row = batch_record(self.cat, batch_id, version)
        if row is None:
            raise NotFoundError(f"batch {batch_id!r} (model {version}): no committed row in batches")
        return row

    @staticmethod
    def _summary(row: dict[str, Any], versions: list[str], drift: list[DriftStat]) -> BatchSummary:
        version = row["model_version"]
        committed = row.get("committed_at")
        return BatchSummary(
            batch_id=row["batch_id"],
            batch_date=row["batch_date"],
            model_version=version,
            other_versions=[v for v in versions if v != version],
            records=int(row.get("records") or 0),
            scored=int(row.get("scored") or 0),
            quarantined=int(row.get("quarantined") or 0),
            needs_review=int(row.get("low_confidence") or 0),  # the needs_review rows
            confidence_threshold=row.get("confidence_threshold"),
            committed_at=committed.isoformat() if committed is not None else None,
            reasons={str(a): int(n) for a, n in (row.get("reasons") or {}).items()},
            group_counts={str(g): int(n) for g, n in (row.get("group_counts") or {}).items()},
            drift=drift,
        )

    def _drift_rows(self, batch_ids: set[str]) -> dict[tuple[str, str], list[DriftStat]]:
        """The drift rows of some batches, by (batch id, model version): one scan of ``monitoring``."""
        if not batch_ids:
            return {}
        from pyiceberg.expressions import In

        try:
            table = scan(
                self.cat, MONITORING_TABLE, In("batch_id", sorted(batch_ids)), columns=_DRIFT_COLUMNS
            )
        except (DataError, LakeError) as e:  # an unreadable drift table must not hide the batch list
            log.warning("drift rows of %s not shown: %s", ", ".join(sorted(batch_ids)), e)
            return {}
        out: dict[tuple[str, str], list[DriftStat]] = defaultdict(list)
        for r in table.to_pylist():
            out[(r["batch_id"], r["model_version"])].append(
                DriftStat(
                    statistic=str(r.get("statistic")),
                    value=_float(r.get("value")),
                    threshold=_float(r.get("threshold")),
                    alarm=bool(r.get("alarm")),
                )
            )
        return out

    def prediction_rows(
        self,
        batch_id: str,
        model_version: str | None = None,
        *,
        needs_review_only: bool = True,
        group: str | None = None,
        confidence_min: float | None = None,
        confidence_max: float | None = None,
        order: str = "doubtful",
    ) -> pa.Table:
        """A batch's prediction rows (the needs-review ones, or all), filtered by predicted group
        (a group name) and a confidence range, most doubtful first (confidence, then image id).

        ``order="audit"``: a fixed random order instead (a hash of batch and image id), so the
        first N reviewed are a fair sample of the rows. Under drift the model's confidence is what
        can't be trusted: a queue sorted by it shows only the doubtful corner of the batch.
        """
        version = model_version or self._versions(batch_id)[-1]
        table = self._table(batch_id, version, needs_review_only)
        mask = None
        if group is not None:
            mask = _and(mask, pc.equal(table.column("pred_group_name"), group))
        if confidence_min is not None:
            mask = _and(mask, pc.greater_equal(table.column("confidence"), confidence_min))
        if confidence_max is not None:
            mask = _and(mask, pc.less_equal(table.column("confidence"), confidence_max))
        if mask is not None:
            table = table.filter(mask)
        if order == "audit":
            return table.take(audit_order(batch_id, table.column("image_id").to_pylist()))
        if order != "doubtful":
            raise ValueError(f"order {order!r}: expected 'doubtful' or 'audit'")
        return table.sort_by([("confidence", "ascending"), ("image_id", "ascending")])

    def _table(self, batch_id: str, version: str, needs_review_only: bool) -> pa.Table:
        """The batch's committed prediction rows (cached per predictions snapshot of the batch)."""
        row = self._record(batch_id, version)
        flt = dict(prediction_partition(batch_date_of(batch_id), version, batch_id))
        if needs_review_only:
            flt["needs_review"] = True
        stamp = (row.get("predictions_snapshot_id"), row.get("committed_at"))
        return self._tables.get(
            (batch_id, version, needs_review_only, stamp), lambda: scan(self.cat, PREDICTIONS, flt)
        )

    def _input_files(self, batch_id: str, version: str) -> list[dict[str, Any]]:
        """The input files the batch scored, as its ``batches`` row lists them."""
        return list((self._record(batch_id, version).get("inputs") or {}).get("files") or [])

    def image_pixels(self, batch_id: str, image_id: str, model_version: str | None = None) -> np.ndarray:
        """The 28x28 uint8 image a scored row was predicted from, read again from the batch's inputs."""
        from zalando.scoring.batch import image_id_for_file

        check_image_id(image_id)
        version = model_version or self._versions(batch_id)[-1]
        files = self._input_files(batch_id, version)
        for f in files:
            if f.get("error"):
                continue
            if f.get("kind") == "image":
                if image_id_for_file(str(f["name"])) == image_id:
                    return self._image_file(f)
                continue
            index, images = self._inputs.get((f["uri"], f.get("sha256")), lambda f=f: self._decode_parquet(f))
            if image_id in index:
                return images[index[image_id]]
        raise NotFoundError(f"image {image_id!r} is not among the inputs of batch {batch_id!r}")

    def batch_pixels(
        self, batch_id: str, image_ids: Sequence[str], model_version: str | None = None
    ) -> dict[str, np.ndarray]:
        """The 28x28 uint8 images of many scored rows of one batch, each input file read once; ids the
        inputs no longer give (gone, changed, undecodable) are left out of the answer."""
        from zalando.scoring.batch import image_id_for_file

        wanted = {check_image_id(i) for i in image_ids}
        version = model_version or self._versions(batch_id)[-1]
        files = self._input_files(batch_id, version)
        found: dict[str, np.ndarray] = {}
        for f in files:
            if f.get("error") or len(found) == len(wanted):
                continue
            try:
                if f.get("kind") == "image":
                    image_id = image_id_for_file(str(f["name"]))
                    if image_id in wanted and image_id not in found:
                        found[image_id] = self._image_file(f)
                    continue
                index, images = self._inputs.get(
                    (f["uri"], f.get("sha256")), lambda f=f: self._decode_parquet(f)
                )
            except NotFoundError as e:
                log.warning("batch %s: %s", batch_id, e)
                continue
            for image_id in wanted - found.keys():
                if image_id in index:
                    found[image_id] = images[index[image_id]]
        return found

    def _input_bytes(self, f: dict[str, Any]) -> bytes:
        """An input file's bytes, refused when they are no longer the ones the batch scored."""
        from zalando.scoring.locations import open_input

        fs, path = open_input(str(f["uri"]), self.lake)
        try:
            with fs.open_input_stream(path) as fh:
                data = fh.read()
        except FileNotFoundError:
            raise NotFoundError(f"input {f['uri']} of the batch is gone") from None
        if f.get("sha256") and hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise NotFoundError(
                f"input {f['uri']} changed after the batch was scored; its pixels are not shown"
            )
        return data

    def _image_file(self, f: dict[str, Any]) -> np.ndarray:
        from zalando.images import ImagePrepConfig, ImageRejected, decode_image

        try:
            return decode_image(self._input_bytes(f), ImagePrepConfig(), name=str(f["name"]))
        except ImageRejected as e:
            raise NotFoundError(f"image file {f['name']!r} cannot be decoded ({e.reason})") from None

    def _decode_parquet(self, f: dict[str, Any]) -> tuple[dict[str, int], np.ndarray]:
        from zalando.images import ImagePrepConfig
        from zalando.scoring.batch import ID_COLUMN, IMAGE_COLUMN
        from zalando.scoring.inputs import decode_image_column

        table = pq.read_table(io.BytesIO(self._input_bytes(f)), columns=[ID_COLUMN, IMAGE_COLUMN])
        images, _bad = decode_image_column(
            table.column(IMAGE_COLUMN), ImagePrepConfig(), source=str(f["name"])
        )
        ids = table.column(ID_COLUMN).cast(pa.string()).to_pylist()
        index: dict[str, int] = {}
        for i, image_id in enumerate(ids):
            if image_id is not None:
                index.setdefault(image_id, i)  # the first occurrence is the one scored
        log.debug("decoded %d images of %s for the review page", len(ids), f["name"])
        return index, images

    # ------------------------------------------------------------------------------ feedback
    def batch_predictions(self, batch_id: str, model_version: str | None = None) -> BatchPredictions | None:
        """Each image's predicted group in the batch (for checking decisions); None: unknown batch."""
        try:
            versions = self._versions(batch_id)
        except (NotFoundError, Refused):
            return None
        if model_version is not None and model_version not in versions:
            return None
        version = model_version or versions[-1]
        table = self.prediction_rows(batch_id, version, needs_review_only=False)
        ids = table.column("image_id").to_pylist()
        groups = table.column("pred_group_name").to_pylist()
        return BatchPredictions(model_version=version, predicted=dict(zip(ids, groups, strict=True)))

    def append_feedback(self, decisions: Sequence[Decision]) -> list[str]:
        """Append decisions: one new committed partition per batch and call, never a rewrite."""
        by_batch: dict[str, list[Decision]] = defaultdict(list)
        for d in decisions:
            by_batch[check_batch_id(d.batch_id)].append(d)
        keys = []
        for batch_id, rows in by_batch.items():
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            key = k.feedback_key(batch_id, f"{stamp}-{uuid.uuid4().hex[:8]}")
            sources = sorted({r.source for r in rows})
            self.lake.commit_partition(
                key,
                {"feedback": decisions_to_table(rows)},
                run_id=f"feedback-{'+'.join(sources)}",
                extra={"batch_id": batch_id, "rows": len(rows), "sources": sources},
            )
            with self._feedback_lock:
                self._feedback[key] = list(rows)
            keys.append(key)
        return keys

    def read_feedback(self, batch_id: str | None = None) -> list[Decision]:
        """Every recorded decision (of one batch), oldest first."""
        prefix = k.feedback_prefix(None if batch_id is None else check_batch_id(batch_id))
        out: list[Decision] = []
        for key in self.lake.list_partitions(prefix):
            with self._feedback_lock:
                rows = self._feedback.get(key)
            if rows is None:
                rows = decisions_from_table(self.lake.read_partition(key))
                with self._feedback_lock:
                    self._feedback[key] = rows
            out.extend(rows)
        return sorted(out, key=lambda d: (d.decided_at, d.image_id))

    # ------------------------------------------------------------------------------ issue 15: labelled KPIs
    def feedback_batches(self) -> list[str]:
        """The ids of the batches with at least one committed feedback write, sorted."""
        out = {_segment(key, "batch_id") for key in self.lake.list_partitions(k.feedback_prefix())}
        return sorted(b for b in out if b)

    def feedback_state(self, batch_id: str) -> str:
        """A digest of the batch's feedback writes: feedback is append-only, so a new write changes it."""
        keys = self.lake.list_partitions(k.feedback_prefix(check_batch_id(batch_id)))
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]

    @staticmethod
    def kpis_key(batch_id: str, model_version: str) -> str:
        version = check_model_version(model_version)
        if version is None:
            raise Refused("model version: required for a KPI table")
        return k.kpis_key(check_batch_id(batch_id), version)

    def commit_kpis(
        self, batch_id: str, model_version: str, table: pa.Table, *, run_id: str, extra: dict[str, Any]
    ) -> str:
        """Commit (or replace) the batch's labelled-KPI table for one model version; returns its key."""
        key = self.kpis_key(batch_id, model_version)
        self.lake.commit_partition(key, {"kpis": table}, run_id, extra=dict(extra))
        return key

    def read_kpis(self, batch_id: str) -> list[KpiRecord]:
        """Every committed labelled-KPI table of the batch (one per model version measured)."""
        out = []
        for key in self.lake.list_partitions(k.kpis_prefix(check_batch_id(batch_id))):
            manifest = self.lake.read_manifest(key)
            out.append(
                KpiRecord(
                    key=key,
                    batch_id=batch_id,
                    model_version=_segment(key, "model_version") or "",
                    rows=self.lake.read_partition(key).to_pylist(),
                    extra=manifest.get("extra") or {},
                    committed_at=manifest.get("created_at"),
                )
            )
        return out

    # ------------------------------------------------------------------------------ issue 15: feedback datasets
    @staticmethod
    def feedback_dataset_key(dataset_version: str) -> str:
        version = check_model_version(dataset_version)  # the same characters as a model version
        if version is None:
            raise Refused("dataset version: required")
        return k.feedback_dataset_key(version)

    def commit_feedback_dataset(
        self, dataset_version: str, table: pa.Table, *, run_id: str, extra: dict[str, Any]
    ) -> str:
        """Commit the feedback rows that extend a base dataset version into ``dataset_version``."""
        key = self.feedback_dataset_key(dataset_version)
        self.lake.commit_partition(key, {"feedback": table}, run_id, extra=dict(extra))
        return key

    def feedback_dataset_extra(self, dataset_version: str) -> dict[str, Any] | None:
        """The manifest's extra of a feedback dataset version (its counts); None for any other version."""
        try:
            manifest = self.lake.read_manifest(self.feedback_dataset_key(dataset_version))
        except NotCommittedError:
            return None
        return dict(manifest.get("extra") or {})

    def read_feedback_dataset(self, dataset_version: str) -> tuple[pa.Table, dict[str, Any]] | None:
        """The feedback rows of a feedback dataset version and its manifest's extra; None for any
        other version (a plain split, or unknown)."""
        key = self.feedback_dataset_key(dataset_version)
        try:
            manifest = self.lake.read_manifest(key)
        except NotCommittedError:
            return None
        return self.lake.read_partition(key), dict(manifest.get("extra") or {})


# ---------------------------------------------------------------------------------- helpers


def _segment(key: str, name: str) -> str | None:
    for seg in key.split("/"):
        if seg.startswith(name + "="):
            return seg.split("=", 1)[1]
    return None


def _of_run(df: pd.DataFrame, run_id: str) -> pd.DataFrame:
    return df[df["run_id"].astype(str) == run_id].reset_index(drop=True) if len(df) else df


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A ``batches`` row with its JSON columns decoded (as :func:`batch_record` gives it)."""
    import json

    out = dict(row)
    for col in ("reasons", "group_counts", "inputs"):
        out[col] = json.loads(out[col]) if out.get(col) else None
    return out


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _and(mask: Any, other: Any) -> Any:
    return other if mask is None else pc.and_(mask, other)


def _headlines(
    summary: pd.DataFrame, per_group: pd.DataFrame, champion: str | None
) -> list[ExperimentHeadline]:
    """Per experiment: test-split accuracy and macro F1, One piece recall and precision."""
    if summary.empty:
        return []
    s = summary[summary["split"] == "test"] if "split" in summary.columns else summary
    pg = per_group
    if not pg.empty and "split" in pg.columns:
        pg = pg[pg["split"] == "test"]
    one_piece = GROUP_NAMES.index("One piece")
    out = []
    for rec in s.to_dict("records"):
        op = (
            pg[(pg["experiment"] == rec["experiment"]) & (pg["group"].astype(int) == one_piece)]
            if len(pg)
            else pg
        )
        version = rec.get("model_version")
        out.append(
            ExperimentHeadline(
                experiment=str(rec["experiment"]),
                model_version=str(version) if version is not None else None,
                accuracy=_float(rec.get("accuracy")),
                macro_f1=_float(rec.get("macro_f1")),
                one_piece_recall=_float(op["recall"].iloc[0]) if len(op) else None,
                one_piece_precision=_float(op["precision"].iloc[0]) if len(op) else None,
                is_champion=version is not None and version == champion,
            )
        )
    return out
