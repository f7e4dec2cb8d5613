"""The bookkeeping of the local stack (`infra/stack.py up`, what `make up` runs), read without Prefect.

`up` keeps its state under the work folder: ``prefect/`` is the stack's PREFECT_HOME, ``stack/``
holds ``stack.json`` (the components `up` started, for `down`) and one PID file per process
(``prefect-server.pid``: its pid, command line and start time). `infra/stack.py` writes these files
through the paths below; the CLI reads them to use a running stack's Prefect server instead of
starting a temporary one (:func:`running_prefect`), and to hand a batch to the stack's warm scorer
(``infra/scorer.py``: :func:`running_scorer`, :func:`request_score`), which has the libraries
imported and the champion loaded already.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zalando.s3server import pid_alive

log = logging.getLogger(__name__)

PREFECT_SERVER = "prefect-server"  # the component name in stack.json and its PID file's stem
SCORER = "scorer"  # the warm scorer (infra/scorer.py)
HEALTH_TIMEOUT_S = 0.5  # a live local server answers /health in milliseconds
# what a component's command line must hold to be ours (a reused pid runs something else)
COMMAND_MARKERS = {SCORER: "scorer.py"}
# settings that may differ between the CLI and the scorer: the CLI sends its own batch roots, and
# these are read by ingest, training, feedback and the catalogue, never by scoring a file or S3 batch
# (`make up` sets ZALANDO_DATA_SOURCE for the stack, a user's shell usually does not). A new setting
# is compared until it is listed here.
PER_REQUEST_SETTINGS = frozenset({"batch_roots"})
NOT_READ_BY_SCORING = frozenset(
    {
        "data_source",
        "seed",
        "experiments_file",
        "device",
        "kpi_thresholds",
        "feedback_weight",
        "feedback_holdout",
        "catalog_dsn",
        "catalog_user",
        "catalog_password",
        "catalog_db",
        "catalog_port",
        "catalog_fetch_concurrency",
        "catalog_fetch_timeout_s",
        "catalog_fetch_retries",
        "catalog_fetch_max_redirects",
        "catalog_fetch_hosts",
    }
)


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


# A process just started reads as an empty command line for a moment: the kernel closes the
# close-on-exec files (which is when Popen returns) before it sets the new program's arguments.
# Measured: 569 of 3,000 reads made right after Popen returned were empty. An empty read of a live
# process is made again after these pauses.
CMDLINE_SETTLE_PAUSES_S = (0.01, 0.05, 0.2, 0.5)


def process_cmdline(pid: int) -> str:
    """The command line of a process, '' when it is gone or unreadable (or has none, as a kernel
    thread). A live process whose command line is not set yet, in the middle of its exec, is read
    again."""
    raw = b""
    for pause in (0.0, *CMDLINE_SETTLE_PAUSES_S):
        time.sleep(pause)
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return ""
        if raw or not pid_alive(pid):
            break
    return raw.replace(b"\0", b" ").decode(errors="replace")


def running_pid(work_dir: Path, name: str) -> int | None:
    """PID of the stack's process ``name`` when it is alive and still the program `up` started (a
    Prefect program, or the scorer), not a reused pid."""
    info = read_pid_info(work_dir, name)
    if info is None:
        return None
    pid = int(info["pid"])
    if pid_alive(pid) and COMMAND_MARKERS.get(name, "prefect") in process_cmdline(pid):
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


# ----------------------------------------------------------------------------- the warm scorer


@dataclass(frozen=True)
class StackScorer:
    """The warm scorer of a running stack: where it listens and the token it asks for."""

    url: str
    token: str
    pid: int


class ScorerUnavailable(RuntimeError):
    """The scorer could not take the request (gone, or it runs other settings): score in-process."""


def scorer_file(work_dir: Path) -> Path:
    """The scorer's port and token (mode 0600: only the stack's user may hand it a batch)."""
    return state_dir(work_dir) / "scorer.json"


def running_scorer(work_dir: Path, timeout: float = HEALTH_TIMEOUT_S) -> StackScorer | None:
    """The stack's warm scorer for this work folder when `up` started it, it lives, and it answers
    ``/health`` as ready within ``timeout``; else None."""
    work_dir = Path(work_dir).resolve()
    if SCORER not in read_started(work_dir):
        return None
    pid = running_pid(work_dir, SCORER)
    try:
        info = json.loads(scorer_file(work_dir).read_text())
        url, token = f"http://127.0.0.1:{int(info['port'])}", str(info["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid is None:
        return None
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            ready = json.loads(r.read()).get("ready") is True
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return StackScorer(url=url, token=token, pid=pid) if ready else None


def settings_fingerprint(settings: Any) -> dict[str, str]:
    """A short hash of every setting's value (secrets included, never sent in clear): the scorer takes
    a batch only when its settings are the CLI's, apart from :data:`PER_REQUEST_SETTINGS` and
    :data:`NOT_READ_BY_SCORING`."""
    out: dict[str, str] = {}
    for name in sorted(type(settings).model_fields):
        if name in PER_REQUEST_SETTINGS or name in NOT_READ_BY_SCORING:
            continue
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, Path):
            value = str(value.expanduser().resolve())
        raw = json.dumps(value, sort_keys=True, default=str)
        out[name] = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return out


def request_score(scorer: StackScorer, payload: dict[str, Any]) -> dict[str, Any]:
    """Hand one batch to the warm scorer and wait for its answer (``ok``, ``summary`` or ``error`` and
    ``exit_code``, and the log records of the run).

    Raises :class:`ScorerUnavailable` when it refuses before scoring (it is gone, or it runs other
    settings: 409), so the caller scores in-process; an answer lost after it started is an OSError.
    """
    req = urllib.request.Request(
        f"{scorer.url}/score",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {scorer.token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=None) as r:  # a large batch takes as long as it takes
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        if e.code == 409:
            raise ScorerUnavailable(detail) from None
        raise OSError(f"the local stack's scorer answered HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            raise ScorerUnavailable("connection refused") from None
        raise OSError(f"the local stack's scorer: {e.reason}") from None


def scorer_progress(scorer: StackScorer, timeout: float = 2.0) -> dict[str, Any] | None:
    """The batch the scorer is on: ``completed`` images, ``total`` records, ``rate`` (None between
    batches, or when it does not answer: a progress bar never fails the command)."""
    req = urllib.request.Request(
        f"{scorer.url}/progress", headers={"Authorization": f"Bearer {scorer.token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            state = json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return state if isinstance(state, dict) and "completed" in state else None
