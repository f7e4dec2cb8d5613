"""Catalogue-scoring tasks: plan a catalogue batch, score one shard, commit and write the batch back,
with the batch's artifacts. Each calls one step of :mod:`zalando.steps.catalogue`.

Never cached, as the batch-scoring tasks: exactly-once lives in the library (shard markers, one
Iceberg commit, the catalogue's ledger), so a retry or a re-run does only what is missing.
"""

from __future__ import annotations

import os
from datetime import date
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.common import RunConfig, io_task_options
from zalando.catalogue.scoring import CatalogueBatchPlan, CatalogueBatchResult
from zalando.steps import catalogue

if TYPE_CHECKING:
    from zalando.scoring.batch import ShardRef
    from zalando.scoring.shard import ScoringOptions, ShardResult


@task(name="plan-catalogue-batch", cache_policy=NO_CACHE, **io_task_options())
def plan_catalogue_batch(
    cfg: RunConfig,
    country: str,
    full: bool,
    batch_date: date | None,
    model_version: str | None,
    shard_size: int,
    allow_empty: bool,
    runtime: str = "auto",
) -> CatalogueBatchPlan:
    """Repair pending write-backs, read one snapshot of the catalogue, select what changed, shard it."""
    plan = catalogue.plan_catalogue(
        cfg.catalog(),
        cfg.settings(),
        country=country,
        full=full,
        batch_date=batch_date,
        model_version=model_version,
        shard_size=shard_size,
        allow_empty=allow_empty,
        runtime=runtime,  # type: ignore[arg-type]
    )
    get_run_logger().info(
        "catalogue batch %s (%s): %d products, %d shard(s), model %s%s",
        plan.batch_id,
        plan.database,
        plan.products,
        len(plan.shards),
        plan.model_version,
        f"; repaired {', '.join(r.batch_id for r in plan.repaired)}" if plan.repaired else "",
    )
    return plan


@task(name="score-catalogue-shard", cache_policy=NO_CACHE, **io_task_options())
def score_catalogue_shard(
    cfg: RunConfig, shard: ShardRef, model_version: str, options: ScoringOptions, runtime: str = "onnx"
) -> ShardResult:
    """Fetch one shard's primary images, leave out the unchanged, score the rest (exactly once)."""
    result = catalogue.score_catalogue_shard(cfg.settings(), shard, model_version, options, runtime)  # type: ignore[arg-type]
    get_run_logger().info(
        "catalogue shard %d/%d: %d scored, %d quarantined, %d unchanged%s in %.2fs",
        shard.shard_id + 1,
        shard.num_shards,
        result.scored,
        result.quarantined,
        result.unchanged,
        " (already committed)" if result.skipped else "",
        result.seconds,
    )
    return result


@task(name="commit-catalogue-batch", cache_policy=NO_CACHE, **io_task_options())
def commit_catalogue_batch(
    cfg: RunConfig, plan: CatalogueBatchPlan, options: ScoringOptions, results: list[ShardResult]
) -> CatalogueBatchResult:
    """Reconcile products = scored + quarantined + skipped, commit to the lake, write back; artifacts."""
    result = catalogue.commit_catalogue(cfg.catalog(), cfg.settings(), plan, options, results)
    _artifacts(result, os.environ.get("ZALANDO_UI_BASE_URL"))  # the review desk, when it runs
    return result


def _artifacts(r: CatalogueBatchResult, ui_base_url: str | None) -> None:
    rec = r.reconciliation
    create_table_artifact(
        key="catalogue-reconciliation",
        table=[
            {
                "products": rec.products,
                "scored": rec.scored,
                "quarantined": rec.quarantined,
                "skipped (unchanged)": rec.skipped,
                "balanced": rec.balanced,
            },
        ],  # fmt: skip
        description=f"Catalogue batch {r.batch_id}: products = scored + quarantined + skipped",
    )
    create_table_artifact(
        key="catalogue-group-counts",
        table=[{"group": g, "predicted": n} for g, n in r.group_counts.items()],
        description=f"Predicted group counts of catalogue batch {r.batch_id} (model {r.model_version})",
    )
    reasons = ", ".join(f"{k}: {v}" for k, v in r.reasons.items()) or "none"
    wb = r.write_back
    create_markdown_artifact(
        key="catalogue-summary",
        markdown=(
            f"# Catalogue batch {r.batch_id}\n\n| | |\n|---|---|\n"
            f"| catalogue | `{r.database}` (descriptions for `{r.country}`) |\n"
            f"| model version | `{r.model_version}` |\n"
            f"| products | {r.products} |\n| scored | {r.scored} |\n"
            f"| quarantined | {r.quarantined} ({reasons}) |\n"
            f"| skipped (unchanged since their last score) | {r.skipped_products} |\n"
            f"| needs review: text_disagrees | {r.text.disagreeing} ({100 * r.text.share_of_products:.1f}%) |\n"
            f"| low confidence | {r.low_confidence} |\n"
            f"| write-back (product_classification) | {wb.written} written, {wb.unchanged} unchanged, "
            f"{wb.kept_newer} kept (newer), {wb.products_gone} products gone |\n"
            f"| repaired earlier write-backs | {', '.join(x.batch_id for x in r.repaired) or 'none'} |\n\n"
            f"Predictions: `{r.predictions_table}` where `batch_id = '{r.batch_id}'` "
            f"(snapshot {r.snapshot_id}; metadata `{r.predictions_uri}`)\n"
        ),
        description=f"Catalogue batch {r.batch_id} scored with {r.model_version}",
    )
    if ui_base_url:
        from zalando.ui.links import review_path

        create_link_artifact(
            key="catalogue-review-queue",
            link=ui_base_url.rstrip("/") + review_path(r.batch_id, r.model_version),
            link_text=f"review queue of {r.batch_id}",
        )
