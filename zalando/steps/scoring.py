"""Batch-scoring steps: plan a batch into shard references, score one shard, commit the batch.

Exactly-once lives in :mod:`zalando.scoring`: shard files and markers are deterministic for a plan,
and the batch becomes visible in one Iceberg commit of its shard files (its row in ``batches``
last), so a retry or a re-run scores only what is missing. These steps stay torch-free on import
(Dask workers scoring with ONNX Runtime import this module).
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

from zalando.lake.catalog import LakeCatalog
from zalando.lake.tables import PREDICTIONS, load_table
from zalando.scoring.batch import ShardRef, find_demo_batch
from zalando.scoring.commit import BatchResult, batch_summary, finalize_batch
from zalando.scoring.run import BatchPlan, prepare_batch, run_shard, shadow_plan
from zalando.scoring.shadow import ShadowResult
from zalando.scoring.shard import ScoringOptions, ShardResult

if TYPE_CHECKING:
    from zalando.runtime import Runtime
    from zalando.settings import Settings


class CommittedBatch(BatchResult):
    """A committed batch (or one found already committed), with where its predictions are."""

    predictions_uri: str  # the predictions table's metadata file: what DuckDB's iceberg_scan() reads


def plan_batch(
    cat: LakeCatalog,
    location: str | None,
    *,
    model_version: str | None = None,
    batch_date: date | None = None,
    shard_size: int,
    force: bool = False,
    runtime: Runtime = "auto",
    allow_empty: bool = False,
) -> BatchPlan:
    """Pin the model version (the champion unless given), list the batch's inputs (default: the demo
    batch), cut shards, and check the model once (``auto``: measuring which runtime shards should use).
    A location without input files is an error unless ``allow_empty``."""
    return prepare_batch(
        cat,
        location or find_demo_batch(cat.lake),
        model_version=model_version,
        batch_date=batch_date,
        shard_size=shard_size,
        force=force,
        runtime=runtime,
        allow_empty=allow_empty,
    )


def score_shard(
    settings: Settings,
    shard: ShardRef,
    model_version: str,
    options: ScoringOptions,
    runtime: Runtime = "onnx",
) -> ShardResult:
    """Score one shard with the planned runtime (skipped when an earlier attempt committed it); the
    lake and the checked predictor are built once per worker process."""
    return run_shard(shard, model_version, options=options, settings=settings, runtime=runtime)


def commit_batch(
    cat: LakeCatalog, plan: BatchPlan, options: ScoringOptions, results: list[ShardResult] | None
) -> CommittedBatch:
    """Reconcile the shards and commit the batch (one Iceberg commit of its shard files); a batch
    committed before (the plan says so) is summarised from its row in ``batches`` instead."""
    if plan.committed:
        result = batch_summary(cat, plan.batch_id, plan.model_version)
    else:
        assert plan.batch is not None  # an uncommitted plan always describes its batch
        result = finalize_batch(
            cat, plan.batch, plan.shards, plan.model_version, options=options, results=results
        )
    table = load_table(cat, PREDICTIONS)
    uri = table.metadata_location if table is not None else ""
    return CommittedBatch(**result.model_dump(), predictions_uri=uri)


def shadow_batch(
    cat: LakeCatalog,
    plan: BatchPlan,
    location: str | None,
    options: ScoringOptions,
    *,
    shard_size: int,
    runtime: Runtime = "auto",
    force: bool = False,
) -> ShadowResult:
    """Score the committed batch again with the challenger, into ``shadow_predictions``, and commit
    its agreement with the champion; never raises (a failure is the result's ``failed`` status)."""
    return shadow_plan(
        cat, plan, location or find_demo_batch(cat.lake), options=options, shard_size=shard_size,
        runtime=runtime, force=force,
    )  # fmt: skip
