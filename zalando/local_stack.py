"""The bookkeeping of the local stack (`infra/stack.py up`, what `make up` runs), read without Prefect.

`up` keeps its state under the work folder: ``prefect/`` is the stack's PREFECT_HOME, ``stack/``
holds ``stack.json`` (the components `up` started, for `down`) and one PID file per process
(``prefect-server.pid``: its pid, command line and start time). `infra/stack.py` writes these files
through the paths below; the CLI reads them to use a running stack's Prefect server instead of
starting a temporary one (:func:`running_prefect`).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zalando.s3server import pid_alive

log = logging.getLogger(__name__)

PREFECT_SERVER = "prefect-server"  # the component name in stack.json and its PID file's stem
HEALTH_TIMEOUT_S = 0.5  # a live local server answers /health in milliseconds


@dataclass(frozen=True)
class StackPrefect:
    """The Prefect server of a running stack: what a client needs to use it."""

    api_url: str
    home: Path  # the stack's PREFECT_HOME


def state_dir(work_dir: Path) -> Path:
    """Logs, PID files and stack.json of the stack of this work folder."""
    return Path(work_dir) / "stack"


def prefect_home(work_dir: Path) -> Path:
    """PREFECT_HOME of the stack (and of the CLI's temporary server): database, results, profiles."""
    return Path(work_dir) / "prefect"


def stack_file(work_dir: Path) -> Path:
    return state_dir(work_dir) / "stack.json"


def pid_file(work_dir: Path, name: str) -> Path:
    return state_dir(work_dir) / f"{name}.pid"


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def read_started(work_dir: Path) -> list[str]:
    """The components `up` started and `down` has not stopped yet ([] without a readable stack.json)."""
    try:
        return [str(name) for name in json.loads(stack_file(work_dir).read_text())["started"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def read_pid_info(work_dir: Path, name: str) -> dict[str, Any] | None:
    """The PID file of component ``name`` (``pid``, ``cmd``, ``started_at``), None when unreadable."""
    try:
        info = json.loads(pid_file(work_dir, name).read_text())
        int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def process_cmdline(pid: int) -> str:
    """The command line of a process, '' when it is gone or unreadable."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running_pid(work_dir: Path, name: str) -> int | None:
    """PID of the stack's process ``name`` when it is alive and still a Prefect program (not a reused pid)."""
    info = read_pid_info(work_dir, name)
    if info is None:
        return None
    pid = int(info["pid"])
    if pid_alive(pid) and "prefect" in process_cmdline(pid):
        return pid
    return None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _server_port(info: dict[str, Any]) -> int | None:
    """The ``--port`` of the server command line a PID file records."""
    cmd = [str(a) for a in info.get("cmd") or []]
    try:
        return int(cmd[cmd.index("--port") + 1])
    except (ValueError, IndexError):
        return None


def running_prefect(work_dir: Path, timeout: float = HEALTH_TIMEOUT_S) -> StackPrefect | None:
    """The stack's Prefect server for this work folder when `up` started it, its process lives and it
    answers ``/api/health`` within ``timeout``; else None (a stale stack.json is no error)."""
    work_dir = Path(work_dir).resolve()
    if PREFECT_SERVER not in read_started(work_dir):
        return None
    info = read_pid_info(work_dir, PREFECT_SERVER)
    port = _server_port(info) if info is not None else None
    if port is None or running_pid(work_dir, PREFECT_SERVER) is None:
        log.debug("stack.json in %s names a Prefect server that is not running", state_dir(work_dir))
        return None
    url = api_url(port)
    if not http_ok(f"{url}/health", timeout):
        log.debug("the stack's Prefect server %s does not answer /health within %.1fs", url, timeout)
        return None
    return StackPrefect(api_url=url, home=prefect_home(work_dir))
