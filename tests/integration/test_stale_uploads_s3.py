"""`zalando lake maintain` aborts the multipart uploads a killed writer left under the lake (their
parts hold storage no listing shows), on the real S3 server: only old ones, only under the lake's
prefix, and a dry run only lists them."""

from __future__ import annotations

from datetime import timedelta

from zalando.lake import Lake
from zalando.steps.maintenance import maintain_lake


def _start_upload(lake: Lake, key: str) -> str:
    """A multipart upload with one part, never completed: what a writer killed mid-write leaves."""
    client = lake._boto_client()
    upload = client.create_multipart_upload(Bucket=lake.bucket, Key=key)
    client.upload_part(
        Bucket=lake.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    return upload["UploadId"]


def _open_uploads(lake: Lake) -> set[str]:
    page = lake._boto_client().list_multipart_uploads(Bucket=lake.bucket)
    return {u["Key"] for u in page.get("Uploads", [])}


def test_maintenance_aborts_the_old_unfinished_uploads_under_the_lake(s3_lake: Lake) -> None:
    prefix = s3_lake.root.partition("/")[2]
    inside = f"{prefix}/predictions/data/part-killed.parquet"
    outside = f"someone-else-{prefix}/big.bin"  # same bucket, not the lake's prefix
    _start_upload(s3_lake, inside)
    _start_upload(s3_lake, outside)
    assert {inside, outside} <= _open_uploads(s3_lake)

    # younger than the age limit: may be a write in flight, left alone
    assert s3_lake.stale_uploads(timedelta(days=1), abort=True) == []
    assert inside in _open_uploads(s3_lake)

    dry = maintain_lake(s3_lake, orphans_older_than_days=0, dry_run=True)
    assert dry.stale_uploads == ["predictions/data/part-killed.parquet"]
    assert inside in _open_uploads(s3_lake)  # a dry run changes nothing

    done = maintain_lake(s3_lake, orphans_older_than_days=0)
    assert done.stale_uploads == ["predictions/data/part-killed.parquet"]
    left = _open_uploads(s3_lake)
    assert inside not in left and outside in left  # only the lake's own


def test_a_local_lake_has_no_uploads(local_lake: Lake) -> None:
    assert local_lake.stale_uploads(timedelta(0), abort=True) == []
    assert maintain_lake(local_lake, orphans_older_than_days=0).stale_uploads == []
