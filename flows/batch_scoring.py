"""The `batch_scoring` flow: score one batch with the champion, shard by shard, exactly once, then
measure its drift (an alarm emits `zalando.drift.alarm`, and the automation in prefect.yaml retrains).

Deployed as `batch_scoring/score` (by hand) and run inside `nightly`. Shards are scored by the
`score-shards` subflow, whose task runner is chosen per run: Prefect's thread pool (`local`) or
prefect-dask's DaskTaskRunner (`dask`: a local cluster, or the scheduler at `dask_address`).
"""

from __future__ import annotations

import time
from datetime import date
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import Field

from tasks.common import RunConfig
from tasks.lake import prepare_lake
from tasks.scoring import commit_batch, monitor_drift, plan_batch, score_shard, shadow_score
from zalando.lake import new_run_id
from zalando.runtime import Runtime
from zalando.s3server import embedded_s3
from zalando.scoring.batch import ShardRef
from zalando.scoring.run import DEFAULT_SHARD_SIZE, timed_batch
from zalando.scoring.shard import ScoringOptions, ShardResult
from zalando.settings import Profile, load_settings

Runner = Literal["local", "dask"]


@flow(name="score-shards", flow_run_name="score-shards-{model_version}")
def score_shards(
    cfg: RunConfig, shards: list[ShardRef], model_version: str, options: ScoringOptions, runtime: str = "onnx"
) -> list[ShardResult]:
    """Fan `score-shard` out over shard references (never over images), all with the planned runtime."""
    futures = score_shard.map(
        unmapped(cfg), shards, unmapped(model_version), unmapped(options), unmapped(runtime)
    )
    return [f.result() for f in futures]


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"batch-scoring-{flow_run.parameters.get('batch_date') or date.today().isoformat()}"


def _shard_runner(runner: Runner, workers: int, dask_address: str | None) -> Any:
    if runner == "dask":
        from prefect_dask import DaskTaskRunner  # imported only when asked for: dask is heavy

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    return ThreadPoolTaskRunner(max_workers=workers)


def _shadow(
    cfg: RunConfig,
    plan: Any,
    batch_uri: str | None,
    options: ScoringOptions,
    shard_size: int,
    runtime: Runtime,
    force: bool,
    log: Any,
) -> dict[str, Any] | None:
    """The shadow task's result; a failed task (its retries spent) is one log line, never the flow's failure."""
    state = shadow_score(cfg, quote(plan), batch_uri, options, shard_size, runtime, force, return_state=True)
    if state.is_failed():
        log.warning("shadow scoring of batch %s failed; its predictions are committed", plan.batch_id)
        return None
    return state.result().model_dump(mode="json")


@flow(name="batch_scoring", flow_run_name=_run_name)
def batch_scoring(
    batch_uri: str | None = None,
    batch_date: date | None = None,
    model_version: str | None = None,
    shard_size: Annotated[int, Field(ge=1)] = DEFAULT_SHARD_SIZE,
    runner: Runner = "local",
    workers: Annotated[int, Field(ge=1, le=64)] = 1,
    dask_address: str | None = None,
    confidence_threshold: Annotated[float, Field(ge=0, le=1)] = 0.6,
    force: bool = False,
    monitor: bool = True,
    profile: Profile | None = None,
    runtime: Runtime = "auto",
    allow_empty: bool = False,
    shadow: bool = False,
) -> dict[str, Any]:
    """Score the batch at `batch_uri` with the champion model; commit predictions exactly once.

    Args:
        batch_uri: lake key or s3:// / file:// location of Parquet or image files (default: the
            Fashion-MNIST test split, the built-in demo batch).
        batch_date: the batch's date (default: today, UTC); with the source it names the batch.
        model_version: score with this registered version instead of the champion.
        shard_size: rows per shard.
        runner: `local` (Prefect's thread pool) or `dask` (prefect-dask's DaskTaskRunner).
        workers: shard tasks at a time (threads, or Dask worker processes).
        dask_address: an existing Dask scheduler (runner `dask`); default: a local cluster.
        confidence_threshold: predictions below it are marked needs_review (the review queue).
        force: score again even when this batch is already committed for this model.
        monitor: measure label-free drift against the model's reference; an alarm emits the
            `zalando.drift.alarm` event, which runs the `retrain` deployment.
        profile: the profile of the run this batch belongs to (passed on with the drift alarm).
        runtime: `auto` measures ONNX Runtime, torch and (on CPUs with native bf16) torch under
            bf16 autocast once at planning and scores every shard with the fastest (Dask workers:
            ONNX Runtime, so they never import torch); or name one. Runtimes agree to 1e-4
            (bf16: 0.02) in probability, so a near-tie may be decided differently between them;
            the batch's row in the `batches` table records the runtime used.
        shadow: after the batch's commit, also score it with the challenger (the newest registered
            model version that is not the champion) into `shadow_predictions`, never `predictions`,
            and commit their agreement per group (`shadow_agreement`, a `shadow-agreement`
            artifact). No challenger, or one that fails: one log line, and the batch stays committed.
        allow_empty: a batch location without input files is an error (a typo in `batch_uri` must
            not score nothing, night after night); set this for the rare batch that may be empty.

    The summary's `seconds` is the batch's wall time from planning to commit (`timings` splits it:
    plan, shards, finalize). A location outside ZALANDO_BATCH_ROOTS / the lake's bucket and
    ZALANDO_BATCH_BUCKETS fails at planning, before anything is read.
    """
    log = get_run_logger()
    settings = load_settings(profile=profile)
    cfg = RunConfig.from_settings(settings, run_id=new_run_id())
    options = ScoringOptions(confidence_threshold=confidence_threshold)
    with embedded_s3(settings):
        prepare_lake(cfg)
        started = time.perf_counter()
        plan = plan_batch(cfg, batch_uri, model_version, batch_date, shard_size, force, runtime, allow_empty)
        planned = time.perf_counter()
        results = None
        if not plan.committed:
            runner_impl = _shard_runner(runner, workers, dask_address)
            # the runtime measured fastest at planning; Dask workers stay torch-free (ONNX Runtime)
            shard_runtime = "onnx" if runner == "dask" and runtime == "auto" else plan.runtime
            results = score_shards.with_options(task_runner=runner_impl)(
                cfg, plan.shards, plan.model_version, options, shard_runtime
            )
        scored = time.perf_counter()
        # quote: Prefect would visit every record of the plan for futures (0.4 s for 500 images)
        committed = commit_batch(cfg, quote(plan), options, quote(results))
        if not plan.committed:  # the batch's time, not the commit's
            committed = timed_batch(committed, results or [], started=started, planned=planned, scored=scored)
        summary = committed.model_dump(mode="json")
        summary["planned_runtime"] = plan.runtime
        summary["shard_runtimes"] = sorted({r.runtime for r in results or [] if r.runtime})
        # an empty batch (or one whose every input was quarantined) has nothing to measure
        drift = monitor_drift(cfg, quote(plan), options) if monitor and summary["scored"] > 0 else None
        summary["drift"] = drift.model_dump(mode="json", exclude={"table"}) if drift else None
        if shadow:
            summary["shadow"] = _shadow(cfg, plan, batch_uri, options, shard_size, runtime, force, log)
    log.info(
        "batch %s: %d scored, %d quarantined, model %s -> %s (snapshot %s)",
        summary["batch_id"],
        summary["scored"],
        summary["quarantined"],
        summary["model_version"],
        summary["predictions_table"],
        summary["snapshot_id"],
    )
    return summary
