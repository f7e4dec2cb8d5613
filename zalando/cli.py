"""The `zalando` command: thin, calls library functions or flows.

Every command reads the typed settings (env prefix ZALANDO_), starts the embedded S3 server when
no endpoint is configured (reusing one that `zalando stack up` left running), and turns a
ZalandoError into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from zalando.errors import ZalandoError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Zalando: nightly batch scoring of fashion images."
)
stack_app = typer.Typer(no_args_is_help=True, help="The embedded S3 server, kept running between commands.")
app.add_typer(stack_app, name="stack")

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _unwrap(exc: BaseException) -> ZalandoError | None:
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
            z = _unwrap(e)
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
    for noisy in ("botocore", "urllib3", "codecarbon", "matplotlib", "PIL", "httpx", "asyncio"):
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


@contextlib.contextmanager
def spinner(text: str) -> Iterator[None]:
    with console.status(text, spinner="dots"):
        yield


# --------------------------------------------------------------------------- data
@app.command()
@handle_errors
def ingest(
    source: str = typer.Option(
        None, "--source", "-s", help="https:// prefix, folder or s3:// prefix (default: ZALANDO_DATA_SOURCE)"
    ),
    force: bool = typer.Option(False, help="Re-ingest even if this exact source is already in the lake"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Download/verify/parse/validate Fashion-MNIST into the lake, then split it (dataset version)."""
    from zalando.data.ingest import ingest as run_ingest
    from zalando.data.sources import fetch_source
    from zalando.data.split import preprocess

    setup_logging(verbose)
    settings = settings_from(data_source=source)
    t0 = time.perf_counter()
    with lake_session(settings) as lake:
        with spinner(f"reading and verifying {settings.data_source}"):
            src = fetch_source(
                settings.data_source, cache_dir=Path(settings.work_dir) / "cache", s3=_s3_config(settings)
            )
        with spinner("validating and writing raw tables"):
            summary = run_ingest(lake, src, force=force)
        with spinner("splitting train/validation"):
            dv = preprocess(lake, seed=settings.seed)
    print_ingest_summary(summary, dv, lake.uri(), time.perf_counter() - t0)


def _s3_config(settings: Any) -> Any:
    from zalando.lake import S3Config

    if not settings.uses_s3:
        return None
    return S3Config(
        endpoint=settings.effective_s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        region=settings.s3_region,
    )


def print_ingest_summary(summary: dict[str, Any], dv: Any, lake_uri: str, seconds: float) -> None:
    table = Table(
        title=f"Ingested into {lake_uri} ({'already there, skipped' if summary['skipped'] else 'written'})"
    )
    table.add_column("group")
    for split in summary["splits"]:
        table.add_column(f"{split} rows", justify="right")
    groups = next(iter(summary["splits"].values()))["groups"]
    for g in groups:
        table.add_row(g, *[str(s["groups"][g]) for s in summary["splits"].values()])
    table.add_row("[bold]total", *[f"[bold]{s['rows']}" for s in summary["splits"].values()])
    console.print(table)
    q = summary.get("quarantine") or {}
    console.print(
        f"quarantine: {sum(q.values())} images"
        + (f" ({', '.join(f'{k}: {v}' for k, v in q.items())})" if q else "")
    )
    console.print(
        f"dataset version {dv.dataset_version}: {dv.n_train} train / {dv.n_val} validation, mean {dv.mean:.4f} std {dv.std:.4f}"
    )
    console.print(f"done in {seconds:.1f}s")


@app.command()
@handle_errors
def eda(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Write the EDA report (distributions, duplicates, pixels, average/median images) to reports/."""
    from zalando.data.eda import write_eda
    from zalando.lake import new_run_id

    setup_logging(verbose)
    settings = settings_from()
    with lake_session(settings) as lake:
        with spinner("building the EDA report"):
            out = write_eda(lake, new_run_id())
    console.print(f"EDA report: {out['uri']}/eda.md ({len(out['files'])} files)")


# --------------------------------------------------------------------------- registry
def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "cli"


@app.command()
@handle_errors
def models(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """List registered model versions with their headline metrics; the champion is starred."""
    from zalando.registry import list_models

    setup_logging(verbose)
    with lake_session(settings_from()) as lake:
        df = list_models(lake)
    if df.empty:
        console.print("no model registered yet: run `zalando train` (or `make run`)")
        return
    table = Table(title="Registered models")
    metric_cols = [
        c
        for c in ("metrics.accuracy", "metrics.macro_f1", "metrics.latency_ms_per_1000", "metrics.size_mb")
        if c in df.columns
    ]
    short = {
        "metrics.accuracy": "acc",
        "metrics.macro_f1": "macro F1",
        "metrics.latency_ms_per_1000": "ms/1k",
        "metrics.size_mb": "MB",
    }
    for col in ["", "version", "experiment", "dataset", "registered", *metric_cols]:
        table.add_column(short.get(col, col), no_wrap=col in ("version", "registered"))
    for rec in df.sort_values("registered_at").to_dict("records"):
        cells = [
            "*" if rec.get("is_champion") else "",
            rec["model_version"],
            rec["experiment"],
            str(rec.get("dataset_version", "")),
            str(rec.get("registered_at", ""))[:16],
        ]
        cells += [f"{rec[c]:.4g}" if isinstance(rec[c], float) else str(rec[c]) for c in metric_cols]
        table.add_row(*cells)
    console.print(table)


@app.command()
@handle_errors
def promote(
    model_version: str = typer.Argument(..., help="The version to make champion (see `zalando models`)"),
    reason: str = typer.Option("manual promotion", help="Recorded in the decision log"),
) -> None:
    """Make a registered model version the champion, by hand (recorded in the decision log)."""
    from zalando.registry import promote as do_promote

    setup_logging(False)
    with lake_session(settings_from()) as lake:
        pointer = do_promote(lake, model_version, reason=reason, actor=_actor())
    console.print(f"champion is now {pointer['model_version']} ({pointer['experiment']})")


@app.command()
@handle_errors
def rollback(reason: str = typer.Option("manual rollback", help="Recorded in the decision log")) -> None:
    """Put the previous champion back (recorded in the decision log)."""
    from zalando.registry import rollback as do_rollback

    setup_logging(False)
    with lake_session(settings_from()) as lake:
        pointer = do_rollback(lake, actor=_actor(), reason=reason)
    console.print(f"champion rolled back to {pointer['model_version']} ({pointer['experiment']})")


# --------------------------------------------------------------------------- stack
@stack_app.command("up")
@handle_errors
def stack_up() -> None:
    """Start the embedded S3 server in the background (reused by every command until `stack down`)."""
    from zalando.s3server import server_for

    settings = settings_from()
    if not settings.embedded_s3:
        fail(f"ZALANDO_S3_ENDPOINT is set ({settings.s3_endpoint}): there is no embedded server to start")
    server = server_for(settings)
    server.state_dir.mkdir(parents=True, exist_ok=True)
    started = server.start()
    console.print(
        f"S3 {'started' if started else 'already running'} on {server.endpoint} (data in {server.state_dir / 'data'})"
    )


@stack_app.command("down")
@handle_errors
def stack_down() -> None:
    """Stop the embedded S3 server started by `stack up`."""
    from zalando.s3server import server_for

    server = server_for(settings_from())
    console.print("S3 stopped" if server.stop() else "S3 was not running")


@stack_app.command("status")
@handle_errors
def stack_status() -> None:
    """Say whether the embedded S3 server is running, stopped or stale."""
    from zalando.s3server import server_for

    server = server_for(settings_from())
    state = server.status()
    hint = {
        "stale": " (PID file left by a server that is gone; `zalando stack up` replaces it)",
        "foreign": " (another program answers on this port)",
    }.get(state, "")
    console.print(f"S3 on {server.endpoint}: {state}{hint}")
    if state in ("stale", "foreign"):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
