"""Reading a local batch folder without ever following a symbolic link, or opening anything but a file.

pyarrow's ``LocalFileSystem`` follows links (a link to ``/etc`` lists all of ``/etc``) and opens
FIFOs (a read blocks forever). Here every path is reached from ``/`` one component at a time with
``O_NOFOLLOW`` (``openat``), so a link anywhere on the way, even one swapped in after the batch was
planned, makes the path unreachable; and only regular files are opened: the entry is ``lstat``-ed
first, opened with ``O_NONBLOCK`` and checked again with ``fstat`` (same inode, regular).

:func:`walk` lists a folder the same way; :func:`no_follow_fs` is a read-only pyarrow filesystem on
top, so the code that reads batch files (Parquet footers, row groups, image bytes) runs unchanged.
Paths must be absolute and free of ``.``/``..``; a batch's paths are made canonical (``realpath``)
once, when its location is resolved, so no link remains on the way to any of its files.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# folders on the way: O_PATH (Linux) needs no read permission, only search
_PATH_FLAGS = (getattr(os, "O_PATH", 0) or os.O_RDONLY) | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC
# O_NONBLOCK: were a FIFO to slip through, opening it would not wait for a writer
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK | _CLOEXEC


class NotRegularFile(OSError):
    """A path that is a link, FIFO, socket or device (or is reached through a link): never opened."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(errno.ELOOP if what == "a symbolic link" else errno.EINVAL, f"{path} is {what}")
        self.what = what


def what_is(mode: int) -> str:
    """What a non-regular entry is, in words ('a symbolic link', 'a FIFO', ...)."""
    for test, words in (
        (stat.S_ISREG, "a file, not a folder"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def _parts(path: str) -> list[str]:
    parts = path.split("/")
    if not path.startswith("/") or any(p in (".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"{path!r}: an absolute path without '.' or '..' is needed")
    return [p for p in parts if p]


def _open_parent(path: str) -> tuple[int, str]:
    """A descriptor of the folder holding ``path``, reached from '/' without following a link, and
    the last name. Raises OSError (ELOOP / ENOTDIR when a link is on the way, ENOENT when missing)."""
    parts = _parts(path)
    if not parts:
        raise OSError(errno.EISDIR, f"{path!r} is the root folder")
    fd = os.open("/", _PATH_FLAGS)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def lstat(path: str) -> os.stat_result | None:
    """The entry at ``path`` itself (a link is not followed), or None when it is missing or can only
    be reached through a link."""
    try:
        fd, name = _open_parent(path)
    except OSError:
        return None
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)


def open_regular(path: str) -> pa.NativeFile:
    """``path`` opened for reading, when it is a regular file reached without a link; else
    :class:`NotRegularFile` (or OSError: missing, no permission). Nothing else is ever opened."""
    fd, name = _open_parent(path)
    try:
        before = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(before.st_mode):
            raise NotRegularFile(path, what_is(before.st_mode))
        try:
            file_fd = os.open(name, _FILE_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ELOOP:  # became a link since the stat
                raise NotRegularFile(path, "a symbolic link") from None
            raise
    finally:
        os.close(fd)
    try:
        now = os.fstat(file_fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise NotRegularFile(
                path,
                what_is(now.st_mode) if not stat.S_ISREG(now.st_mode) else "replaced while it was opened",
            )
        os.set_blocking(file_fd, True)
        return pa.PythonFile(os.fdopen(file_fd, "rb", buffering=0), mode="r")
    except BaseException:
        os.close(file_fd)
        raise


def walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``root`` but folders, as (path relative to root, lstat), in sorted order.

    Folders are entered without following links; a link (to a file or a folder), FIFO, socket or
    device is yielded as it is, never opened or entered. Names starting with '.' or '_' (hidden
    files, manifests, markers) are left out, folders of that name with everything in them.
    Raises FileNotFoundError when ``root`` is missing, NotRegularFile when it is not a folder.
    """
    if not _parts(root):
        yield from _walk_fd(os.open("/", _LIST_FLAGS), "")
        return
    fd, name = _open_parent(root)
    try:
        top = os.open(name, _LIST_FLAGS, dir_fd=fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise NotRegularFile(root, what_is(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)) from None
    finally:
        os.close(fd)
    yield from _walk_fd(top, "")


def _walk_fd(fd: int, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
    try:
        with os.scandir(fd) as it:
            entries = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
        for name, st in entries:
            if name.startswith((".", "_")):
                continue
            rel = f"{prefix}{name}"
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub = os.open(name, _LIST_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                        raise
                    continue  # replaced by a link (or removed) while listing: not entered
                yield from _walk_fd(sub, f"{rel}/")
            else:
                yield rel, st
    finally:
        os.close(fd)


class NoFollowHandler(pafs.FileSystemHandler):
    """A read-only pyarrow filesystem handler: :func:`lstat` for file info, :func:`open_regular` to read."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoFollowHandler)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(NoFollowHandler)

    def get_type_name(self) -> str:
        return "zalando-nofollow"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        out = []
        for path in paths:
            st = lstat(path)
            if st is None:
                out.append(pafs.FileInfo(path, pafs.FileType.NotFound))
            elif stat.S_ISREG(st.st_mode):
                out.append(pafs.FileInfo(path, pafs.FileType.File, size=st.st_size, mtime_ns=st.st_mtime_ns))
            elif stat.S_ISDIR(st.st_mode):
                out.append(pafs.FileInfo(path, pafs.FileType.Directory, mtime_ns=st.st_mtime_ns))
            else:  # a link, FIFO, socket or device
                out.append(pafs.FileInfo(path, pafs.FileType.Unknown))
        return out

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        try:
            entries = list(walk(selector.base_dir))
        except FileNotFoundError:
            if selector.allow_not_found:
                return []
            raise
        base = selector.base_dir.rstrip("/")
        if not selector.recursive:
            entries = [(rel, st) for rel, st in entries if "/" not in rel]
        return self.get_file_info([f"{base}/{rel}" for rel, _ in entries])

    def open_input_file(self, path: str) -> pa.NativeFile:
        return open_regular(path)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return open_regular(path)

    def _read_only(self, *_: object) -> None:
        raise PermissionError("batch inputs are read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


@functools.cache
def no_follow_fs() -> pafs.PyFileSystem:
    """The read-only, link-refusing local filesystem of file-system batches (one per process)."""
    return pafs.PyFileSystem(NoFollowHandler())
