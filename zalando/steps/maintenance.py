"""Maintenance step: expire the lake tables' old snapshots and remove the files nothing references.

Every commit adds a snapshot (and a metadata file, a manifest list, a manifest); a partition replace
also leaves the replaced data files behind for time travel. :func:`maintain_lake` expires the
snapshots older than N days (time travel past them ends; each table's current snapshot always
stays), then deletes the files under the tables' locations that no live snapshot or metadata file
references and that are older than M days (younger ones may belong to a commit in flight, or to
scoring shards waiting for their batch's commit), and aborts the multipart uploads under the lake
left unfinished for as long (a writer killed mid-upload: its parts hold storage that no listing
shows). Run weekly by the ``lake-maintenance`` deployment,
or by hand with ``zalando lake maintain``.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from pydantic import BaseModel

from zalando.lake import Lake

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOT_DAYS = 7.0
DEFAULT_ORPHAN_DAYS = 3.0


class TableMaintenance(BaseModel):
    """What maintenance did to one table."""

    table: str
    snapshots_expired: int
    orphan_files: int  # removed (or, on a dry run, found)
    orphan_keys: list[str]


class MaintenanceResult(BaseModel):
    """What ``zalando lake maintain`` did, per table."""

    older_than_days: float
    orphans_older_than_days: float
    dry_run: bool
    tables: list[TableMaintenance]
    stale_uploads: list[str] = []  # keys of the unfinished uploads aborted (or, on a dry run, found)
    seconds: float

    @property
    def snapshots_expired(self) -> int:
        return sum(t.snapshots_expired for t in self.tables)

    @property
    def orphan_files(self) -> int:
        return sum(t.orphan_files for t in self.tables)


def maintain_lake(
    lake: Lake,
    *,
    older_than_days: float = DEFAULT_SNAPSHOT_DAYS,
    orphans_older_than_days: float = DEFAULT_ORPHAN_DAYS,
    dry_run: bool = False,
) -> MaintenanceResult:
    """Expire snapshots older than ``older_than_days``, then remove orphan files and abort unfinished
    uploads older than ``orphans_older_than_days`` (a dry run changes nothing and lists what it would
    remove)."""
    from zalando.lake.commit import maintain

    t0 = time.perf_counter()
    report = maintain(
        lake.catalog(),
        snapshots_older_than=timedelta(days=older_than_days),
        orphans_older_than=timedelta(days=orphans_older_than_days),
        dry_run=dry_run,
    )
    names = sorted(set(report.expired) | set(report.orphans))
    tables = [
        TableMaintenance(
            table=name,
            snapshots_expired=report.expired.get(name, 0),
            orphan_files=len(report.orphans.get(name, [])),
            orphan_keys=sorted(report.orphans.get(name, [])),
        )
        for name in names
    ]
    uploads = lake.stale_uploads(timedelta(days=orphans_older_than_days), abort=not dry_run)
    result = MaintenanceResult(
        older_than_days=older_than_days,
        orphans_older_than_days=orphans_older_than_days,
        dry_run=dry_run,
        tables=tables,
        stale_uploads=uploads,
        seconds=round(time.perf_counter() - t0, 2),
    )
    log.info(
        "lake maintenance%s: %d snapshots expired, %d orphan files and %d unfinished uploads %s in %.1fs",
        " (dry run)" if dry_run else "",
        result.snapshots_expired,
        result.orphan_files,
        len(uploads),
        "found" if dry_run else "removed",
        result.seconds,
    )
    return result
