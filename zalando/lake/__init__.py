"""The lake: the one owner of storage.

- :mod:`zalando.lake.store`: the object store under the lake's root (``s3://bucket/prefix`` or
  ``file:///abs/path``): keys, objects, Parquet I/O, the fault classification that retries key on;
- :mod:`zalando.lake.catalog`: the Iceberg catalog (embedded SQLite by default, or the one
  ``ZALANDO_ICEBERG_CATALOG_URI`` names) over the lake's own bucket, and its error handling;
- :mod:`zalando.lake.tables`: table names, schemas, partition specs, schema checks and evolution;
- :mod:`zalando.lake.commit`: appends, partition replaces, ``add_files`` of shard files, scans with
  time travel, and maintenance (expire snapshots, remove orphan files).

The object store's names are importable from here (``from zalando.lake import Lake``); the table
modules are imported by name, so a torch-free scoring worker that only writes shard files never
imports pyiceberg. Nothing here runs at import time, and nothing here imports prefect.
"""

from zalando.lake.store import (
    MANIFEST,
    Lake,
    S3Config,
    iter_batches,
    new_run_id,
    retry_io,
    storage_fault_is_transient,
    table_to_parquet_bytes,
    validate_key,
)

__all__ = [
    "MANIFEST",
    "Lake",
    "S3Config",
    "iter_batches",
    "new_run_id",
    "retry_io",
    "storage_fault_is_transient",
    "table_to_parquet_bytes",
    "validate_key",
]
