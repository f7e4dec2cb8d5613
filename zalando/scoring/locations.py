"""Where a batch may be read from: its location, the boundary it must lie in, and how one input is opened.

* ``file://`` locations lie under ``ZALANDO_BATCH_ROOTS`` (default: the work folder and the current
  directory), checked on the location's real path; ``s3://`` ones in the lake's bucket or in
  ``ZALANDO_BATCH_BUCKETS``. No ``.`` or ``..`` segment, in a location or in a manifest's file names.
* A lake key of a local lake must not go through a symbolic link; a file-system location's root is a
  real path, read through :func:`~zalando.scoring.localfs.no_follow_fs`, so no link below it is
  followed either.
* :func:`open_input` opens one input file URI as a shard reference records it, through the same
  no-follow filesystem for ``file://`` inputs.

:mod:`zalando.scoring.batch` lists and describes what lies at a location; this module decides
whether it may be read at all, before anything is listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import pyarrow.fs as pafs

from zalando.errors import DataError, LakeError
from zalando.lake import Lake, validate_key
from zalando.scoring.localfs import no_follow_fs


class ScoringInputError(DataError):
    """A batch location that cannot be scored at all (missing, unreadable, not a batch)."""


@dataclass(frozen=True)
class Location:
    """A place files are read from: a pyarrow filesystem, a root path in it, and its URI.

    ``local``: a folder of this machine, read through :func:`~zalando.scoring.localfs.no_follow_fs`
    (its root is a real path: no link on the way to it, none followed below it).
    """

    fs: pafs.FileSystem
    root: str
    uri: str
    lake_key: str | None = None  # set when the location is a key of the lake
    local: bool = False

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def file_uri(self, name: str) -> str:
        if not name:
            return self.uri
        return f"{self.uri}/{_quote(name) if self.local else name}"


@dataclass(frozen=True)
class BatchBoundary:
    """Where batches may come from: folders (``ZALANDO_BATCH_ROOTS``) and S3 buckets besides the lake's."""

    roots: tuple[Path, ...]
    buckets: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any = None) -> BatchBoundary:
        """From ``settings`` (default: :func:`zalando.settings.load_settings`, the environment)."""
        if settings is None:
            from zalando.settings import load_settings

            settings = load_settings()
        return cls(tuple(settings.batch_root_paths()), tuple(settings.batch_buckets))


def _quote(path: str) -> str:
    """A path as it goes into a file:// URI (the lake key characters stay as they are)."""
    return quote(path, safe="/._=:+@,-")


def _no_dots(location: str, path: str) -> None:
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ScoringInputError(f"batch location {location!r}: '.' and '..' segments are not allowed")


def resolve_location(lake: Lake, location: str, boundary: BatchBoundary | None = None) -> Location:
    """A lake key, an ``s3://bucket/prefix`` URI (same endpoint and credentials as the lake) or ``file://``.

    The boundary is checked here, before anything is listed or read: a ``file://`` location must lie
    under ``boundary.roots`` once its links are resolved, an ``s3://`` one in the lake's bucket or
    ``boundary.buckets`` (default: :meth:`BatchBoundary.from_settings`, the environment).
    """
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return _file_location(location, boundary or BatchBoundary.from_settings())
    if parsed.scheme == "s3":
        return _s3_location(lake, location, boundary or BatchBoundary.from_settings())
    if parsed.scheme:
        raise ScoringInputError(
            f"batch location {location!r}: scheme must be s3://, file:// or none (a lake key)"
        )
    try:
        key = validate_key(location)
    except LakeError as e:
        raise ScoringInputError(f"batch location {location!r}: {e}") from None
    if lake.s3 is not None:
        return Location(lake.fs, f"{lake.root}/{key}", lake.uri(key), key)
    lake_root = os.path.realpath(lake.root)
    real = os.path.realpath(f"{lake_root}/{key}")
    if real != f"{lake_root}/{key}":
        raise ScoringInputError(
            f"batch location {location!r}: {lake.uri(key)} goes through a symbolic link (batches never follow links)"
        )
    return Location(no_follow_fs(), real, lake.uri(key), key, local=True)


def _file_location(location: str, boundary: BatchBoundary) -> Location:
    parsed = urlparse(location)
    if parsed.netloc not in ("", "localhost"):
        raise ScoringInputError(
            f"batch location {location!r}: a file:// location names a folder of this machine (file:///abs/path)"
        )
    path = unquote(parsed.path)
    _no_dots(location, path)
    real = os.path.realpath(path or "/")
    if not any(Path(real).is_relative_to(root) for root in boundary.roots):
        roots = ", ".join(str(r) for r in boundary.roots) or "none"
        raise ScoringInputError(
            f"batch location {location!r}: {real} is outside the batch roots ({roots}); "
            "ZALANDO_BATCH_ROOTS names the folders batches may come from"
        )
    return Location(no_follow_fs(), real, "file://" + _quote(real), local=True)


def _s3_location(lake: Lake, location: str, boundary: BatchBoundary) -> Location:
    if lake.s3 is None:
        raise ScoringInputError(
            f"batch location {location!r}: an s3:// batch needs an S3 lake (the lake is {lake.uri_root})"
        )
    parsed = urlparse(location)
    _no_dots(location, parsed.path)
    bucket = parsed.netloc
    lake_bucket = lake.root.split("/", 1)[0]
    allowed = (lake_bucket, *[b for b in boundary.buckets if b != lake_bucket])
    if bucket not in allowed:
        raise ScoringInputError(
            f"batch location {location!r}: bucket {bucket!r} is not allowed: a batch lies in the lake's "
            f"bucket or in ZALANDO_BATCH_BUCKETS (allowed: {', '.join(allowed)})"
        )
    root = (bucket + parsed.path).rstrip("/")
    lake_root = lake.root.rstrip("/")
    key = root[len(lake_root) + 1 :] if root.startswith(lake_root + "/") else None
    return Location(lake.fs, root, f"s3://{root}", key)


def open_input(uri: str, lake: Lake) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of one input file URI (as recorded in a shard reference).

    A ``file://`` input is opened through :func:`~zalando.scoring.localfs.no_follow_fs`: a link
    anywhere on its path, or anything but a regular file, is refused when it is opened.
    """
    if uri.startswith("file://"):
        return no_follow_fs(), unquote(urlparse(uri).path)
    if uri.startswith("s3://"):
        if lake.s3 is None:
            raise ScoringInputError(f"input {uri}: an s3:// input needs an S3 lake")
        return lake.fs, uri[len("s3://") :]
    raise ScoringInputError(f"input {uri!r}: not an s3:// or file:// URI")


__all__ = [
    "BatchBoundary",
    "Location",
    "ScoringInputError",
    "open_input",
    "resolve_location",
]
