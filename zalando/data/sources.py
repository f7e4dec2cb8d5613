"""Where the four Fashion-MNIST IDX files come from, and the checks that they are the right bytes.

A source is an http(s) URL prefix (downloaded once into the work folder's cache), a local folder
(or file:// URI), or an s3:// prefix. Every file is checked against a checksum before parsing:
the official md5s by default, or the SHA256SUMS file the source ships beside the files
(the mini data set has one, since its bytes differ from the official ones).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from zalando.errors import DataError, SourceError, http_status_is_transient

log = logging.getLogger(__name__)

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The official md5s (zalandoresearch/fashion-mnist README; ../shared/data/fashion-mnist/README.md).
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
SUMS_FILE = "SHA256SUMS"


@dataclass(frozen=True)
class SourceFiles:
    """The four files' bytes plus how they were verified."""

    source: str
    files: dict[str, bytes]  # file name -> bytes
    checksums: dict[str, dict[str, str]]  # file name -> {"algorithm", "expected", "actual"}

    @property
    def digest(self) -> str:
        """A short fingerprint of the exact input bytes (sha256 of the four sha256s)."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode())
            h.update(hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()[:16]


def parse_sums(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def verify(name: str, data: bytes, sums: dict[str, str] | None) -> dict[str, str]:
    """Check one file's bytes; a mismatch is a DataError naming the file and both checksums."""
    if sums is not None and name in sums:
        algo, expected = "sha256", sums[name]
        actual = hashlib.sha256(data).hexdigest()
    elif name in OFFICIAL_MD5:
        algo, expected = "md5", OFFICIAL_MD5[name]
        actual = hashlib.md5(data).hexdigest()
    else:
        raise DataError(f"{name}: no checksum known for this file")
    if actual != expected:
        raise DataError(f"{name}: {algo} checksum mismatch: expected {expected}, got {actual}")
    return {"algorithm": algo, "expected": expected, "actual": actual}


# --------------------------------------------------------------------------- readers
def _read_folder(folder: Path) -> Callable[[str], bytes | None]:
    if not folder.is_dir():
        raise SourceError(f"data source {folder}: folder does not exist")

    def read(name: str) -> bytes | None:
        p = folder / name
        return p.read_bytes() if p.is_file() else None

    return read


def _read_url(prefix: str, cache: Path, timeout: float) -> Callable[[str], bytes | None]:
    cache.mkdir(parents=True, exist_ok=True)
    base = prefix if prefix.endswith("/") else prefix + "/"

    def read(name: str) -> bytes | None:
        cached = cache / name
        if cached.is_file():
            return cached.read_bytes()
        url = base + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                data = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 404 and name == SUMS_FILE:
                return None
            # the server answered: 5xx, 408 and 429 may pass; 404, 403 and other 4xx will not
            raise SourceError(
                f"data source {url}: HTTP {e.code} {e.reason}",
                transient=http_status_is_transient(e.code),
            ) from None
        except (TimeoutError, urllib.error.URLError, OSError) as e:
            if name == SUMS_FILE:
                return None
            reason = getattr(e, "reason", e)
            raise SourceError(
                f"data source {url}: unreachable ({reason}); offline? put the four .gz files in a folder "
                f"and set ZALANDO_DATA_SOURCE=/that/folder (or copy them into {cache})",
                transient=True,  # no answer at all (time-out, refused, reset, DNS): the network may come back
            ) from None
        if name != SUMS_FILE:
            tmp = cached.with_suffix(".part")
            tmp.write_bytes(data)
            os.replace(tmp, cached)
        return data

    return read


def _read_s3(uri: str, s3: Any) -> Callable[[str], bytes | None]:
    from zalando.lake import Lake

    parsed = urlparse(uri)
    lake = Lake.from_uri(f"s3://{parsed.netloc}{parsed.path}".rstrip("/"), s3)

    def read(name: str) -> bytes | None:
        if not lake.exists(name):
            return None
        return lake.read_bytes(name)

    return read


def fetch_source(source: str, *, cache_dir: Path, s3: Any = None, timeout: float = 15.0) -> SourceFiles:
    """Read and verify the four files of a source. Raises SourceError / DataError with one line."""
    if source.startswith(("http://", "https://")):
        reader = _read_url(
            source, cache_dir / "downloads" / hashlib.sha1(source.encode()).hexdigest()[:10], timeout
        )
    elif source.startswith("s3://"):
        if s3 is None:
            raise SourceError(f"data source {source}: S3 settings are needed to read an s3:// source")
        reader = _read_s3(source, s3)
    elif source.startswith("file://"):
        reader = _read_folder(Path(urlparse(source).path))
    elif "://" in source:
        raise SourceError(
            f"data source {source}: unsupported scheme (use https://, s3://, file:// or a folder)"
        )
    else:
        reader = _read_folder(Path(source).expanduser())

    sums_bytes = reader(SUMS_FILE)
    sums = parse_sums(sums_bytes.decode(errors="replace")) if sums_bytes else None
    files, checks = {}, {}
    for name in FILES.values():
        data = reader(name)
        if data is None:
            raise SourceError(f"data source {source}: file {name} is missing")
        checks[name] = verify(name, data, sums)
        files[name] = data
    log.info(
        "source %s: 4 files verified (%s)",
        source,
        ", ".join(sorted({c["algorithm"] for c in checks.values()})),
    )
    return SourceFiles(source=source, files=files, checksums=checks)
