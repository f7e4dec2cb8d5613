"""Storage tasks: check the lake answers with our credentials and that its bucket exists; maintain
the lake's tables (expire old snapshots, remove unreferenced files)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.common import RunConfig, io_task_options
from zalando.steps import maintenance, storage
from zalando.steps.maintenance import MaintenanceResult


@task(name="prepare-lake", cache_policy=NO_CACHE, **io_task_options())
def prepare_lake(cfg: RunConfig) -> str:
    """Fail fast (one line) when the storage is unreachable or refuses us; create a missing bucket."""
    uri = storage.prepare_lake(cfg.lake())
    get_run_logger().info("lake ready: %s", uri)
    return uri


@task(name="maintain-lake", cache_policy=NO_CACHE, **io_task_options())
def maintain_lake(
    cfg: RunConfig, older_than_days: float, orphans_older_than_days: float, dry_run: bool = False
) -> MaintenanceResult:
    """Expire the tables' old snapshots and remove unreferenced files; publish what went, per table.

    Retried on transient faults: expiring and removing are idempotent (a second pass finds less).
    """
    out = maintenance.maintain_lake(
        cfg.lake(),
        older_than_days=older_than_days,
        orphans_older_than_days=orphans_older_than_days,
        dry_run=dry_run,
    )
    create_table_artifact(
        key="lake-maintenance",
        table=[t.model_dump(exclude={"orphan_keys"}) for t in out.tables],
        description=(
            f"Snapshots older than {older_than_days:g} days expired ({out.snapshots_expired}), "
            f"orphan files older than {orphans_older_than_days:g} days "
            f"{'found' if dry_run else 'removed'} ({out.orphan_files})"
        ),
    )
    get_run_logger().info(
        "lake maintenance: %d snapshots expired, %d orphan files %s",
        out.snapshots_expired,
        out.orphan_files,
        "found" if dry_run else "removed",
    )
    return out
