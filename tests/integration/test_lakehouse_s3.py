"""The Iceberg lakehouse against a real SeaweedFS S3 server (the session's ``s3_server``): tables in
the lake's bucket with the SQLite catalog in the work folder, shard files committed with add_files,
committed-only reads by a second catalog and by DuckDB, maintenance on S3, wrong credentials."""

from __future__ import annotations

from datetime import timedelta

import pyarrow.dataset as ds
import pytest

from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.lakehouse_support import DAY, duckdb_with_iceberg, prediction_rows
from zalando.errors import LakeError
from zalando.lake import Lake
from zalando.lake import commit as lc
from zalando.lake import tables as lt
from zalando.lake.catalog import LakeCatalog, RetryPolicy, open_catalog, storage_path
from zalando.s3server import S3Server
from zalando.settings import Settings

pytestmark = pytest.mark.integration

FAST = RetryPolicy(attempts=4, base_delay=0.05, max_delay=0.5)
BATCH = {"batch_id": "b1", "model_version": "v1"}


@pytest.fixture
def cat(s3_settings: Settings, s3_lake: Lake) -> LakeCatalog:
    return open_catalog(s3_settings, lake=s3_lake, retry=FAST)


def test_tables_live_in_the_lakes_bucket_and_commit_exactly_once(
    cat: LakeCatalog, s3_settings: Settings, s3_lake: Lake
) -> None:
    prefix = s3_settings.lake_uri.removeprefix("s3://")
    lc.append(cat, "predictions", prediction_rows(10_000, "b0"))
    table = lt.load_table(cat, "predictions")
    assert table.location() == f"{s3_settings.lake_uri}/zalando/predictions"
    assert table.metadata_location.startswith(f"s3://{prefix}/zalando/predictions/metadata/")

    for _ in range(2):  # a re-run replaces the batch's rows
        lc.replace_partition(
            cat, "predictions", prediction_rows(10_000, "b0", confidence=0.9), {"batch_id": "b0"}
        )
    assert lc.scan(cat, "predictions", {"batch_id": "b0"}).num_rows == 10_000

    part = {"batch_date": DAY, "model_version": "v1", "batch_id": "b1"}
    keys = [
        lc.data_file_key(cat, "predictions", run_id="run-1", shard_id=s, partition=part) for s in range(10)
    ]
    schema = lt.table_schema(cat, "predictions")
    for s, key in enumerate(keys):
        lc.write_data_file(cat.lake, key, prediction_rows(100, "b1", first_id=100 * s), schema=schema)
    assert set(keys) <= set(s3_lake.list_keys("zalando/predictions/data"))
    second = open_catalog(s3_settings, lake=Lake.from_settings(s3_settings), retry=FAST)
    assert lc.scan(second, "predictions", {"batch_id": "b1"}).num_rows == 0  # written, not committed

    result = lc.add_data_files(cat, "predictions", keys, replace=BATCH)
    assert result.added_files == 10 and result.added_rows == 1000
    rows = lc.scan(second, "predictions", BATCH)
    assert rows.num_rows == 1000 and len(set(rows.column("image_id").to_pylist())) == 1000
    assert lc.scan(second, "predictions").num_rows == 11_000


def test_maintenance_on_s3_removes_exactly_the_unreferenced_files(cat: LakeCatalog, s3_lake: Lake) -> None:
    for i in range(3):
        lc.replace_partition(cat, "predictions", prediction_rows(50, "b1", confidence=i / 10), BATCH)
    stray = "zalando/predictions/data/stray.parquet"
    s3_lake.write_bytes(stray, b"not even parquet")
    before = lc.scan(cat, "predictions").sort_by("image_id")
    assert lc.remove_orphan_files(cat, timedelta(days=3)) == {"predictions": []}  # all young: kept

    assert lc.expire_snapshots(cat, timedelta(0))["predictions"] >= 2
    listed = set(s3_lake.list_keys("zalando/predictions"))
    live = {cat.key_of(p) for p in lc.referenced_files(lt.load_table(cat, "predictions"))}
    assert live <= listed and stray in listed - live
    report = lc.maintain(cat, snapshots_older_than=timedelta(0), orphans_older_than=timedelta(0))
    assert set(report.orphans["predictions"]) == listed - live
    assert set(s3_lake.list_keys("zalando/predictions")) == live
    assert lc.scan(cat, "predictions").sort_by("image_id").equals(before)


def test_second_engines_see_only_committed_rows_on_s3(
    cat: LakeCatalog, s3_server: S3Server, s3_settings: Settings
) -> None:
    lc.append(cat, "predictions", prediction_rows(30, "b1"))
    schema = lt.table_schema(cat, "predictions")
    for s in range(2):  # a batch mid-write
        key = lc.data_file_key(cat, "predictions", run_id="r", shard_id=s, partition={"batch_id": "b2"})
        lc.write_data_file(cat.lake, key, prediction_rows(10, "b2", first_id=10 * s), schema=schema)
    table = lt.load_table(cat, "predictions")
    files = [storage_path(t.file.file_path) for t in table.scan().plan_files()]
    assert ds.dataset(files, format="parquet", filesystem=cat.lake.fs).to_table().num_rows == 30

    con = duckdb_with_iceberg()
    host = s3_server.endpoint.removeprefix("http://")
    con.execute(
        f"CREATE SECRET lake (TYPE s3, KEY_ID '{TEST_ACCESS_KEY}', SECRET '{TEST_SECRET_KEY}', "
        f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false, REGION '{s3_settings.s3_region}')"
    )
    sql = f"SELECT batch_id, count(*) FROM iceberg_scan('{table.metadata_location}') GROUP BY 1 ORDER BY 1"
    assert con.sql(sql).fetchall() == [("b1", 30)]


def test_wrong_s3_credentials_fail_a_commit_with_one_line(s3_settings: Settings, s3_lake: Lake) -> None:
    bad = s3_settings.model_copy(update={"s3_secret_key": type(s3_settings.s3_secret_key)("not-the-key")})
    with pytest.raises(LakeError) as err:  # opening reads the lake already (its layout check)
        cat = open_catalog(bad, retry=RetryPolicy(attempts=2, base_delay=0.01))
        lc.append(cat, "predictions", prediction_rows(3, "b1"))
    msg = str(err.value)
    assert "\n" not in msg and "not-the-key" not in msg
