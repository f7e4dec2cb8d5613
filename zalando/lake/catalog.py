"""The Iceberg catalog over the lake: built from :class:`zalando.settings.Settings`.

By default an embedded pyiceberg ``SqlCatalog`` on SQLite in the work folder
(``<work_dir>/iceberg/catalog.db``): nothing else to start. ``ZALANDO_ICEBERG_CATALOG_URI`` selects
another one: ``sqlite:///…`` or ``postgresql+psycopg://…`` (a SQL catalog) or ``http(s)://…`` (a REST
catalog). The warehouse is always the lake's own root (``s3://bucket/prefix`` or ``file:///abs``),
read and written with the lake's S3 endpoint, keys and region.

Every catalog error surfaces as one line in a :class:`~zalando.errors.LakeError`; transient ones (a
locked SQLite database, a refused connection, a 5xx of a REST server) are retried first.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from zalando.errors import LakeError
from zalando.lake import Lake, storage_fault_is_transient
from zalando.lake.iceberg_speed import install as _keep_transaction_metadata

_keep_transaction_metadata()

log = logging.getLogger(__name__)

CATALOG_NAME = "zalando"
DEFAULT_NAMESPACE = "zalando"
PYARROW_FILE_IO = "pyiceberg.io.pyarrow.PyArrowFileIO"

T = TypeVar("T")

_TRANSIENT_TEXT = (
    "database is locked",
    "database table is locked",
    "connection refused",
    "could not connect",
    "connection reset",
    "server closed the connection",
    "timed out",
    "timeout",
    "too many connections",
    "temporarily unavailable",
    "service unavailable",
    "slow down",
    "slowdown",
)
_HTTP_5XX = re.compile(r"\b(500|502|503|504)\b")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient catalog error or a commit conflict.

    A lost commit race is cheap to redo and only means others committed meanwhile, so conflicts get
    their own, larger budget (many writers of one table: the decision log, a batch's re-runs); a
    catalog that does not answer fails after ``attempts``.
    """

    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0
    conflict_attempts: int = 12

    def delay(self, attempt: int) -> float:
        """Exponential back-off with jitter for the (0-based) attempt that just failed."""
        d = min(self.base_delay * 2**attempt, self.max_delay)
        return d + random.uniform(0, d / 2)


@dataclass
class LakeCatalog:
    """A pyiceberg catalog plus the lake it keeps its tables in (one namespace)."""

    catalog: Any = field(repr=False)  # a pyiceberg Catalog; its properties hold the S3 secret
    lake: Lake
    namespace: str = DEFAULT_NAMESPACE
    describe: str = "iceberg catalog"  # for messages: the catalog URI without any password
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    kind: str = "sql"  # 'sql' (SQLite, PostgreSQL) or 'rest'

    def identifier(self, table_name: str) -> str:
        return f"{self.namespace}.{table_name}"

    def key_of(self, uri: str) -> str | None:
        """The lake key of a storage URI under the lake root ('' for the root), else None."""
        path = storage_path(uri)
        root = self.lake.root.rstrip("/")
        if path == root:
            return ""
        return path[len(root) + 1 :] if path.startswith(root + "/") else None

    def uri_of(self, key_or_uri: str) -> str:
        """A full storage URI for a lake key (URIs are passed through)."""
        return key_or_uri if "://" in key_or_uri else self.lake.uri(key_or_uri)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one catalog call, retrying transient errors; every error becomes a LakeError."""
        return with_retries(fn, what=what, describe=self.describe, policy=self.retry)

    def commit(self, what: str, fn: Callable[[], T]) -> T:
        """Run one commit, retrying transient errors and conflicts; fn must load the table afresh."""
        return with_retries(fn, what=what, describe=self.describe, policy=self.retry, conflicts=True)


# ---------------------------------------------------------------------------------------------- building


def catalog_uri_of(settings: Any) -> str:
    """The catalog a Settings names: ``ZALANDO_ICEBERG_CATALOG_URI``, else
    ``sqlite:///<work_dir>/iceberg/catalog.db`` (its folder is made when the catalog opens)."""
    secret = getattr(settings, "iceberg_catalog_uri", None)
    if secret is not None and secret.get_secret_value():
        return str(secret.get_secret_value())
    return f"sqlite:///{Path(settings.work_dir).resolve() / 'iceberg' / 'catalog.db'}"


def catalog_kind(uri: str) -> str:
    """'sql' or 'rest' for a catalog URI; a LakeError for anything else."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "sqlite" or scheme.startswith("sqlite+") or scheme.startswith("postgresql"):
        return "sql"
    if scheme in ("http", "https"):
        return "rest"
    raise LakeError(
        f"ZALANDO_ICEBERG_CATALOG_URI {redact_uri(uri)!r}: expected sqlite:///…, "
        "postgresql+psycopg://… or http(s)://… (REST)"
    )


def io_properties(lake: Lake) -> dict[str, str]:
    """pyiceberg FileIO properties that reach the lake's storage as the Lake itself does."""
    props = {"py-io-impl": PYARROW_FILE_IO}
    if lake.s3 is not None:
        s3 = lake.s3
        endpoint = s3.endpoint if "://" in s3.endpoint else f"http://{s3.endpoint}"
        props.update(
            {
                "s3.endpoint": endpoint,
                "s3.access-key-id": s3.access_key,
                "s3.secret-access-key": s3.secret_key,
                "s3.region": s3.region,
                "s3.connect-timeout": str(s3.connect_timeout),
                "s3.request-timeout": str(s3.request_timeout),
                "s3.retry-strategy-impl": "pyarrow.fs.AwsStandardS3RetryStrategy",
            }
        )
    return props


_FIRST_OPEN_ATTEMPTS = 5


def open_catalog(
    settings: Any,
    *,
    lake: Lake | None = None,
    retry: RetryPolicy | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    check_layout: bool = True,
) -> LakeCatalog:
    """The catalog a Settings describes, with its namespace created if missing.

    ``lake`` defaults to ``Lake.from_settings(settings)`` (the S3 server must already run).
    """
    lake = lake or Lake.from_settings(settings)
    return open_catalog_at(
        catalog_uri_of(settings), lake, retry=retry, namespace=namespace, check_layout=check_layout
    )


def open_catalog_at(
    uri: str,
    lake: Lake,
    *,
    retry: RetryPolicy | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    check_layout: bool = True,
) -> LakeCatalog:
    """The catalog at ``uri`` (sqlite, postgresql or REST) over ``lake``, its namespace created if missing.

    With ``check_layout`` (everything but ``zalando lake migrate``), a lake that still holds tables
    in the layout before Iceberg is refused with one line saying to migrate it.
    """
    kind = catalog_kind(uri)
    if kind == "sql" and uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    props = {"warehouse": lake.uri_root, **io_properties(lake)}
    describe = f"iceberg catalog {redact_uri(uri)}"
    policy = retry or RetryPolicy()

    def _open() -> Any:
        if kind == "rest":
            from pyiceberg.catalog.rest import RestCatalog

            catalog = RestCatalog(CATALOG_NAME, uri=uri, **props)
        else:
            from pyiceberg.catalog.sql import SqlCatalog

            # first opens at once: each creates the catalog's two tables if missing (look, then
            # create), so one can lose the race for either table, and then for the other
            for attempt in range(_FIRST_OPEN_ATTEMPTS):
                try:
                    catalog = SqlCatalog(CATALOG_NAME, uri=uri, **props)
                    break
                except Exception as e:  # noqa: BLE001 - another open made that table first
                    if "already exists" not in str(e).lower() or attempt == _FIRST_OPEN_ATTEMPTS - 1:
                        raise
                    time.sleep(0.01 * (attempt + 1))
        try:
            catalog.create_namespace_if_not_exists(namespace)
        except Exception:  # noqa: BLE001 - e.g. a UNIQUE violation: another process created it first
            if namespace not in {n[0] for n in catalog.list_namespaces() if n}:
                raise
        return catalog

    catalog = with_retries(_open, what="open", describe=describe, policy=policy)
    log.debug("%s open, warehouse %s, namespace %s", describe, lake.uri_root, namespace)
    cat = LakeCatalog(
        catalog=catalog, lake=lake, namespace=namespace, describe=describe, retry=policy, kind=kind
    )
    if check_layout:
        from zalando.lake.migrate import check_layout as refuse_legacy

        refuse_legacy(cat)
    return cat


# ---------------------------------------------------------------------------------------------- errors


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by '***' (for messages and logs)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def storage_path(uri: str) -> str:
    """A storage URI as a filesystem path: 's3://b/k' -> 'b/k', 'file:///x' -> '/x'."""
    parts = urlsplit(uri)
    if parts.scheme in ("s3", "s3a", "s3n", "gs", "abfs", "abfss"):
        return f"{parts.netloc}{parts.path}".rstrip("/")
    if parts.scheme == "file":
        return parts.path.rstrip("/") or "/"
    return uri.rstrip("/")


def is_conflict(e: BaseException) -> bool:
    """A commit lost against a concurrent one: retry on the fresh snapshot."""
    from pyiceberg.exceptions import CommitFailedException, ValidationException

    return isinstance(e, CommitFailedException | ValidationException)


def is_transient(e: BaseException) -> bool:
    """Worth retrying as is: a locked or unreachable catalog, a 5xx, a dropped connection."""
    from pyiceberg.exceptions import (
        CommitStateUnknownException,
        ServerError,
        ServiceUnavailableError,
        TooManyRequestsError,
        WaitingForLockException,
    )

    if isinstance(
        e, ServiceUnavailableError | ServerError | TooManyRequestsError | WaitingForLockException
    ) or isinstance(e, CommitStateUnknownException):
        return True
    try:
        import requests

        if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
    except ImportError:  # pragma: no cover - requests comes with pyiceberg
        pass
    try:
        from sqlalchemy.exc import DBAPIError

        if isinstance(e, DBAPIError):
            return e.connection_invalidated or _has_transient_text(str(e.orig or e))
    except ImportError:  # pragma: no cover - sqlalchemy comes with pyiceberg[sql-sqlite]
        pass
    if isinstance(e, ConnectionError | TimeoutError):
        return True
    if isinstance(e, OSError):
        text = str(e)
        if "AWS Error" in text or "HTTP status" in text:  # the storage answered: the lake's rule decides
            return storage_fault_is_transient(e)
        return _has_transient_text(text)
    return False


def _has_transient_text(text: str) -> bool:
    low = text.lower()
    return any(s in low for s in _TRANSIENT_TEXT) or _HTTP_5XX.search(low) is not None


def error_text(e: BaseException) -> str:
    """One line saying what went wrong, without the library's tables and tracebacks."""
    if isinstance(e, ModuleNotFoundError) and (e.name or "").startswith("psycopg"):
        return "the PostgreSQL driver is missing (pip install 'psycopg[binary]')"
    try:
        import requests

        if isinstance(e, requests.exceptions.ConnectionError):
            return "not reachable (connection refused or no route); is the catalog server running?"
    except ImportError:  # pragma: no cover
        pass
    try:
        from sqlalchemy.exc import DBAPIError

        if isinstance(e, DBAPIError) and e.orig is not None:
            return _first_line(e.orig)
    except ImportError:  # pragma: no cover
        pass
    return _first_line(e)


def to_lake_error(e: BaseException, *, what: str, describe: str, attempts: int = 1) -> LakeError:
    """The LakeError for e: '<catalog>: <what>: <problem>[ (transient; gave up after N attempts)]'.

    Its ``transient`` flag says whether a later retry (a task's) may succeed: a locked or
    unreachable catalog, a refused connection, a 5xx; never a bad filter, schema or credential.
    """
    if isinstance(e, LakeError):
        return e
    transient = is_transient(e)
    tail = f" (transient; gave up after {attempts} attempts)" if attempts > 1 else ""
    return LakeError(f"{describe}: {what}: {error_text(e)}{tail}", transient=transient)


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    describe: str,
    policy: RetryPolicy | None = None,
    conflicts: bool = False,
) -> T:
    """Call fn; retry transient errors (and, with conflicts, lost commit races) with back-off;
    raise every error as one LakeError line."""
    policy = policy or RetryPolicy()
    failures = races = 0
    while True:
        try:
            return fn()
        except LakeError:
            raise
        except Exception as e:  # noqa: BLE001 - every catalog error becomes one LakeError line
            conflict = conflicts and is_conflict(e)
            if conflict:
                races += 1
                if races >= policy.conflict_attempts:
                    raise LakeError(
                        f"{describe}: {what}: lost {races} commit races against concurrent writers "
                        f"({error_text(e)})",
                        transient=True,
                    ) from None
            else:
                failures += 1
                if not is_transient(e) or failures >= policy.attempts:
                    raise to_lake_error(e, what=what, describe=describe, attempts=failures) from None
            delay = policy.delay((races if conflict else failures) - 1)
            why = "commit conflict" if conflict else error_text(e)
            log.warning("%s: %s: %s; retrying in %.2fs", describe, what, why, delay)
            time.sleep(delay)


def _first_line(e: BaseException) -> str:
    for line in str(e).strip().splitlines():
        if line.strip():
            return line.strip()
    return e.__class__.__name__
