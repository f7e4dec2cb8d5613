"""Catalogue-scoring steps: plan a catalogue batch, score one of its shards, commit and write it back.

Each opens what it needs from the settings (the catalogue connection: the DSN, or the embedded
server's address) and calls one stage of :mod:`zalando.catalogue.scoring`. A catalogue that cannot
be reached or used is a one-line :class:`~zalando.catalogue.errors.CatalogueError`.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

from zalando.catalogue.db import connect, conninfo_for, describe
from zalando.catalogue.scoring import (
    DEFAULT_CATALOGUE_SHARD_SIZE,
    CatalogueBatchPlan,
    CatalogueBatchResult,
    commit_catalogue_batch,
    plan_catalogue_batch,
    run_catalogue_shard,
)
from zalando.lake.catalog import LakeCatalog
from zalando.lake.tables import PREDICTIONS, load_table
from zalando.scoring.batch import ShardRef
from zalando.scoring.shard import ScoringOptions, ShardResult

if TYPE_CHECKING:
    from zalando.runtime import Runtime
    from zalando.settings import Settings


def plan_catalogue(
    cat: LakeCatalog,
    settings: Settings,
    *,
    country: str = "us",
    full: bool = False,
    batch_date: date | None = None,
    model_version: str | None = None,
    shard_size: int = DEFAULT_CATALOGUE_SHARD_SIZE,
    allow_empty: bool = False,
    runtime: Runtime = "auto",
) -> CatalogueBatchPlan:
    """Repair pending write-backs, snapshot the catalogue, select, shard (stage 1)."""
    conninfo = conninfo_for(settings)
    with connect(conninfo) as conn:
        return plan_catalogue_batch(
            cat,
            conn,
            database=describe(conninfo),
            country=country,
            full=full,
            batch_date=batch_date,
            model_version=model_version,
            shard_size=shard_size,
            allow_empty=allow_empty,
            runtime=runtime,
            threads=settings.torch_threads,
        )


def score_catalogue_shard(
    settings: Settings,
    shard: ShardRef,
    model_version: str,
    options: ScoringOptions,
    runtime: Runtime = "onnx",
) -> ShardResult:
    """Fetch, decode and score one shard's products (stage 2; skipped when already committed)."""
    return run_catalogue_shard(shard, model_version, settings=settings, options=options, runtime=runtime)


def commit_catalogue(
    cat: LakeCatalog,
    settings: Settings,
    plan: CatalogueBatchPlan,
    options: ScoringOptions,
    results: list[ShardResult] | None,
) -> CatalogueBatchResult:
    """Reconcile, register, commit to the lake, write back (stage 3)."""
    with connect(conninfo_for(settings)) as conn:
        result = commit_catalogue_batch(cat, conn, plan, options, results)
    table = load_table(cat, PREDICTIONS)
    result.predictions_uri = table.metadata_location if table is not None else ""
    return result
