"""Every read and write of the review desk, in one place: when the lake's tables move (Apache Iceberg),
this module is the one to re-implement; the page and the feedback logic only see its methods.

Today's layout (read through :class:`~zalando.lake.Lake`, committed partitions only):

* runs: ``metrics/run_id=R/experiment=E/{per_group,summary}.parquet``; reports ``reports/run_id=R/``
  (``report.md`` + PNGs; the manifest's extra may name a ``flow_run_id``); champion from the registry;
* batches: the batch manifest ``predictions/batch_date=D/model_version=V/batch_id=B/_MANIFEST.json``
  (counts, inputs), its rows, the ``needs_review/…`` partition, drift in ``monitoring/…/drift.parquet``;
* pixels: read again from the batch's inputs as its manifest lists them (the demo batch: the raw test
  table; file batches: their Parquet files or image files), decoded as scoring decodes them;
* feedback: one committed partition per write, ``feedback/batch_id=B/written=<UTC time>-<id>/``
  holding ``feedback.parquet`` (:data:`zalando.feedback.FEEDBACK_SCHEMA`); never rewritten;
* labelled KPIs (issue 15): ``monitoring/kpis/batch_id=B/model_version=V/kpis.parquet``
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
from zalando.lake import MANIFEST, Lake, validate_key
from zalando.scoring import layout
from zalando.scoring.query import batch_date_of, scored_versions
from zalando.steps.monitoring import monitoring_key
from zalando.steps.reporting import report_key
from zalando.ui.security import Refused, check_batch_id, check_image_id, check_model_version, check_run_id

log = logging.getLogger(__name__)

FEEDBACK_PREFIX = "feedback"
KPIS_PREFIX = "monitoring/kpis"  # issue 15: labelled KPIs per batch and model version
FEEDBACK_DATASETS_PREFIX = "reviewed_images"  # issue 15: the feedback rows a dataset version adds
METRICS_PREFIX = "metrics"  # metrics/run_id=…/experiment=… (zalando.evaluate.metrics_partition_key)
FILE_PREFIXES = ("reports/",)
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
        parts = self.lake.list_partitions(METRICS_PREFIX)
        by_run: dict[str, list[str]] = defaultdict(list)
        for p in parts:
            run = _segment(p, "run_id")
            if run:
                by_run[run].append(p)
        reports = {_segment(p, "run_id") for p in self.lake.list_partitions("reports") if p.count("/") == 1}
        champion = self._champion_version()
        out = []
        for run_id in sorted(by_run, reverse=True)[:limit]:
            tables = self._run_tables(by_run[run_id])
            out.append(
                RunSummary(
                    run_id=run_id,
                    experiments=_headlines(tables["summary"], tables["per_group"], champion),
                    has_report=run_id in reports,
                )
            )
        return out

    def run_tables(self, run_id: str) -> dict[str, pd.DataFrame]:
        """The run's ``per_group`` and ``summary`` tables over all its experiments (all splits)."""
        parts = self.lake.list_partitions(f"{METRICS_PREFIX}/run_id={check_run_id(run_id)}")
        if not parts:
            raise NotFoundError(f"run {run_id!r} has no metrics in {self.lake.uri(METRICS_PREFIX)}")
        return self._run_tables(parts)

    def _run_tables(self, parts: Sequence[str]) -> dict[str, pd.DataFrame]:
        out = {}
        for name in ("per_group", "summary"):
            frames = []
            for p in parts:
                if f"{name}.parquet" in self.lake.read_manifest(p)["files"]:
                    data = self.lake.read_file(p, f"{name}.parquet")
                    frames.append(pq.read_table(io.BytesIO(data)).to_pandas())
            out[name] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return out

    def run_report(self, run_id: str) -> RunReport:
        """The run's Markdown report and the names of its files (figures)."""
        key = report_key(check_run_id(run_id))
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
    def recent_batches(self, limit: int = 30) -> list[BatchSummary]:
        """The newest scored batches (by date, then id), each with its newest model version."""
        versions: dict[tuple[str, str], list[str]] = defaultdict(list)
        for key in self.lake.list_keys("predictions"):
            parts = key.split("/")
            if len(parts) == 5 and parts[4] == MANIFEST:
                d, v, b = (_value(parts[1]), _value(parts[2]), _value(parts[3]))
                if d and v and b:
                    versions[(d, b)].append(v)
        chosen = sorted(versions, reverse=True)[:limit]
        monitored = set(self.lake.list_partitions("monitoring"))
        return [self._summary(b, sorted(versions[(d, b)]), None, monitored) for d, b in chosen]

    def batch(self, batch_id: str, model_version: str | None = None) -> BatchSummary:
        """One batch (the newest model version that scored it, unless one is named)."""
        versions = self._versions(batch_id)
        if model_version is not None and model_version not in versions:
            raise NotFoundError(
                f"batch {batch_id!r} was not scored with model {model_version!r} ({versions})"
            )
        return self._summary(batch_id, versions, model_version, None)

    def _versions(self, batch_id: str) -> list[str]:
        check_batch_id(batch_id)
        try:
            versions = scored_versions(self.lake, batch_id)
        except DataError:
            versions = []
        if not versions:
            raise NotFoundError(f"batch {batch_id!r}: no committed predictions")
        return versions

    def _summary(
        self, batch_id: str, versions: list[str], model_version: str | None, monitored: set[str] | None
    ) -> BatchSummary:
        version = model_version or versions[-1]
        d = batch_date_of(batch_id)
        manifest = self.lake.read_manifest(layout.predictions_key(d, version, batch_id))
        x = manifest.get("extra") or {}
        counts = x.get("counts") or {}
        mkey = monitoring_key(d.isoformat(), version, batch_id)
        has_drift = mkey in monitored if monitored is not None else self.lake.is_committed(mkey)
        return BatchSummary(
            batch_id=batch_id,
            batch_date=d,
            model_version=version,
            other_versions=[v for v in versions if v != version],
            records=int(counts.get("records", 0)),
            scored=int(counts.get("scored", 0)),
            quarantined=int(counts.get("quarantined", 0)),
            needs_review=int(counts.get("low_confidence", 0)),  # the needs_review partition's rows
            confidence_threshold=x.get("confidence_threshold"),
            committed_at=manifest.get("created_at"),
            reasons={str(k): int(v) for k, v in (x.get("reasons") or {}).items()},
            group_counts={str(k): int(v) for k, v in (x.get("group_counts") or {}).items()},
            drift=self._drift(mkey) if has_drift else [],
        )

    def _drift(self, key: str) -> list[DriftStat]:
        try:
            table = self.lake.read_partition(key)
        except (DataError, LakeError) as e:  # one unreadable drift table must not hide the batch list
            log.warning("drift table %s not shown: %s", self.lake.uri(key), e)
            return []
        out = []
        for r in table.to_pylist():
            out.append(
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
    ) -> pa.Table:
        """A batch's prediction rows (the needs-review ones, or all), filtered by predicted group
        (a group name) and a confidence range, most doubtful first (confidence, then image id)."""
        version = model_version or self._versions(batch_id)[-1]
        d = batch_date_of(batch_id)
        key = layout.review_key(d, version, batch_id) if needs_review_only else None
        key = key or layout.predictions_key(d, version, batch_id)
        table = self._table(key)
        mask = None
        if group is not None:
            mask = _and(mask, pc.equal(table.column("pred_group_name"), group))
        if confidence_min is not None:
            mask = _and(mask, pc.greater_equal(table.column("confidence"), confidence_min))
        if confidence_max is not None:
            mask = _and(mask, pc.less_equal(table.column("confidence"), confidence_max))
        if mask is not None:
            table = table.filter(mask)
        return table.sort_by([("confidence", "ascending"), ("image_id", "ascending")])

    def _table(self, key: str) -> pa.Table:
        try:
            stamp = self.lake.read_manifest(key).get("created_at")
        except NotCommittedError:
            raise NotFoundError(f"{self.lake.uri(key)} is not committed") from None
        return self._tables.get((key, stamp), lambda: self.lake.read_partition(key))

    def image_pixels(self, batch_id: str, image_id: str, model_version: str | None = None) -> np.ndarray:
        """The 28x28 uint8 image a scored row was predicted from, read again from the batch's inputs."""
        from zalando.scoring.batch import image_id_for_file

        check_image_id(image_id)
        version = model_version or self._versions(batch_id)[-1]
        manifest = self.lake.read_manifest(layout.predictions_key(batch_date_of(batch_id), version, batch_id))
        files = ((manifest.get("extra") or {}).get("inputs") or {}).get("files") or []
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
        manifest = self.lake.read_manifest(layout.predictions_key(batch_date_of(batch_id), version, batch_id))
        files = ((manifest.get("extra") or {}).get("inputs") or {}).get("files") or []
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
        from zalando.scoring.batch import open_input

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
            key = f"{FEEDBACK_PREFIX}/batch_id={batch_id}/written={stamp}-{uuid.uuid4().hex[:8]}"
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
        prefix = (
            FEEDBACK_PREFIX if batch_id is None else f"{FEEDBACK_PREFIX}/batch_id={check_batch_id(batch_id)}"
        )
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
        out = {_segment(key, "batch_id") for key in self.lake.list_partitions(FEEDBACK_PREFIX)}
        return sorted(b for b in out if b)

    def feedback_state(self, batch_id: str) -> str:
        """A digest of the batch's feedback writes: feedback is append-only, so a new write changes it."""
        keys = self.lake.list_partitions(f"{FEEDBACK_PREFIX}/batch_id={check_batch_id(batch_id)}")
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]

    @staticmethod
    def kpis_key(batch_id: str, model_version: str) -> str:
        version = check_model_version(model_version)
        if version is None:
            raise Refused("model version: required for a KPI table")
        return f"{KPIS_PREFIX}/batch_id={check_batch_id(batch_id)}/model_version={version}"

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
        for key in self.lake.list_partitions(f"{KPIS_PREFIX}/batch_id={check_batch_id(batch_id)}"):
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
        return f"{FEEDBACK_DATASETS_PREFIX}/dataset_version={version}"

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


def _value(segment: str) -> str | None:
    return segment.split("=", 1)[1] if "=" in segment else None


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
