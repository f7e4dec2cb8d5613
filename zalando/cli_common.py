"""What every `zalando` command shares: the console, one-line errors and exit codes, logging, the
settings, the lake session, and the Prefect environment of the command's own flow runs.

:mod:`zalando.cli` registers the commands; :mod:`zalando.cli_score`, :mod:`zalando.cli_review` and
:mod:`zalando.catalogue.cli` hold groups of them and import these helpers from here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions

from zalando.errors import ZalandoError

PIPE_WIDTH = 400  # columns of output to a pipe or a file: wide enough that rich cuts no table cell


class _CliConsole(Console):
    """The console of everything the commands print (tables above all): the terminal's width on a
    terminal; elsewhere (a nightly's log file, a pipe, a test) PIPE_WIDTH, where rich would fall back
    to 80 columns and cut ids to ``experime…``. Tables are as wide as their content, never padded."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


log = logging.getLogger(__name__)
console = _CliConsole()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def zalando_error_of(exc: BaseException) -> ZalandoError | None:
    """The ZalandoError behind an exception (Prefect wraps task failures), if any."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ZalandoError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as e:  # noqa: BLE001 - the one place where errors become exit codes
            z = zalando_error_of(e)
            if z is None:
                raise
            fail(str(z).strip().splitlines()[0] if str(z).strip() else z.__class__.__name__)

    return wrapper


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, markup=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("botocore", "urllib3", "codecarbon", "matplotlib", "PIL", "httpx", "asyncio", "pyiceberg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def settings_from(**overrides: Any) -> Any:
    from pydantic import ValidationError

    from zalando.settings import load_settings

    try:
        return load_settings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        fail(f"setting {where}: {first['msg']}")


@contextlib.contextmanager
def lake_session(settings: Any) -> Iterator[Any]:
    """The lake of these settings, with the embedded S3 server running when needed."""
    from zalando.lake import Lake
    from zalando.s3server import embedded_s3

    with embedded_s3(settings):
        lake = Lake.from_settings(settings)
        lake.ensure_ready()
        yield lake


def open_lake_catalog(settings: Any, lake: Any) -> Any:
    """The Iceberg catalog of this (ready) lake, which ``Lake.from_settings`` gave the settings' one."""
    return lake.catalog()


@contextlib.contextmanager
def spinner(text: str) -> Iterator[None]:
    with console.status(text, spinner="dots"):
        yield


# --------------------------------------------------------------------------- pipelines (Prefect flows)
# The command's own flow runs send no heartbeat events. Prefect 3.9 joins a flow run's heartbeat thread
# when the run ends, and that thread sleeps in 1-second steps: 0-1 s lost per flow run (two in a
# `zalando score`, five in a `zalando run`). Heartbeats only feed zombie-run automations, and
# prefect.yaml has none; the worker's deployment runs keep them. Any of these variables set wins.
HEARTBEAT_SETTINGS = (
    "PREFECT_FLOWS",
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
    "PREFECT_RUNNER_HEARTBEAT_FREQUENCY",
)


def flow_env(settings: Any) -> str:
    """Prefect settings for a CLI run: no telemetry, no flow-run heartbeats (HEARTBEAT_SETTINGS); the
    server PREFECT_API_URL names, else the local stack's of this work folder when `make up` runs it,
    else a temporary server (8-18 s to start).

    Must run before prefect is imported. Returns which API the flows use, for the one log line the
    command writes before its flow runs.
    """
    import os

    from zalando.local_stack import prefect_home, running_prefect

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server migrates a fresh database first: 20 s (the default) is not enough on 2 busy cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if not any(name in os.environ for name in HEARTBEAT_SETTINGS):
        os.environ["PREFECT_FLOWS"] = json.dumps({"heartbeat_frequency": None})
    if os.environ.get("PREFECT_API_URL"):
        return f"{os.environ['PREFECT_API_URL']} (PREFECT_API_URL)"
    work_dir = Path(settings.work_dir).resolve()
    stack = running_prefect(work_dir)
    if stack is not None:
        os.environ["PREFECT_API_URL"] = stack.api_url
        os.environ.setdefault("PREFECT_HOME", str(stack.home))
        return f"{stack.api_url} (the local stack's server)"
    # the same home as `make up`: its UI shows these runs
    home = prefect_home(work_dir)
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    return "a temporary server, started for this command (no local stack runs; `make up` starts one)"
