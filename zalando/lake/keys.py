"""Every lake key that is not an Iceberg table: where the plain objects live, in one place.

The tables (raw images, quarantine, datasets, metrics, monitoring, the decision log, ...) are named in
:mod:`zalando.lake.tables` and live under ``<namespace>/<table>/`` (the catalog keeps them there).
Everything else is a plain object, written once and read whole:

::

    models/<experiment>/<model_version>/          a model bundle (weights, ONNX, model card; manifest last)
    registry/models/<model_version>.json          a registered version's record
    registry/champion.json                        the champion pointer
    registry/canary/                              the canary set (one Parquet file; manifest last)
    registry/references/model_version=<v>/        a model's drift reference profile (one Parquet file)
    reports/run_id=<run_id>/                      a training run's report (Markdown + PNGs)
    reports/run_id=<run_id>/eda/                  the EDA report, its tables as Parquet beside it
    reports/run_id=<run_id>/eval/experiment=<e>/  a model's test-split probabilities (for the report)
    feedback/batch_id=<b>/written=<stamp>-<id>/   one write of review decisions (never rewritten)
    kpis/batch_id=<b>/model_version=<v>/          a batch's labelled KPIs (replaced when measured again)
    reviewed_images/dataset_version=<d>/          the feedback rows a dataset version adds

    scoring/batch_date=<d>/model_version=<v>/batch_id=<b>/
        _shards/shard-00000.json ...              a scored batch's shard markers (each shard's commit point)
        embeddings/run_id=<w>/part-00000.parquet  its embedding sample for drift (its batch row lists them)

:data:`LEGACY` names where the lake kept its tables before they were Iceberg tables (a folder of
Parquet files and a ``_MANIFEST.json`` per partition): ``zalando lake migrate`` reads them, and every
table read or write refuses a lake that still holds them.
"""

from __future__ import annotations

import re
from datetime import date

from zalando.errors import LakeError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@,-]{0,127}$")

CATALOG_FILE = "_catalog/catalog.db"
"""The embedded SQLite catalog of a local lake made without settings (``Lake.local``)."""

MIGRATED_MARKER = "_lake/migrated.json"
"""Written by ``zalando lake migrate`` once no legacy partition is left: later opens skip the check."""

# ---------------------------------------------------------------------------------------------- models

MODELS = "models"


def bundle_key(experiment: str, model_version: str) -> str:
    """A model bundle: ``models/<experiment>/<model_version>``."""
    return f"{MODELS}/{_name(experiment, 'experiment')}/{_name(model_version, 'model version')}"


# ---------------------------------------------------------------------------------------------- registry

REGISTRY = "registry"
MODEL_RECORDS = f"{REGISTRY}/models"
CHAMPION_KEY = f"{REGISTRY}/champion.json"
CANARY_KEY = f"{REGISTRY}/canary"
REFERENCES = f"{REGISTRY}/references"


def model_record_key(model_version: str) -> str:
    """A registered version's record: ``registry/models/<model_version>.json``."""
    return f"{MODEL_RECORDS}/{model_version}.json"


def reference_key(model_version: str) -> str:
    """A model's drift reference: ``registry/references/model_version=<v>``."""
    return f"{REFERENCES}/model_version={model_version}"


# ---------------------------------------------------------------------------------------------- reports

REPORTS = "reports"


def report_key(run_id: str) -> str:
    """A training run's report: ``reports/run_id=<run_id>``."""
    return f"{REPORTS}/run_id={_name(run_id, 'run id')}"


def eda_key(run_id: str) -> str:
    """The EDA report of a run: ``reports/run_id=<run_id>/eda``."""
    return f"{report_key(run_id)}/eda"


def eval_key(run_id: str, experiment: str) -> str:
    """One model's test-split probabilities: ``reports/run_id=<run_id>/eval/experiment=<e>``."""
    return f"{report_key(run_id)}/eval/experiment={_name(experiment, 'experiment')}"


# ---------------------------------------------------------------------------------------------- feedback

FEEDBACK = "feedback"
KPIS = "kpis"  # not under monitoring/: that prefix is the drift table's legacy layout
FEEDBACK_DATASETS = "reviewed_images"


def feedback_prefix(batch_id: str | None = None) -> str:
    """Every feedback write (of one batch): ``feedback[/batch_id=<b>]``."""
    return FEEDBACK if batch_id is None else f"{FEEDBACK}/batch_id={_name(batch_id, 'batch id')}"


def feedback_key(batch_id: str, written: str) -> str:
    """One feedback write: ``feedback/batch_id=<b>/written=<written>``."""
    return f"{feedback_prefix(batch_id)}/written={_name(written, 'written')}"


def kpis_prefix(batch_id: str) -> str:
    """A batch's labelled-KPI tables: ``kpis/batch_id=<b>``."""
    return f"{KPIS}/batch_id={_name(batch_id, 'batch id')}"


def kpis_key(batch_id: str, model_version: str) -> str:
    """A batch's labelled KPIs for one model: ``kpis/batch_id=<b>/model_version=<v>``."""
    return f"{kpis_prefix(batch_id)}/model_version={_name(model_version, 'model version')}"


def feedback_dataset_key(dataset_version: str) -> str:
    """The feedback rows of a dataset version: ``reviewed_images/dataset_version=<d>``."""
    return f"{FEEDBACK_DATASETS}/dataset_version={_name(dataset_version, 'dataset version')}"


# ---------------------------------------------------------------------------------------------- scoring

SCORING = "scoring"


def batch_key(batch_date: date | str, model_version: str, batch_id: str) -> str:
    """The prefix of a scored batch's plain objects (its rows are in the predictions table)."""
    return f"{SCORING}/batch_date={_day(batch_date)}/model_version={model_version}/batch_id={batch_id}"


def shard_markers_prefix(batch_date: date | str, model_version: str, batch_id: str) -> str:
    return f"{batch_key(batch_date, model_version, batch_id)}/_shards"


def shard_marker_key(batch_date: date | str, model_version: str, batch_id: str, shard_id: int) -> str:
    return f"{shard_markers_prefix(batch_date, model_version, batch_id)}/shard-{shard_id:05d}.json"


def embeddings_key(
    batch_date: date | str, model_version: str, batch_id: str, write_id: str, shard_id: int
) -> str:
    return f"{batch_key(batch_date, model_version, batch_id)}/embeddings/run_id={write_id}/part-{shard_id:05d}.parquet"


def _day(value: date | str) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


# ---------------------------------------------------------------------------------------------- legacy

LEGACY_RAW = "raw/fashion-mnist"  # split=<split>/part-NNNNN.parquet
LEGACY_QUARANTINE = "quarantine"  # run_id=ingest-<digest>/quarantine.parquet (scoring: run_id=score-…)
LEGACY_DATASETS = "datasets"  # <dataset_version>/split.parquet, the stats in the manifest's extra
LEGACY_METRICS = (
    "metrics"  # run_id=<r>/experiment=<e>/{per_group,confusion,summary,performance,energy}.parquet
)
LEGACY_MONITORING = "monitoring"  # batch_date=<d>/model_version=<v>/batch_id=<b>/drift.parquet
LEGACY_DECISIONS = f"{REGISTRY}/decisions"  # <UTC timestamp>-<uuid>.json, one object per decision
LEGACY_PREDICTIONS = "predictions"  # batch_date=<d>/model_version=<v>/batch_id=<b>/part-NNNNN.parquet
MIGRATED_MANIFEST = "_MIGRATED.json"  # a legacy partition's manifest, renamed once its rows are in a table
MIGRATED_DECISIONS = f"{LEGACY_DECISIONS}/_migrated"  # legacy decision objects, moved once in the table

LEGACY: dict[str, str] = {
    "raw_images": LEGACY_RAW,
    "quarantine": LEGACY_QUARANTINE,
    "datasets": LEGACY_DATASETS,
    "dataset_versions": LEGACY_DATASETS,
    "metrics_*": LEGACY_METRICS,
    "monitoring": LEGACY_MONITORING,
    "registry_decisions": LEGACY_DECISIONS,
    "predictions": LEGACY_PREDICTIONS,
}
"""Table(s) -> the key prefix that held them before Iceberg."""


def _name(value: str, what: str) -> str:
    """One key segment from a name: refused when it could not be one (empty, '/', '=', '..')."""
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise LakeError(
            f"{what} {value!r}: must be 1-128 characters of [A-Za-z0-9._:+@,-], starting with one"
        )
    return value
