"""Fetching the primary images of catalogue products: parallel, bounded, and never a crash.

Every product of the query gives exactly one :class:`FetchedImage`, in input order: its bytes and
sha256, or a ``problem`` reason code that becomes the product's quarantine row. A catalogue defect is
never an exception and never a dropped product.

URL schemes and their boundaries (nothing else is ever read):

* ``s3://bucket/key``: through the lake's S3 filesystem (endpoint and credentials of the settings), in
  the lake's bucket or a bucket of ``ZALANDO_BATCH_BUCKETS``; no ``.``/``..`` segments.
* ``file:///abs/path``: under ``ZALANDO_BATCH_ROOTS`` (:meth:`Settings.batch_root_paths`), compared on
  the path as written, and opened with :func:`zalando.scoring.localfs.open_regular`: no symbolic link
  anywhere on the way is followed, and only a regular file is opened.
* ``http(s)://``: ``http.client``, no automatic anything. A redirect to the same host is followed at
  most ``max_redirects`` times (``http`` -> ``https`` on the same host counts as the same host), one to
  another host (or a downgrade to ``http``) is refused without contacting it. ``ZALANDO_CATALOG_FETCH_HOSTS``
  can limit the hosts. Only ``200`` with an image body counts; a ``Content-Type`` that is neither
  ``image/*`` nor octet-stream is ``not_an_image`` before the body is read.

Sizes: a body over ``max_bytes`` (the image files' limit, :class:`zalando.images.ImagePrepConfig`) is
``too_large``, decided on the announced length when there is one, and reading stops at the cap in any
case. Pixel-count limits (decompression bombs) are checked later, on the header, by ``decode_image``.
Every body is sniffed (:func:`zalando.images.sniff_format`): HTML behind an image URL is ``not_an_image``.

Time: each attempt has ``timeout_s`` to connect, for each read, and for the whole download (a server
trickling bytes is cut off). Only transient faults are retried (5xx, 408, 429, time-outs, refused or
reset connections, S3 faults :func:`zalando.lake.storage_fault_is_transient` calls transient), at most
``retries`` times with exponential back-off; the retry decision keys on :attr:`FetchProblem.transient`.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import re
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from zalando.catalogue.query import ProductRow
from zalando.errors import LakeError, ZalandoError, http_status_is_transient
from zalando.images import EMPTY_FILE, NOT_AN_IMAGE, TOO_LARGE, ImagePrepConfig, sniff_format
from zalando.lake import Lake, storage_fault_is_transient
from zalando.scoring.localfs import NotRegularFile, open_regular

log = logging.getLogger(__name__)

# reason codes of a fetch (the query's own: no_primary_image, several_primary_images, image_row_missing)
FETCH_TIMEOUT = "fetch_timeout"
FETCH_HTTP_ERROR = "fetch_http_error"
REDIRECT_ELSEWHERE = "redirect_elsewhere"
URL_NOT_ALLOWED = "url_not_allowed"
MISSING_OBJECT = "missing_object"
FETCH_PROBLEMS: tuple[str, ...] = (
    FETCH_TIMEOUT,
    FETCH_HTTP_ERROR,
    REDIRECT_ELSEWHERE,
    NOT_AN_IMAGE,
    EMPTY_FILE,
    TOO_LARGE,
    URL_NOT_ALLOWED,
    MISSING_OBJECT,
)

_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
_OCTET_STREAM = ("application/octet-stream", "binary/octet-stream")
_USER_AGENT = "zalando-catalogue-fetch/1"
_MAX_BACKOFF_S = 5.0
_USER_INFO = re.compile(r"//[^/?#@]*@")


class FetchProblem(ZalandoError):
    """Why one image could not be fetched: a reason code, a one-line detail, and whether it may pass."""

    def __init__(self, reason: str, detail: str, *, transient: bool = False, size: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}", transient=transient)
        self.reason = reason
        self.detail = detail
        self.size = size  # bytes announced or read, when known


class FetchConfig(BaseModel):
    """How images are fetched; :meth:`from_settings` builds it from the ``catalog_fetch_*`` settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    concurrency: int = Field(default=8, ge=1, le=256)
    timeout_s: float = Field(default=10.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10)
    backoff_s: float = Field(default=0.2, ge=0, description="first retry's wait; doubled for each next one")
    max_redirects: int = Field(default=3, ge=0, le=20)
    max_bytes: int = Field(default=ImagePrepConfig().max_bytes, gt=0)
    roots: tuple[Path, ...] = ()  # file:// URLs: the allowed folders (resolved)
    buckets: tuple[str, ...] = ()  # s3:// URLs: buckets allowed besides the lake's own
    hosts: tuple[str, ...] = ()  # http(s):// URLs: allowed host names (empty: any)

    @classmethod
    def from_settings(cls, settings: Any, image_config: ImagePrepConfig | None = None) -> FetchConfig:
        """The settings' fetch knobs and boundaries, with the size cap of ``image_config``'s files."""
        return cls(
            concurrency=settings.catalog_fetch_concurrency,
            timeout_s=settings.catalog_fetch_timeout_s,
            retries=settings.catalog_fetch_retries,
            max_redirects=settings.catalog_fetch_max_redirects,
            max_bytes=(image_config or ImagePrepConfig()).max_bytes,
            roots=tuple(settings.batch_root_paths()),
            buckets=tuple(settings.batch_buckets),
            hosts=tuple(h.lower() for h in settings.catalog_fetch_hosts),
        )


@dataclass(frozen=True, slots=True)
class FetchedImage:
    """One product's primary image: ``data`` and its ``sha256`` when fetched, else a ``problem`` code.

    ``size`` and ``sha256`` are kept for a problem whose bytes were read (a non-image), never the
    bytes themselves. ``transient``: the problem may pass on a later run (a time-out, a 5xx).
    """

    product_id: int
    image_id: int | None
    url: str | None
    data: bytes | None = field(repr=False)
    sha256: str | None
    size: int | None
    problem: str | None
    detail: str | None = None
    transient: bool = False
    attempts: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.problem is None


# ------------------------------------------------------------------------------------ the fetcher


class ImageFetcher:
    """Fetches catalogue images within one :class:`FetchConfig` (thread-safe: one per batch is enough)."""

    def __init__(self, config: FetchConfig, lake: Lake | None = None) -> None:
        self.config = config
        self.lake = lake

    @classmethod
    def from_settings(
        cls, settings: Any, lake: Lake | None = None, image_config: ImagePrepConfig | None = None
    ) -> ImageFetcher:
        return cls(FetchConfig.from_settings(settings, image_config), lake)

    # ---------------------------------------------------------------- many
    def fetch_all(self, rows: Sequence[ProductRow]) -> list[FetchedImage]:
        """One FetchedImage per row, in the rows' order, ``concurrency`` at a time."""
        return list(self.iter_fetch(rows))

    def iter_fetch(self, rows: Iterable[ProductRow], *, window: int | None = None) -> Iterator[FetchedImage]:
        """Stream the rows' FetchedImages in order, with at most ``window`` (default 4 x concurrency)
        fetched and not yet consumed: memory stays bounded however long the catalogue is."""
        limit = window or 4 * self.config.concurrency
        t0 = time.perf_counter()
        counts: Counter[str] = Counter()
        with ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="catalogue-fetch") as pool:
            pending: deque[Future[FetchedImage]] = deque()
            for row in rows:
                pending.append(pool.submit(self.fetch_one, row))
                if len(pending) >= limit:
                    item = pending.popleft().result()
                    counts[item.problem or "ok"] += 1
                    yield item
            while pending:
                item = pending.popleft().result()
                counts[item.problem or "ok"] += 1
                yield item
        log.info(
            "fetched %d catalogue images in %.1fs: %s",
            sum(counts.values()),
            time.perf_counter() - t0,
            ", ".join(f"{k} {v}" for k, v in counts.most_common()) or "none",
        )

    # ---------------------------------------------------------------- one
    def fetch_one(self, row: ProductRow) -> FetchedImage:
        """The row's primary image, or its problem (the query's reason, or the fetch's). Never raises
        for anything the catalogue or the image's server can do."""
        base = {"product_id": row.product_id, "image_id": row.image_id, "url": row.image_url}
        if row.image_problem is not None or not row.image_url:
            reason = row.image_problem or "no_primary_image"
            return FetchedImage(**base, data=None, sha256=None, size=None, problem=reason, detail=reason)
        t0 = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            try:
                data = self._get(row.image_url)
                break
            except FetchProblem as p:
                if p.transient and attempts <= self.config.retries:
                    delay = min(self.config.backoff_s * 2 ** (attempts - 1), _MAX_BACKOFF_S)
                    log.debug("%s; retry %d in %.2fs", p.detail, attempts, delay)
                    time.sleep(delay)
                    continue
                return FetchedImage(
                    **base,
                    data=None,
                    sha256=None,
                    size=p.size,
                    problem=p.reason,
                    detail=p.detail[:300],
                    transient=p.transient,
                    attempts=attempts,
                    seconds=time.perf_counter() - t0,
                )
        seconds = time.perf_counter() - t0
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        problem = _content_problem(data, row.image_url)
        if problem is not None:
            return FetchedImage(
                **base,
                data=None,
                sha256=digest,
                size=size,
                problem=problem.reason,
                detail=problem.detail,
                attempts=attempts,
                seconds=seconds,
            )
        return FetchedImage(
            **base, data=data, sha256=digest, size=size, problem=None, attempts=attempts, seconds=seconds
        )

    def _get(self, url: str) -> bytes:
        """The bytes behind one URL (one attempt, redirects included), or a FetchProblem.

        Messages name the URL without its user info (a password in a catalogue URL stays out of logs)."""
        where = redact_url(url)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - a port that is not a number raises ValueError here
        except ValueError:
            raise FetchProblem(URL_NOT_ALLOWED, f"{where!r}: not a valid URL") from None
        scheme = parts.scheme.lower()
        if scheme == "s3":
            return self._get_s3(where, parts)
        if scheme == "file":
            return self._get_file(where, parts)
        if scheme in ("http", "https"):
            return self._get_http(parts)
        raise FetchProblem(URL_NOT_ALLOWED, f"{where!r}: scheme must be s3://, file://, http:// or https://")

    # ---------------------------------------------------------------- s3://
    def _get_s3(self, url: str, parts: SplitResult) -> bytes:
        """``url``: the URL as messages show it (no user info)."""
        lake = self.lake
        if lake is None or lake.s3 is None:
            where = lake.uri_root if lake is not None else "none"
            raise FetchProblem(
                URL_NOT_ALLOWED, f"{url}: an s3:// image needs an S3 lake (the lake is {where})"
            )
        bucket, key = parts.netloc, parts.path.lstrip("/")
        allowed = (lake.bucket, *[b for b in self.config.buckets if b != lake.bucket])
        if bucket not in allowed:
            raise FetchProblem(
                URL_NOT_ALLOWED,
                f"{url}: bucket {bucket!r} is not allowed (the lake's bucket or ZALANDO_BATCH_BUCKETS: "
                f"{', '.join(str(b) for b in allowed)})",
            )
        if not key or parts.query or parts.fragment or any(s in ("", ".", "..") for s in key.split("/")):
            raise FetchProblem(URL_NOT_ALLOWED, f"{url}: an object key without empty, '.' or '..' segments")
        try:
            with lake.fs.open_input_file(f"{bucket}/{key}") as f:
                return self._read_capped(url, f)
        except FileNotFoundError:
            raise FetchProblem(MISSING_OBJECT, f"{url}: no such object") from None
        except (OSError, LakeError) as e:
            transient = e.transient if isinstance(e, LakeError) else storage_fault_is_transient(e)
            raise FetchProblem(FETCH_HTTP_ERROR, f"{url}: {_first_line(e)}", transient=transient) from None
        except pa.ArrowException as e:  # a key pyarrow refuses to handle: the same on every try
            raise FetchProblem(FETCH_HTTP_ERROR, f"{url}: {_first_line(e)}") from None

    # ---------------------------------------------------------------- file://
    def _get_file(self, url: str, parts: SplitResult) -> bytes:
        """``url``: the URL as messages show it (no user info)."""
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise FetchProblem(
                URL_NOT_ALLOWED, f"{url}: a file:// URL names a file of this machine (file:///abs/path)"
            )
        path = unquote(parts.path)
        if not path.startswith("/") or any(s in (".", "..") for s in path.split("/")):
            raise FetchProblem(URL_NOT_ALLOWED, f"{url}: an absolute path without '.' or '..' is needed")
        if not any(Path(path).is_relative_to(root) for root in self.config.roots):
            roots = ", ".join(str(r) for r in self.config.roots) or "none"
            raise FetchProblem(
                URL_NOT_ALLOWED, f"{url}: outside the batch roots ({roots}); ZALANDO_BATCH_ROOTS names them"
            )
        try:
            with open_regular(path) as f:
                return self._read_capped(url, f)
        except NotRegularFile as e:
            raise FetchProblem(URL_NOT_ALLOWED, f"{url}: {e.what}; links are never followed") from None
        except FileNotFoundError:
            raise FetchProblem(MISSING_OBJECT, f"{url}: no such file") from None
        except PermissionError:
            raise FetchProblem(URL_NOT_ALLOWED, f"{url}: permission denied") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise FetchProblem(
                    URL_NOT_ALLOWED, f"{url}: a folder on its path is a symbolic link or not a folder"
                ) from None
            raise FetchProblem(FETCH_HTTP_ERROR, f"{url}: {_first_line(e)}") from None

    # ---------------------------------------------------------------- http(s)://
    def _get_http(self, parts: SplitResult) -> bytes:
        host = (parts.hostname or "").lower()
        if not host or parts.username is not None or parts.password is not None:
            raise FetchProblem(URL_NOT_ALLOWED, f"{_safe(parts)}: a host is needed, and no user info")
        if self.config.hosts and host not in self.config.hosts:
            raise FetchProblem(
                URL_NOT_ALLOWED, f"{_safe(parts)}: host {host!r} is not in ZALANDO_CATALOG_FETCH_HOSTS"
            )
        origin, current = parts, parts
        deadline = time.monotonic() + self.config.timeout_s
        for _ in range(self.config.max_redirects + 1):
            status, location, data = self._request(current, deadline)
            if status not in _REDIRECTS:
                return data
            if not location:
                raise FetchProblem(FETCH_HTTP_ERROR, f"{_safe(current)}: HTTP {status} without a Location")
            try:
                target = urlsplit(urljoin(current.geturl(), location))
                target.port  # noqa: B018 - a port that is not a number raises ValueError here
            except ValueError:
                raise FetchProblem(
                    FETCH_HTTP_ERROR, f"{_safe(current)}: HTTP {status} to an invalid URL"
                ) from None
            if not _same_host(origin, target):
                raise FetchProblem(
                    REDIRECT_ELSEWHERE,
                    f"{_safe(origin)}: redirected to another host ({_safe(target, path=False)}); not followed",
                )
            current = target
        raise FetchProblem(
            FETCH_HTTP_ERROR, f"{_safe(origin)}: more than {self.config.max_redirects} redirects"
        )

    def _request(self, parts: SplitResult, deadline: float) -> tuple[int, str | None, bytes]:
        """One GET: (status, Location of a redirect, body of a 200)."""
        cls = http.client.HTTPSConnection if parts.scheme.lower() == "https" else http.client.HTTPConnection
        timeout = self.config.timeout_s
        conn = cls(parts.hostname or "", parts.port, timeout=timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        where = _safe(parts)
        try:
            conn.request(
                "GET",
                target,
                headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": _USER_AGENT},
            )
            resp = conn.getresponse()
            status = resp.status
            if status in _REDIRECTS:
                return status, resp.getheader("Location"), b""
            if status != 200:
                raise _status_problem(where, status)
            ctype = (resp.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
            length = _content_length(resp)
            if ctype and not (ctype.startswith("image/") or ctype in _OCTET_STREAM):
                raise FetchProblem(NOT_AN_IMAGE, f"{where}: Content-Type {ctype}, not an image", size=length)
            if length is not None:
                self._check_size(where, length)
            return status, None, self._read_body(resp, where, deadline)
        except FetchProblem:
            raise
        except TimeoutError:
            raise FetchProblem(
                FETCH_TIMEOUT, f"{where}: no answer within {timeout:g}s", transient=True
            ) from None
        except ssl.SSLError as e:
            raise FetchProblem(FETCH_HTTP_ERROR, f"{where}: TLS: {_first_line(e)}") from None
        except socket.gaierror:
            raise FetchProblem(FETCH_HTTP_ERROR, f"{where}: unknown host {parts.hostname!r}") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise FetchProblem(
                FETCH_HTTP_ERROR, f"{where}: {e.__class__.__name__} {_first_line(e)}".strip(), transient=True
            ) from None
        except OSError as e:
            raise FetchProblem(FETCH_HTTP_ERROR, f"{where}: {_first_line(e)}", transient=True) from None
        finally:
            conn.close()

    def _read_body(self, resp: http.client.HTTPResponse, where: str, deadline: float) -> bytes:
        """The body, read until the end, the size cap (too_large) or the deadline (fetch_timeout)."""
        cap = self.config.max_bytes
        chunks: list[bytes] = []
        total = 0
        while True:
            if time.monotonic() > deadline:
                raise FetchProblem(
                    FETCH_TIMEOUT,
                    f"{where}: body not complete within {self.config.timeout_s:g}s ({total} bytes read)",
                    transient=True,
                )
            chunk = resp.read1(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > cap:
                raise FetchProblem(
                    TOO_LARGE, f"{where}: body over max_bytes {cap} (stopped reading)", size=total
                )
            chunks.append(chunk)

    def _read_capped(self, where: str, f: pa.NativeFile) -> bytes:
        """A whole file of known size, refused when over the cap; one that changes while read is retried."""
        size = f.size()
        self._check_size(where, size)
        data = f.read(size + 1)  # one byte more: a file that grew since its size was taken shows it
        if len(data) != size:
            raise FetchProblem(
                FETCH_HTTP_ERROR,
                f"{where}: changed while it was read ({size} bytes, then {len(data)})",
                transient=True,
            )
        return data

    def _check_size(self, where: str, size: int) -> None:
        if size > self.config.max_bytes:
            raise FetchProblem(
                TOO_LARGE, f"{where}: {size} bytes > max_bytes {self.config.max_bytes}", size=size
            )


# ------------------------------------------------------------------------------------ helpers


def fetch_images(
    rows: Sequence[ProductRow],
    settings: Any,
    lake: Lake | None = None,
    image_config: ImagePrepConfig | None = None,
) -> list[FetchedImage]:
    """The primary images of ``rows`` (one per row, in order) with the settings' fetch configuration."""
    return ImageFetcher.from_settings(settings, lake, image_config).fetch_all(rows)


def redact_url(url: str) -> str:
    """A URL without its user info: ``http://user:pw@host/x`` -> ``http://host/x``."""
    return _USER_INFO.sub("//", url, count=1)


def _content_problem(data: bytes, url: str) -> FetchProblem | None:
    where = redact_url(url)
    if not data:
        return FetchProblem(EMPTY_FILE, f"{where}: zero bytes", size=0)
    if sniff_format(data) is None:
        return FetchProblem(NOT_AN_IMAGE, f"{where}: no known image signature (first bytes {data[:8]!r})")
    return None


def _status_problem(where: str, status: int) -> FetchProblem:
    if status in (404, 410):
        return FetchProblem(MISSING_OBJECT, f"{where}: HTTP {status}")
    if status == 204:
        return FetchProblem(EMPTY_FILE, f"{where}: HTTP 204 (no content)", size=0)
    return FetchProblem(
        FETCH_HTTP_ERROR, f"{where}: HTTP {status}", transient=http_status_is_transient(status)
    )


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    raw = resp.getheader("Content-Length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _effective_port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme.lower() == "https" else 80)


def _same_host(origin: SplitResult, target: SplitResult) -> bool:
    """Same host name, and the same scheme and port, or an upgrade of http to https on that host."""
    if (target.hostname or "").lower() != (origin.hostname or "").lower():
        return False
    if target.username is not None or target.password is not None:
        return False
    o, t = origin.scheme.lower(), target.scheme.lower()
    if o == t:
        return _effective_port(origin) == _effective_port(target)
    return o == "http" and t == "https"


def _safe(parts: SplitResult, *, path: bool = True) -> str:
    """A URL for messages: scheme, host, port and (optionally) path; never user info or the query."""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path if path else ''}"


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), e.__class__.__name__)
