"""The `lake-maintenance` flow: expire the lake tables' old snapshots and remove unreferenced files.

Deployed as `lake-maintenance/weekly` on the cron `0 3 * * 0` (Sundays, 03:00 UTC, an hour after
the night's run starts and long after it has committed); `zalando lake maintain` does the same by hand.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from tasks.common import RunConfig
from tasks.lake import maintain_lake, prepare_lake
from zalando.lake import new_run_id
from zalando.s3server import embedded_s3
from zalando.settings import load_settings
from zalando.steps.maintenance import DEFAULT_ORPHAN_DAYS, DEFAULT_SNAPSHOT_DAYS


@flow(name="lake-maintenance", flow_run_name="lake-maintenance")
def lake_maintenance(
    older_than_days: Annotated[float, Field(ge=0)] = DEFAULT_SNAPSHOT_DAYS,
    orphans_older_than_days: Annotated[float, Field(ge=0)] = DEFAULT_ORPHAN_DAYS,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Expire snapshots older than N days, then remove orphan files and abort unfinished multipart
    uploads older than M days.

    Args:
        older_than_days: snapshots older than this are expired (time travel past them ends).
        orphans_older_than_days: unreferenced files and unfinished uploads older than this are
            deleted (younger ones may belong to a commit in flight).
        dry_run: expire nothing; report the orphan files that would be removed.
    """
    settings = load_settings()
    cfg = RunConfig.from_settings(settings, run_id=new_run_id())
    with embedded_s3(settings):
        prepare_lake(cfg)
        out = maintain_lake(cfg, older_than_days, orphans_older_than_days, dry_run)
    get_run_logger().info(
        "lake maintenance done: %d snapshots expired, %d orphan files, %d unfinished uploads",
        out.snapshots_expired,
        out.orphan_files,
        len(out.stale_uploads),
    )
    return out.model_dump(mode="json")
