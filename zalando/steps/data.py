"""Data steps: verify the source, ingest it into the raw tables, make a dataset version, write the EDA.

Each reads the source or the lake, calls :mod:`zalando.data` and returns a small typed result. The
library is idempotent: ingesting the same source again (or splitting with the same seed) replaces
the same partitions, never duplicates rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from zalando.data.split import DatasetVersion
from zalando.lake import Lake

if TYPE_CHECKING:
    from zalando.data.sources import SourceFiles
    from zalando.settings import Settings


class VerifiedSource(BaseModel):
    """A source whose four IDX files matched their checksums."""

    model_config = ConfigDict(frozen=True)

    source: str
    digest: str  # of the files' bytes: the cache key of ingest and preprocess


class SplitCounts(BaseModel):
    """Rows of one raw split, and per group."""

    rows: int
    groups: dict[str, int]


class IngestSummary(BaseModel):
    """What an ingest committed (or found committed), read back from the lake."""

    run_id: str
    skipped: bool  # this exact source was ingested before and not forced
    splits: dict[str, SplitCounts]
    quarantine: dict[str, int]  # reason code -> images
    source_digest: str | None
    seconds: float | None = None


class EdaReport(BaseModel):
    """Where the EDA report was committed, and its files."""

    key: str
    uri: str
    files: list[str]


def _fetch(settings: Settings, lake: Lake) -> SourceFiles:
    """The source's files, checked against their checksums (the bytes stay in this process)."""
    from zalando.data.sources import fetch_source

    return fetch_source(settings.data_source, cache_dir=settings.work_dir / "cache", s3=lake.s3)


def verify_source(settings: Settings, lake: Lake) -> VerifiedSource:
    """Fetch the four IDX files and check their checksums; the digest of their bytes names the data."""
    src = _fetch(settings, lake)
    return VerifiedSource(source=src.source, digest=src.digest)


def ingest_source(settings: Settings, lake: Lake, *, force: bool = False) -> IngestSummary:
    """Parse, validate (quarantining bad images with a reason) and commit the raw tables."""
    from zalando.data.ingest import ingest

    return IngestSummary.model_validate(ingest(lake, _fetch(settings, lake), force=force))


def make_dataset_version(lake: Lake, *, seed: int, force: bool = False) -> DatasetVersion:
    """Split train/val (stratified, seeded) and store normalisation statistics: the dataset version."""
    from zalando.data.split import preprocess

    return preprocess(lake, seed=seed, force=force)


def write_eda_report(lake: Lake, run_id: str) -> EdaReport:
    """Exploratory tables and pictures of the ingested data, in ``reports/run_id=…/eda``."""
    from zalando.data.eda import write_eda

    return EdaReport.model_validate(write_eda(lake, run_id))
