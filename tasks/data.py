"""Data tasks: verify the source, ingest it into raw tables, make a dataset version, EDA.

Ingest and preprocess are cached on the source's checksum digest (and the lake, and the seed for
preprocess), so a nightly re-run with an unchanged source skips them in the Prefect sense too
(their task runs show as Cached). The library itself is idempotent as well: a forced re-run
replaces the same partitions, never duplicates rows.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.common import RunConfig, cache_on, io_task_options
from zalando.data.eda import write_eda
from zalando.data.ingest import ingest
from zalando.data.sources import fetch_source
from zalando.data.split import preprocess


def _fetch(cfg: RunConfig):  # -> SourceFiles (bytes stay inside the task)
    settings = cfg.settings()
    lake = cfg.lake()
    return fetch_source(settings.data_source, cache_dir=settings.work_dir / "cache", s3=lake.s3)


@task(name="verify-source", cache_policy=NO_CACHE, **io_task_options())
def verify_source(cfg: RunConfig) -> str:
    """Fetch the four IDX files, check their checksums, return the digest of their bytes."""
    src = _fetch(cfg)
    get_run_logger().info("source %s verified, digest %s", src.source, src.digest)
    return src.digest


@task(name="ingest", cache_policy=cache_on("source_digest", "cfg.lake_uri"), **io_task_options())
def ingest_source(cfg: RunConfig, source_digest: str, force: bool = False) -> dict[str, Any]:
    """Parse, validate (quarantining bad images with a reason) and commit the raw tables."""
    summary = ingest(cfg.lake(), _fetch(cfg), force=force)
    get_run_logger().info(
        "raw tables: %s rows; quarantine %s",
        {s: v["rows"] for s, v in summary["splits"].items()},
        summary["quarantine"] or "empty",
    )
    return summary


@task(
    name="preprocess", cache_policy=cache_on("source_digest", "cfg.lake_uri", "cfg.seed"), **io_task_options()
)
def make_dataset_version(cfg: RunConfig, source_digest: str, force: bool = False) -> dict[str, Any]:
    """Split train/val (stratified, seeded) and store normalisation statistics: the dataset version."""
    dv = preprocess(cfg.lake(), seed=cfg.seed, force=force)
    get_run_logger().info("dataset version %s (%d train / %d val)", dv.dataset_version, dv.n_train, dv.n_val)
    return dict(dv.__dict__)


@task(name="eda", cache_policy=cache_on("source_digest", "cfg.lake_uri"), **io_task_options())
def write_eda_report(cfg: RunConfig, source_digest: str) -> dict[str, Any]:
    """Exploratory tables and pictures of the ingested data, in reports/run_id=…/eda."""
    return write_eda(cfg.lake(), cfg.run_id)
