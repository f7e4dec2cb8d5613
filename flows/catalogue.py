"""The `catalogue_scoring` flow (Prefect name `catalogue`): score a retailer's catalogue in Postgres.

Deployed as `catalogue/score-catalogue` (nightly after the training, and by hand). One batch:
repair pending write-backs -> one snapshot of the products and their previous scores -> incremental
selection -> shards of the products file, each fetching its primary images and scoring them with the
batch-scoring engine -> reconcile (products = scored + quarantined + skipped) -> register the batch
in the catalogue's ledger -> one Iceberg commit -> write-back to `product_classification`.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from tasks.catalogue import commit_catalogue_batch, plan_catalogue_batch, score_catalogue_shard
from tasks.common import RunConfig
from tasks.lake import prepare_lake
from zalando.catalogue.scoring import DEFAULT_CATALOGUE_SHARD_SIZE
from zalando.catalogue.server import embedded_postgres
from zalando.lake import new_run_id
from zalando.runtime import Runtime
from zalando.s3server import embedded_s3
from zalando.scoring.batch import ShardRef
from zalando.scoring.shard import ScoringOptions, ShardResult
from zalando.settings import Profile, load_settings


@flow(name="score-catalogue-shards", flow_run_name="score-catalogue-shards-{model_version}")
def score_catalogue_shards(
    cfg: RunConfig, shards: list[ShardRef], model_version: str, options: ScoringOptions, runtime: str = "onnx"
) -> list[ShardResult]:
    """Fan `score-catalogue-shard` out over shard references (never over images)."""
    futures = score_catalogue_shard.map(
        unmapped(cfg), shards, unmapped(model_version), unmapped(options), unmapped(runtime)
    )
    return [f.result() for f in futures]


def _run_name() -> str:
    from prefect.runtime import flow_run

    country = flow_run.parameters.get("country") or "us"
    return f"catalogue-{country}-{flow_run.parameters.get('batch_date') or date.today().isoformat()}"


@flow(name="catalogue", flow_run_name=_run_name)
def catalogue_scoring(
    country: str = "us",
    full: bool = False,
    batch_date: date | None = None,
    model_version: str | None = None,
    shard_size: Annotated[int, Field(ge=1)] = DEFAULT_CATALOGUE_SHARD_SIZE,
    workers: Annotated[int, Field(ge=1, le=64)] = 1,
    confidence_threshold: Annotated[float, Field(ge=0, le=1)] = 0.6,
    allow_empty: bool = False,
    profile: Profile | None = None,
    runtime: Runtime = "auto",
) -> dict[str, Any]:
    """Score the catalogue's products (their primary images) with the champion; write the groups back.

    Args:
        country: the descriptions' country code (two letters).
        full: score every product, not only the new or changed ones (image URL, image digest, or
            the champion since its last score).
        batch_date: the batch's date (default: today, UTC); a second run of a day gets `-2`, `-3`.
        model_version: score with this registered version instead of the champion.
        shard_size: products per shard (fetched and scored together).
        workers: shard tasks at a time (threads); each fetches with ZALANDO_CATALOG_FETCH_CONCURRENCY.
        confidence_threshold: predictions below it are marked needs_review (low_confidence).
        allow_empty: a catalogue with 0 products is an error unless set (then an empty batch).
        profile: the settings profile.
        runtime: as in `batch_scoring` (`auto` measures the fastest once at planning).

    The catalogue is ZALANDO_CATALOG_DSN, or (unset) the embedded server, started for the run when
    it is not running. Nothing is written to it unless the batch reconciles.
    """
    log = get_run_logger()
    settings = load_settings(profile=profile)
    cfg = RunConfig.from_settings(settings, run_id=new_run_id())
    options = ScoringOptions(confidence_threshold=confidence_threshold)
    with embedded_s3(settings), embedded_postgres(settings):
        prepare_lake(cfg)
        plan = plan_catalogue_batch(
            cfg, country, full, batch_date, model_version, shard_size, allow_empty, runtime
        )
        results = score_catalogue_shards.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))(
            cfg, plan.shards, plan.model_version, options, plan.runtime
        )
        committed = commit_catalogue_batch(cfg, plan, options, results)
    summary = committed.model_dump(mode="json")
    log.info(
        "catalogue batch %s: %d products = %d scored + %d quarantined + %d skipped; %d written back",
        committed.batch_id,
        committed.products,
        committed.scored,
        committed.quarantined,
        committed.skipped_products,
        committed.write_back.written,
    )
    return summary
