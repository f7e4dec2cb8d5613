"""The `nightly` flow: `training` then `batch_scoring`, as subflows (each with its own page in the UI).

Deployed as `nightly/nightly` on the cron `0 2 * * *` (UTC) with the `cpu` profile.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from flows.batch_scoring import Runner, batch_scoring
from flows.training import training
from zalando.scoring.run import DEFAULT_SHARD_SIZE
from zalando.settings import Profile


@flow(name="nightly", flow_run_name="nightly-{profile}")
def nightly(
    profile: Profile = "cpu",
    experiments: list[str] | None = None,
    batch_uri: str | None = None,
    batch_date: date | None = None,
    shard_size: Annotated[int, Field(ge=1)] = DEFAULT_SHARD_SIZE,
    runner: Runner = "local",
    workers: Annotated[int, Field(ge=1, le=64)] = 1,
    dask_address: str | None = None,
    force: bool = False,
    allow_empty: bool = False,
    shadow: bool = False,
) -> dict[str, Any]:
    """Retrain (cached steps skip when nothing changed), promote a champion, score the night's batch.

    Args:
        profile: paper, cpu (the nightly default) or quick (tests and demos).
        experiments: train only these experiments (default: every experiment of the profile).
        batch_uri: the night's batch (default: the Fashion-MNIST test split, the demo batch).
        batch_date: the batch's date (default: today, UTC).
        shard_size: rows per scoring shard.
        runner: `local` or `dask`, for the training tasks (one experiment per Dask worker) and the
            scoring shards.
        workers: shard tasks at a time (without `dask_address`: the local cluster's workers).
        dask_address: the Dask scheduler both use (runner `dask`), e.g. tcp://10.0.0.5:8786;
            default: a local cluster each.
        force: redo cached steps and re-score a committed batch.
        allow_empty: score a batch location without input files as an empty batch (else an error).
        shadow: also score the batch with the challenger (the newest registered model that is not
            the champion, e.g. tonight's rejected one) beside the champion (see `batch_scoring`).
    """
    trained = training(
        profile=profile,
        experiments=experiments,
        force=force,
        reason="nightly",
        runner=runner,
        dask_address=dask_address,
    )
    scored = batch_scoring(
        batch_uri=batch_uri,
        batch_date=batch_date,
        shard_size=shard_size,
        runner=runner,
        workers=workers,
        dask_address=dask_address,
        force=force,
        profile=profile,
        allow_empty=allow_empty,
        shadow=shadow,
    )
    get_run_logger().info("nightly done: run %s, batch %s", trained["run_id"], scored["batch_id"])
    return {"training": trained, "scoring": scored}
