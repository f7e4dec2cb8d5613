"""The data lake's object store: the one owner of storage I/O.

A lake is a root (``s3://bucket/prefix`` or ``file:///abs/path``) holding '/'-separated keys. Its
tables are Iceberg tables (:meth:`Lake.catalog`, :mod:`zalando.lake.commit`); the rest are plain
objects (:mod:`zalando.lake.keys`). A group of objects that must appear together (a model bundle, a
report) is a *partition*: a key prefix holding the files and a ``_MANIFEST.json``; writers put the
files first and the manifest last, and readers only see partitions whose manifest exists and only
the files the manifest lists. Re-committing a partition replaces it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from zalando.errors import LakeError, NotCommittedError, http_status_is_transient

if TYPE_CHECKING:
    from zalando.lake.catalog import LakeCatalog

log = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"
_SINGLE_PUT_BYTES = 10 * 1024 * 1024  # pyarrow's S3 part size: bigger objects go up in parts
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._=:+@,-]+$")
# A read that overlaps a rewrite of the same object can come back torn on some S3 servers
# (SeaweedFS: 2 of 1,923 reads while one key was rewritten for 10 s); S3 and MinIO serve the old
# or the new object whole. JSON that does not parse is read again after these pauses.
TORN_READ_PAUSES_S = (0.05, 0.2, 0.5)
# pauses before listing a folder again when the listing raced its creation (a local lake)
LISTING_RACE_PAUSES_S = (0.01, 0.05, 0.2)


def validate_key(key: str) -> str:
    """Refuse keys that could escape the lake root or confuse listings ('..', absolute, odd chars)."""
    if not isinstance(key, str) or not key:
        raise LakeError(f"lake key {key!r}: must be a non-empty string")
    if key.startswith("/") or "\\" in key:
        raise LakeError(f"lake key {key!r}: must be relative ('/'-separated, no leading '/')")
    for seg in key.strip("/").split("/"):
        if seg in ("", ".", ".."):
            raise LakeError(f"lake key {key!r}: empty, '.' or '..' segments are not allowed")
        if not _KEY_SEGMENT.match(seg):
            raise LakeError(f"lake key {key!r}: segment {seg!r} has characters outside [A-Za-z0-9._=:+@,-]")
    return key.strip("/")


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus a short random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class S3Config:
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)  # never in a repr, a log line or a traceback
    region: str = "us-east-1"
    connect_timeout: float = 3.0
    request_timeout: float = 20.0
    max_attempts: int = 6


class Lake:
    """Storage for every table, model and report of the system, on S3 or a local folder.

    ``catalog_uri`` names the Iceberg catalog of the lake's tables (opened at first use by
    :meth:`catalog`); a local lake made without one keeps an embedded SQLite catalog in
    ``_catalog/catalog.db`` under its root. It may hold a password: it is never shown.
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        root: str,
        uri: str,
        s3: S3Config | None = None,
        catalog_uri: str | None = None,
    ) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.uri_root = uri.rstrip("/")
        self.s3 = s3
        self._catalog_uri = catalog_uri
        self._catalog: LakeCatalog | None = None
        self._catalog_lock = threading.Lock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def local(cls, path: str | Path, catalog_uri: str | None = None) -> Lake:
        p = Path(path).resolve()
        p.mkdir(parents=True, exist_ok=True)
        return cls(pafs.LocalFileSystem(), str(p), p.as_uri(), catalog_uri=catalog_uri)

    @classmethod
    def from_uri(cls, uri: str, s3: S3Config | None = None, catalog_uri: str | None = None) -> Lake:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            return cls.local(parsed.path, catalog_uri)
        if parsed.scheme != "s3":
            raise LakeError(f"lake URI {uri!r}: scheme must be s3:// or file://")
        if s3 is None:
            raise LakeError(f"lake URI {uri!r}: an S3 endpoint and credentials are needed")
        if parsed.path.strip("/") and any(seg in (".", "..") for seg in parsed.path.split("/")):
            # a lake never escapes its prefix (SeaweedFS resolves '..' in object paths)
            raise LakeError(f"lake URI {uri!r}: '.' and '..' segments are not allowed")
        ep = urlparse(s3.endpoint if "://" in s3.endpoint else f"http://{s3.endpoint}")
        fs = pafs.S3FileSystem(
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            region=s3.region,
            scheme=ep.scheme or "http",
            endpoint_override=ep.netloc,
            connect_timeout=s3.connect_timeout,
            request_timeout=s3.request_timeout,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s3.max_attempts),
            allow_bucket_creation=False,
            # objects below the part size (10 MB) go up in one PutObject: one request instead of
            # three, and a failed write leaves no half-finished multipart upload behind
            allow_delayed_open=True,
        )
        root = (parsed.netloc + parsed.path).rstrip("/")
        return cls(fs, root, uri, s3, catalog_uri)

    @classmethod
    def from_settings(cls, settings: Any) -> Lake:
        """Build the lake of a :class:`zalando.settings.Settings` (the S3 server must already run),
        with the catalog the settings name (by default SQLite in the work folder)."""
        from zalando.lake.catalog import catalog_uri_of

        if not settings.uses_s3:
            return cls.from_uri(settings.lake_uri, catalog_uri=catalog_uri_of(settings))
        s3 = S3Config(
            endpoint=settings.effective_s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            region=settings.s3_region,
        )
        return cls.from_uri(settings.lake_uri, s3, catalog_uri_of(settings))

    def catalog(self, *, check_layout: bool = True) -> LakeCatalog:
        """The Iceberg catalog of this lake's tables, opened once (at first use) and then shared.

        The first open refuses, in one line, a lake that still holds tables in the layout before
        Iceberg (:func:`zalando.lake.migrate.check_layout`); ``zalando lake migrate`` moves them
        and opens it with ``check_layout=False``.
        """
        with self._catalog_lock:
            if self._catalog is None:
                from zalando.lake.catalog import open_catalog_at

                uri = self._catalog_uri or self._local_catalog_uri()
                self._catalog = open_catalog_at(uri, self, check_layout=check_layout)
            return self._catalog

    @property
    def has_catalog(self) -> bool:
        """Whether :meth:`catalog` can open one: configured, already open, or a local lake's own."""
        return self._catalog is not None or bool(self._catalog_uri) or self.s3 is None

    def _local_catalog_uri(self) -> str:
        if self.s3 is not None:
            raise LakeError(
                f"lake {self.uri_root}: no Iceberg catalog configured (build the lake with "
                "Lake.from_settings, or set ZALANDO_ICEBERG_CATALOG_URI)"
            )
        from zalando.lake.keys import CATALOG_FILE

        return f"sqlite:///{self.root}/{CATALOG_FILE}"

    def __getstate__(self) -> dict[str, Any]:  # the open catalog and its lock stay in this process
        state = dict(self.__dict__)
        state["_catalog"], state["_catalog_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._catalog_lock = threading.Lock()

    @property
    def bucket(self) -> str | None:
        return self.root.split("/", 1)[0] if self.s3 else None

    def __repr__(self) -> str:  # never shows credentials
        return f"Lake({self.uri_root})"

    # ------------------------------------------------------------------ bucket
    def _boto_client(self) -> Any:
        import boto3
        from botocore.config import Config

        assert self.s3 is not None
        return boto3.client(
            "s3",
            endpoint_url=self.s3.endpoint,
            aws_access_key_id=self.s3.access_key,
            aws_secret_access_key=self.s3.secret_key,
            region_name=self.s3.region,
            config=Config(
                connect_timeout=self.s3.connect_timeout,
                read_timeout=self.s3.request_timeout,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def ensure_ready(self) -> None:
        """Check the storage answers with these credentials; create a missing bucket.

        Raises LakeError with one line naming the endpoint and the problem; ``transient`` when the
        server did not answer or answered 5xx/throttled, never for refused credentials.
        """
        if self.s3 is None:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            return
        from botocore.exceptions import ClientError, EndpointConnectionError

        client = self._boto_client()
        where = f"S3 endpoint {self.s3.endpoint} bucket {self.bucket!r}"
        try:
            client.head_bucket(Bucket=self.bucket)
            return
        except EndpointConnectionError as e:
            raise LakeError(
                f"{where}: server not reachable ({e.__class__.__name__}); is it running?", transient=True
            ) from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchBucket", "NotFound"):
                try:
                    client.create_bucket(Bucket=self.bucket)
                    log.info("created bucket %s at %s", self.bucket, self.s3.endpoint)
                    return
                except ClientError as e2:
                    raise LakeError(
                        f"{where}: cannot create bucket: {_client_error_text(e2)}",
                        transient=storage_fault_is_transient(e2),
                    ) from None
            if (
                code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")
                or status == 403
            ):
                raise LakeError(
                    f"{where}: access denied: wrong S3 credentials "
                    "(check ZALANDO_S3_ACCESS_KEY / ZALANDO_S3_SECRET_KEY)",
                    transient=False,
                ) from None
            raise LakeError(
                f"{where}: {_client_error_text(e)}", transient=storage_fault_is_transient(e)
            ) from None
        except Exception as e:  # connection refused and friends surface as various botocore errors
            raise LakeError(
                f"{where}: server not reachable ({e.__class__.__name__})",
                transient=storage_fault_is_transient(e),
            ) from None

    # ------------------------------------------------------------------ plain objects
    def _path(self, key: str) -> str:
        return f"{self.root}/{validate_key(key)}"

    def uri(self, key: str = "") -> str:
        return f"{self.uri_root}/{validate_key(key)}" if key else self.uri_root

    def _io(self, what: str, key: str, fn: Any) -> Any:
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise LakeError(
                f"lake {what} {self.uri(key)}: {_first_line(e)}", transient=storage_fault_is_transient(e)
            ) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)

        def _write() -> None:
            if self.s3 is None:
                self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with self.fs.open_output_stream(tmp) as out:
                    out.write(data)
                self.fs.move(tmp, path)  # atomic rename on a local disk
            else:
                with self.fs.open_output_stream(path) as out:
                    out.write(data)

        try:
            self._io("write", key, _write)
        except LakeError:
            if self.s3 is not None and len(data) > _SINGLE_PUT_BYTES:
                self._abort_uploads(path)
            raise

    def _abort_uploads(self, path: str) -> None:
        """Best effort: abort the multipart uploads a failed write of path left (they hold storage)."""
        bucket, _, key = path.partition("/")
        try:
            client = self._boto_client()
            for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", []):
                if upload["Key"] == key:
                    client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                    log.info("aborted the unfinished upload of %s/%s", bucket, key)
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the write's own error
            log.warning("could not abort unfinished uploads of %s/%s: %s", bucket, key, _first_line(e))

    def stale_uploads(self, older_than: timedelta, *, abort: bool) -> list[str]:
        """Keys (relative to the lake's root) of the unfinished multipart uploads under the lake that
        were started more than ``older_than`` ago, aborted when ``abort``. A writer killed mid-upload
        leaves its parts behind, holding storage no listing shows; younger uploads may be in flight.
        A local lake has none."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self.s3 is None:
            return []
        bucket, _, prefix = self.root.partition("/")
        prefix = f"{prefix}/" if prefix else ""
        cutoff = datetime.now(UTC) - older_than
        client = self._boto_client()
        found: list[str] = []
        marker: dict[str, str] = {}
        try:
            while True:
                page = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix, **marker)
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] >= cutoff or not upload["Key"].startswith(prefix):
                        continue
                    found.append(upload["Key"][len(prefix) :])
                    if abort:
                        client.abort_multipart_upload(
                            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                if not page.get("IsTruncated"):
                    return sorted(found)
                marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
        except (BotoCoreError, ClientError) as e:
            raise LakeError(
                f"lake unfinished uploads under {self.uri_root}: {_first_line(e)}",
                transient=storage_fault_is_transient(e),
            ) from None

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)

        def _read() -> bytes:
            with self.fs.open_input_stream(path) as f:
                return f.read()

        try:
            return self._io("read", key, _read)
        except FileNotFoundError:
            raise LakeError(f"lake object {self.uri(key)} does not exist") from None

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, key: str) -> Any:
        """The object at ``key`` parsed as JSON; read again after a pause while it does not parse
        (a torn read, :data:`TORN_READ_PAUSES_S`); ValueError when it still does not."""
        for pause in TORN_READ_PAUSES_S:
            try:
                return json.loads(self.read_bytes(key))
            except ValueError:
                time.sleep(pause)
        return json.loads(self.read_bytes(key))

    def exists(self, key: str) -> bool:
        info = self._io("stat", key, lambda: self.fs.get_file_info(self._path(key)))
        return info.type == pafs.FileType.File

    def list_keys(self, prefix: str = "") -> list[str]:
        """Every object key below prefix (recursive), sorted; 'directory' markers are left out."""
        base = self._path(prefix) if prefix else self.root
        sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        for pause in (*LISTING_RACE_PAUSES_S, None):
            try:
                infos = self._io("list", prefix or ".", lambda: self.fs.get_file_info(sel))
                break
            except FileNotFoundError:
                # a local listing races a directory being created (or removed) under it: arrow's
                # allow_not_found looks again after the failed read, finds the folder, and raises
                if pause is None:
                    raise
                time.sleep(pause)
        n = len(self.root) + 1
        return sorted(i.path[n:] for i in infos if i.type == pafs.FileType.File and i.size is not None)

    def delete(self, key: str) -> None:
        try:
            self._io("delete", key, lambda: self.fs.delete_file(self._path(key)))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        for k in self.list_keys(prefix):
            self.delete(k)
        if self.s3 is None:
            try:
                self.fs.delete_dir(self._path(prefix))
            except (FileNotFoundError, OSError):
                pass

    # ------------------------------------------------------------------ partitions
    def commit_files(
        self,
        key: str,
        files: dict[str, bytes],
        run_id: str,
        extra: dict[str, Any] | None = None,
        *,
        row_counts: dict[str, int] | None = None,
        schemas: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Write files under key, then the manifest. Stale files of an earlier commit are removed."""
        key = validate_key(key)
        for name in files:
            validate_key(name)
            if name == MANIFEST:
                raise LakeError(f"lake partition {self.uri(key)}: a file may not be named {MANIFEST}")
        manifest_key = f"{key}/{MANIFEST}"
        before = set(self.list_keys(key))
        # un-commit first: a crash between here and the end leaves the partition invisible, not mixed
        self.delete(manifest_key)
        entries = {}
        for name, data in files.items():
            self.write_bytes(f"{key}/{name}", data)
            entries[name] = {"bytes": len(data), "sha256": _sha256(data)}
            if row_counts and name in row_counts:
                entries[name]["rows"] = int(row_counts[name])
            if schemas and name in schemas:
                entries[name]["schema"] = schemas[name]
        manifest = {
            "partition": key,
            "run_id": run_id,
            "created_at": datetime.now(UTC).isoformat(),
            "files": entries,
            "rows": int(sum(e.get("rows", 0) for e in entries.values())),
            "extra": extra or {},
        }
        for stale in before - {f"{key}/{n}" for n in files} - {manifest_key}:
            if "/" not in stale[len(key) + 1 :]:  # only this partition's own files, not sub-partitions
                self.delete(stale)
        self.write_json(manifest_key, manifest)
        return manifest

    def commit_partition(
        self, key: str, tables: dict[str, pa.Table], run_id: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write each table as ``key/<name>.parquet``, then ``key/_MANIFEST.json``."""
        files, rows, schemas = {}, {}, {}
        for name, table in tables.items():
            fname = name if name.endswith(".parquet") else f"{name}.parquet"
            files[fname] = table_to_parquet_bytes(table)
            rows[fname] = table.num_rows
            schemas[fname] = str(table.schema)
        return self.commit_files(key, files, run_id, extra, row_counts=rows, schemas=schemas)

    def is_committed(self, key: str) -> bool:
        return self.exists(f"{validate_key(key)}/{MANIFEST}")

    def read_manifest(self, key: str) -> dict[str, Any]:
        key = validate_key(key)
        try:
            return self.read_json(f"{key}/{MANIFEST}")
        except LakeError:
            if not self.exists(f"{key}/{MANIFEST}"):
                raise NotCommittedError(
                    f"lake partition {self.uri(key)} is not committed (no {MANIFEST})"
                ) from None
            raise

    def read_file(self, key: str, name: str, *, verify: bool = True) -> bytes:
        """One file of a committed partition, checked against the manifest's sha256."""
        manifest = self.read_manifest(key)
        if name not in manifest["files"]:
            raise LakeError(f"lake partition {self.uri(key)} has no file {name!r}")
        data = self.read_bytes(f"{key}/{name}")
        if verify and _sha256(data) != manifest["files"][name]["sha256"]:
            raise LakeError(f"lake file {self.uri(key)}/{name}: sha256 does not match its manifest")
        return data

    def read_partition(self, key: str, columns: list[str] | None = None) -> pa.Table:
        """All Parquet files of a committed partition, concatenated."""
        manifest = self.read_manifest(key)
        names = sorted(n for n in manifest["files"] if n.endswith(".parquet"))
        tables = [pq.read_table(io.BytesIO(self.read_file(key, n)), columns=columns) for n in names]
        if not tables:
            raise LakeError(f"lake partition {self.uri(key)} holds no Parquet file")
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def list_partitions(self, prefix: str = "") -> list[str]:
        """Keys of committed partitions below prefix (the prefix itself included), sorted."""
        suffix = "/" + MANIFEST
        return sorted(k[: -len(suffix)] for k in self.list_keys(prefix) if k.endswith(suffix))

    def read_dataset(self, prefix: str, columns: list[str] | None = None) -> pa.Table:
        """Every committed partition under prefix; hive segments (``name=value``) become columns."""
        prefix = validate_key(prefix)
        parts = self.list_partitions(prefix)
        if not parts:
            raise NotCommittedError(f"lake prefix {self.uri(prefix)} holds no committed partition")
        tables = []
        for part in parts:
            t = self.read_partition(part, columns=columns)
            for seg in part[len(prefix) :].strip("/").split("/"):
                if "=" in seg:
                    col, val = seg.split("=", 1)
                    if col not in t.column_names:
                        t = t.append_column(col, pa.array([val] * t.num_rows, pa.string()))
            tables.append(t)
        return pa.concat_tables(tables, promote_options="permissive")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


def _client_error_text(e: Any) -> str:
    err = getattr(e, "response", {}).get("Error", {})
    return f"{err.get('Code', '?')}: {err.get('Message', '')}".strip()


# ------------------------------------------------------------------ is a storage fault transient?
# Error codes (AWS's, and the aws-sdk-cpp names pyarrow prints) for "try again later", compared
# without case and underscores: SLOW_DOWN and SlowDown are the same code. Any other NAMED code
# (AccessDenied, NoSuchBucket, SignatureDoesNotMatch, InvalidAccessKeyId, ...) is permanent.
_TRANSIENT_CODES = frozenset(
    {
        "NETWORKCONNECTION",  # pyarrow/curl: refused, reset, empty reply, time-out, DNS
        "REQUESTTIMEOUT",
        "REQUESTTIMEOUTEXCEPTION",
        "INTERNALFAILURE",
        "INTERNALERROR",
        "SERVICEUNAVAILABLE",
        "BADGATEWAY",
        "GATEWAYTIMEOUT",
        "SLOWDOWN",
        "THROTTLING",
        "THROTTLINGEXCEPTION",
        "REQUESTLIMITEXCEEDED",
        "TOOMANYREQUESTS",
    }
)
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# how pyarrow's S3 filesystem words a failed request (an OSError, the only thing it gives us):
#   "When uploading object ...: AWS Error SERVICE_UNAVAILABLE during PutObject operation: ..."
#   "When reading information for key ...: AWS Error UNKNOWN (HTTP status 503) during HeadObject ..."
_AWS_CODE = re.compile(r"AWS Error (?P<code>[A-Za-z][A-Za-z0-9_]*)")
_HTTP_STATUS = re.compile(r"HTTP status (?P<status>\d{3})")


def _code_and_status(e: BaseException) -> tuple[str, int | None]:
    """The storage's error code (normalised, '' when none) and HTTP status (None when unknown)."""
    response = getattr(e, "response", None)  # botocore's ClientError: structured
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code.isdigit():  # HEAD answers have no body: boto3 puts the status in the code
            code, status = "", status or int(code)
        return code.replace("_", "").upper(), int(status) if status else None
    text = str(e)
    code_match, status_match = _AWS_CODE.search(text), _HTTP_STATUS.search(text)
    code = code_match.group("code").replace("_", "").upper() if code_match else ""
    return ("" if code == "UNKNOWN" else code), int(status_match.group("status")) if status_match else None


def storage_fault_is_transient(e: BaseException) -> bool:
    """True when a failed storage call may succeed if tried again: THE classification of raw faults.

    The lake calls it where a pyarrow or botocore error arrives, and stamps the answer on the
    LakeError it raises (``transient``). Transient: 5xx, 408/429, throttling (SlowDown), time-outs,
    refused or reset connections. Permanent: 4xx such as 403 (AccessDenied, InvalidAccessKeyId,
    SignatureDoesNotMatch) and 404 (NoSuchBucket), a missing local file, any other named error code.
    An OSError that names neither a code nor a status is taken as transient, as before: retrying a
    lasting fault costs three back-offs, not retrying a passing one fails the whole run.
    """
    from botocore.exceptions import BotoCoreError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(e, BotoConnectionError | HTTPClientError):
        return True  # botocore: endpoint unreachable, connect/read time-out, connection closed
    if isinstance(e, ConnectionError | TimeoutError):
        return True
    if isinstance(e, _PERMANENT_OS_ERRORS) or isinstance(e, BotoCoreError):
        return False  # a missing file or a refused path; botocore: no credentials, bad parameters
    code, status = _code_and_status(e)
    if code in _TRANSIENT_CODES:
        return True
    if status is not None:
        return http_status_is_transient(status)
    if code:
        return False
    return isinstance(e, OSError)


def retry_io(fn: Any, *, attempts: int = 4, base_delay: float = 0.5, what: str = "lake I/O") -> Any:
    """Call fn, retrying transient storage faults with exponential back-off (whole-operation retries).

    A LakeError retries when its ``transient`` flag says so; a raw OSError (pyarrow's, outside the
    lake's own calls) when :func:`storage_fault_is_transient` does. Anything else fails at once.
    """
    for i in range(attempts):
        try:
            return fn()
        except (LakeError, OSError) as e:
            transient = e.transient if isinstance(e, LakeError) else storage_fault_is_transient(e)
            if not transient or i == attempts - 1:
                raise
            delay = base_delay * 2**i
            log.warning("%s failed (%s); retrying in %.1fs", what, _first_line(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def iter_batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
