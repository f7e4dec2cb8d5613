#!/bin/sh
# The catalogue's database beside Prefect's: its own user (owner of the `catalog` database only).
# Run once by the postgres image on a fresh data volume (/docker-entrypoint-initdb.d); on an existing
# volume create them by hand, or `docker compose down -v` to start afresh.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v catalog_password="$CATALOG_DB_PASSWORD" <<'SQL'
CREATE ROLE catalog LOGIN PASSWORD :'catalog_password';
CREATE DATABASE catalog OWNER catalog;
REVOKE ALL ON DATABASE catalog FROM PUBLIC;
SQL
