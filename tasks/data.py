"""Data tasks: verify the source, ingest it into raw tables, make a dataset version, EDA.

Each calls one step of :mod:`zalando.steps.data`. Ingest and preprocess are cached on the source's
checksum digest (and the lake, and the seed for preprocess), so a nightly re-run with an unchanged
source skips them in the Prefect sense too (their task runs show as Cached). The library itself is
idempotent as well: a forced re-run replaces the same partitions, never duplicates rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.common import RunConfig, cache_on, io_task_options
from zalando.steps import data
from zalando.steps.data import EdaReport, IngestSummary

if TYPE_CHECKING:
    from zalando.data.split import DatasetVersion


@task(name="verify-source", cache_policy=NO_CACHE, **io_task_options())
def verify_source(cfg: RunConfig) -> str:
    """Fetch the four IDX files, check their checksums, return the digest of their bytes."""
    src = data.verify_source(cfg.settings(), cfg.lake())
    get_run_logger().info("source %s verified, digest %s", src.source, src.digest)
    return src.digest


@task(name="ingest", cache_policy=cache_on("source_digest", "cfg.lake_uri"), **io_task_options())
def ingest_source(cfg: RunConfig, source_digest: str, force: bool = False) -> IngestSummary:
    """Parse, validate (quarantining bad images with a reason) and commit the raw tables."""
    summary = data.ingest_source(cfg.settings(), cfg.lake(), force=force)
    get_run_logger().info(
        "raw tables: %s rows; quarantine %s",
        {s: v.rows for s, v in summary.splits.items()},
        summary.quarantine or "empty",
    )
    return summary


@task(
    name="preprocess", cache_policy=cache_on("source_digest", "cfg.lake_uri", "cfg.seed"), **io_task_options()
)
def make_dataset_version(cfg: RunConfig, source_digest: str, force: bool = False) -> DatasetVersion:
    """Split train/val (stratified, seeded) and store normalisation statistics: the dataset version."""
    dv = data.make_dataset_version(cfg.lake(), seed=cfg.seed, force=force)
    get_run_logger().info("dataset version %s (%d train / %d val)", dv.dataset_version, dv.n_train, dv.n_val)
    return dv


@task(name="eda", cache_policy=cache_on("source_digest", "cfg.lake_uri"), **io_task_options())
def write_eda_report(cfg: RunConfig, source_digest: str) -> EdaReport:
    """Exploratory tables and pictures of the ingested data, in reports/run_id=…/eda."""
    return data.write_eda_report(cfg.lake(), cfg.run_id)
