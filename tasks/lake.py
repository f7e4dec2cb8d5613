"""Storage set-up: check the lake answers with our credentials and that its bucket exists."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.common import RunConfig, io_task_options
from zalando.steps import storage


@task(name="prepare-lake", cache_policy=NO_CACHE, **io_task_options())
def prepare_lake(cfg: RunConfig) -> str:
    """Fail fast (one line) when the storage is unreachable or refuses us; create a missing bucket."""
    uri = storage.prepare_lake(cfg.lake())
    get_run_logger().info("lake ready: %s", uri)
    return uri
