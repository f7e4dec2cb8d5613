"""The lake's tables as Apache Iceberg tables (issue 13), through pyiceberg.

- :mod:`zalando.lakehouse.catalog`: the catalog (embedded SQLite by default, or the one
  ``ZALANDO_ICEBERG_CATALOG_URI`` names) over the lake's own bucket, and its error handling;
- :mod:`zalando.lakehouse.tables`: table names, schemas, partition specs, schema checks and evolution;
- :mod:`zalando.lakehouse.commit`: appends, partition replaces, ``add_files`` of shard files, scans
  with time travel, and maintenance (expire snapshots, remove orphan files).

Nothing here runs at import time, and nothing here imports prefect.
"""
