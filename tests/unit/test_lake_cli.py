"""The CLI on the lake's Iceberg tables (a file:// lake, the SQLite catalog of the work folder):
`zalando lake migrate` and `zalando lake maintain`, `zalando runs` on a legacy lake, and ingest
under catalog faults: locked (retried, else one line), gone, a commit race, a changed schema."""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.test_lake_migrate import build_legacy_lake
from zalando import cli
from zalando.lake import Lake
from zalando.lake import commit as lc
from zalando.settings import load_settings


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mini_dir: Path) -> Path:
    monkeypatch.setenv("ZALANDO_LAKE_URI", (tmp_path / "lake").as_uri())
    monkeypatch.setenv("ZALANDO_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("ZALANDO_DATA_SOURCE", str(mini_dir))
    monkeypatch.delenv("ZALANDO_ICEBERG_CATALOG_URI", raising=False)
    monkeypatch.setattr(cli, "setup_logging", lambda verbose: None)  # keep pytest's log handlers
    return tmp_path


def lake_of_settings() -> Lake:
    """The lake the CLI sees (its catalog: the work folder's SQLite), opened afresh."""
    return Lake.from_settings(load_settings())


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli.app, list(args))
    return r.exit_code, " ".join(r.output.split())


def error_lines(output: str) -> list[str]:
    return [part for part in output.split("error: ")[1:]]


def test_runs_on_a_legacy_lake_says_to_migrate_and_migrate_moves_it_once(env: Path) -> None:
    build_legacy_lake(lake_of_settings())
    code, out = run("runs")
    assert code == 2 and len(error_lines(out)) == 1 and "run `zalando lake migrate`" in out, out
    code, out = run("lake", "migrate")
    assert code == 0, out
    assert "Migrated 6 partitions and 2 decisions" in out and "raw_images │ 52" in out
    assert "left out 2 uncommitted files" in out and "raw/fashion-mnist/split=train/part-00099.parquet" in out
    code, out = run("lake", "migrate")
    assert code == 0 and "nothing to migrate" in out, out
    code, out = run("runs")
    assert code == 0 and "20260101T020000Z-aaaaaa" in out and "cnn" in out, out


def test_maintain_expires_old_snapshots_and_removes_what_a_reingest_left(env: Path) -> None:
    assert run("ingest")[0] == 0
    assert run("ingest", "--force")[0] == 0  # replaces both splits: the first files become history
    lake = lake_of_settings()
    before = lc.scan(lake.catalog(), "raw_images", columns=["image_id"]).num_rows
    snapshots = len(lc.snapshot_log(lake.catalog(), "raw_images"))
    assert snapshots == 3  # the first append; the forced replace's delete and append
    code, out = run("lake", "maintain", "--dry-run", "--orphans-older-than-days", "0")
    assert code == 0 and "(dry run)" in out and "orphan files found" in out, out
    code, out = run("lake", "maintain", "--older-than-days", "0", "--orphans-older-than-days", "0")
    assert code == 0, out
    # the table's row (log lines above it may name the table too)
    row = re.search(r"│ raw_images\s*│\s*(\d+)\s*│\s*(\d+)\s*│", out)
    assert row, out
    expired, removed = int(row.group(1)), int(row.group(2))
    assert expired == snapshots - 1 and removed >= 2, out  # the replaced data files, manifests, lists
    lake = lake_of_settings()
    assert lc.scan(lake.catalog(), "raw_images", columns=["image_id"]).num_rows == before == 2500
    assert len(lc.snapshot_log(lake.catalog(), "raw_images")) == 1  # only the current one stays
    code, out = run("lake", "maintain", "--older-than-days", "0", "--orphans-older-than-days", "0")
    assert code == 0 and "total │ 0 │ 0" in out, out  # nothing left to remove


def test_ingest_with_the_catalog_locked_is_retried_then_one_line(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = env / "cat.db"
    monkeypatch.setenv("ZALANDO_ICEBERG_CATALOG_URI", f"sqlite:///{db}?timeout=0.05")
    assert run("ingest")[0] == 0
    lock = sqlite3.connect(db, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        code, out = run("ingest", "--force")
    finally:
        lock.rollback()
    assert code == 2 and len(error_lines(out)) == 1, out
    assert "database is locked (transient; gave up after 6 attempts)" in out and "Traceback" not in out

    lock.execute("BEGIN EXCLUSIVE")  # released while ingest backs off: the retry goes through
    threading.Timer(0.3, lock.rollback).start()
    code, out = run("ingest", "--force")
    assert code == 0, out
    lock.close()


def test_ingest_with_the_catalog_gone_is_one_line_without_its_password(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando.lake.catalog import RetryPolicy
    from zalando.s3server import free_port_block

    monkeypatch.setattr("zalando.lake.catalog.RetryPolicy", lambda: RetryPolicy(attempts=2, base_delay=0.01))
    port = free_port_block(1)
    monkeypatch.setenv(
        "ZALANDO_ICEBERG_CATALOG_URI", f"postgresql+psycopg://zalando:pg-secret@127.0.0.1:{port}/cat"
    )
    code, out = run("ingest")
    assert code == 2 and len(error_lines(out)) == 1, out
    assert f"zalando:***@127.0.0.1:{port}" in out and "pg-secret" not in out
    assert "gave up after 2 attempts" in out


def test_ingest_that_loses_a_commit_race_is_redone_on_the_fresh_snapshot(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer replaces the raw splits between our table load and our commit."""
    assert run("ingest")[0] == 0
    rival = lake_of_settings()
    rows = lc.scan(rival.catalog(), "raw_images")
    real = lc.conform
    raced: list[int] = []

    def conform_then_race(schema, data, *, where):  # type: ignore[no-untyped-def]
        if "raw_images" in where and not raced:
            raced.append(1)
            from pyiceberg.expressions import AlwaysTrue

            lc.replace_partition(rival.catalog(), "raw_images", rows, AlwaysTrue())
        return real(schema, data, where=where)

    monkeypatch.setattr(lc, "conform", conform_then_race)
    code, out = run("ingest", "--force")
    assert code == 0 and raced, out
    raw = lc.scan(lake_of_settings().catalog(), "raw_images", columns=["image_id"])
    assert raw.num_rows == 2500 and len(set(raw.column("image_id").to_pylist())) == 2500  # nothing doubled
    log = lc.snapshot_log(rival.catalog(), "raw_images")
    assert log[-1]["zalando_operation"] == "replace" and log[-1]["added_rows"] == 2500  # ours landed last


def test_ingest_into_a_table_whose_schema_someone_changed_names_the_column(env: Path) -> None:
    assert run("ingest")[0] == 0
    from pyiceberg.types import StringType

    foreign = lake_of_settings().catalog().catalog.load_table("zalando.raw_images")
    with foreign.update_schema() as update:
        update.add_column("photographer", StringType())
    code, out = run("ingest", "--force")
    assert code == 2 and len(error_lines(out)) == 1, out
    assert "missing photographer" in out and "evolve_schema" in out
