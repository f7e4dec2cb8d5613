"""The `zalando` command: thin, calls library functions or flows.

Every command reads the typed settings (env prefix ZALANDO_), starts the embedded S3 server when
no endpoint is configured (reusing one that `zalando stack up` left running), and turns a
ZalandoError into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table

from zalando.catalogue.cli import catalog_app
from zalando.cli_review import labels_app, ui
from zalando.errors import ZalandoError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Zalando: nightly batch scoring of fashion images."
)
stack_app = typer.Typer(no_args_is_help=True, help="The embedded S3 server, kept running between commands.")
app.add_typer(stack_app, name="stack")
app.add_typer(catalog_app, name="catalog")
lake_app = typer.Typer(no_args_is_help=True, help="The lake's Iceberg tables: maintenance and migration.")
app.add_typer(lake_app, name="lake")

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


@app.command()
@handle_errors
def run(
    profile: str = typer.Option(None, help="paper | cpu | quick (default: ZALANDO_PROFILE, cpu)"),
    experiments: list[str] = typer.Option(None, "--experiment", "-e", help="Train only these (repeatable)"),
    batch: str = typer.Option(None, help="The night's batch (default: the Fashion-MNIST test split)"),
    force: bool = typer.Option(False, help="Redo cached steps and re-score a committed batch"),
    runner: str = typer.Option(
        "local", help="local (one experiment at a time here) or dask (one per Dask worker; shards too)"
    ),
    dask_address: str = typer.Option(None, help="The Dask scheduler, tcp://HOST:8786 (with --runner dask)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """The nightly pipeline now: ingest → preprocess → train → evaluate → promote → score the batch."""
    setup_logging(verbose)
    _check_runner(runner, dask_address)
    settings = settings_from(profile=profile)
    prefect_api = flow_env(settings)
    from flows.nightly import nightly

    t0 = time.perf_counter()
    log.info("Prefect API: %s", prefect_api)
    with lake_session(settings):  # one S3 server for the whole run (the flows reuse it)
        result = nightly(
            profile=settings.profile,
            experiments=experiments or None,
            batch_uri=batch,
            force=force,
            runner=runner,
            dask_address=dask_address,
        )
    _print_training(result["training"])
    _print_scoring(result["scoring"])
    console.print(f"nightly run finished in {time.perf_counter() - t0:.1f}s")


@app.command()
@handle_errors
def train(
    experiments: list[str] = typer.Option(None, "--experiment", "-e", help="Experiment name (repeatable)"),
    all_experiments: bool = typer.Option(False, "--all", help="Every experiment of the profile"),
    profile: str = typer.Option(None, help="paper | cpu | quick (default: ZALANDO_PROFILE, cpu)"),
    force: bool = typer.Option(False, help="Retrain even when the cache says nothing changed"),
    runner: str = typer.Option(
        "local", help="local (one experiment at a time here) or dask (one per Dask worker, in parallel)"
    ),
    dask_address: str = typer.Option(
        None, help="The Dask scheduler, tcp://HOST:8786 (with --runner dask; default: a local cluster)"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train, evaluate and gate experiments (the `training` flow); the best passing one is promoted."""
    from zalando.models.experiments import load_catalog

    setup_logging(verbose)
    _check_runner(runner, dask_address)
    settings = settings_from(profile=profile)
    if not experiments and not all_experiments:
        fail(
            "name experiments with --experiment NAME (repeatable) or pass --all for the profile's experiments"
        )
    catalog = load_catalog(settings.experiments_file)
    for name in experiments or []:
        catalog.resolved(name, settings.profile)  # unknown names fail here, listing the valid ones
    prefect_api = flow_env(settings)
    from flows.training import training

    log.info("Prefect API: %s", prefect_api)
    with lake_session(settings):
        result = training(
            profile=settings.profile,
            experiments=experiments or None,
            force=force,
            reason="cli",
            runner=runner,
            dask_address=dask_address,
        )
    _print_training(result)


def _check_runner(runner: str, dask_address: str | None) -> None:
    if runner not in ("local", "dask"):
        fail(f"--runner {runner!r}: use local or dask")
    if dask_address and runner != "dask":
        fail("--dask-address goes with --runner dask")


def _print_training(result: dict[str, Any]) -> None:
    console.print(
        f"training run {result['run_id']} (profile {result['profile']}, dataset {result['dataset_version']}): "
        f"models {', '.join(f'{k}={v}' for k, v in result.get('models', {}).items())}"
    )
    champion = result.get("champion")
    console.print(f"champion: {champion} ({'promoted tonight' if result.get('promoted') else 'unchanged'})")
    if result.get("report"):
        console.print(f"report: {result['report']}")


def _print_scoring(summary: dict[str, Any]) -> None:
    skipped = bool(summary.get("skipped"))
    # the heading as a line of its own: a table title would wrap at the table's width, splitting the ids
    console.print(
        f"batch {summary['batch_id']} with model {summary['model_version']} "
        f"({'already committed: skipped' if skipped else 'scored'})"
    )
    table = Table()
    cols = {
        "records": "records",
        "scored": "scored",
        "quarantined": "quarantined",
        "low_confidence": "needs review",
        "seconds": "batch wall s",
    }
    for title in cols.values():
        table.add_column(title, justify="right")
    cells = [str(summary.get(c, "")) for c in cols]
    # a skipped batch was not timed by this run
    cells[-1] = "–" if skipped else f"{float(summary.get('seconds') or 0.0):.2f}"
    table.add_row(*cells)
    console.print(table)
    if not skipped:
        console.print("batch wall s: this run's time for the batch, from planning to commit, shards included")
    if summary.get("group_counts"):
        console.print(
            "predicted groups: " + ", ".join(f"{k} {v}" for k, v in summary["group_counts"].items())
        )
    if summary.get("reasons"):
        console.print(
            "quarantined by reason: " + ", ".join(f"{k} {v}" for k, v in summary["reasons"].items())
        )
    if summary.get("drift") is not None:
        d = summary["drift"]
        console.print(
            f"drift alarm: {'[bold red]RAISED[/] (' + ', '.join(d.get('alarms', [])) + ')' if d.get('alarm') else 'no'}"
        )
    console.print(
        f"predictions: {summary.get('predictions_table', '')} where batch_id = '{summary['batch_id']}' "
        f"(snapshot {summary.get('snapshot_id')})"
    )
    if summary.get("shadow"):
        _print_shadow(summary["shadow"])


def _print_shadow(shadow: dict[str, Any]) -> None:
    status, challenger = shadow.get("status"), shadow.get("challenger_version")
    if status == "no_challenger":
        console.print(
            "shadow: asked for, but there is no challenger (no registered model besides the champion)"
        )
    elif status == "failed":
        console.print(f"shadow: challenger {challenger} [bold red]failed[/] ({shadow.get('error')})")
    else:
        rate = shadow.get("agreement")
        console.print(
            f"shadow: challenger {challenger} {status}, agreement with the champion "
            f"{'–' if rate is None else f'{rate:.2%}'} (shadow_predictions, shadow_agreement)"
        )


class ShardProgress:
    """Images a batch's shards have committed so far, read from the shard commit markers the scoring
    tasks write (images/s from the first shard on, not from Prefect's start-up)."""

    def __init__(self, lake: Any, markers: str, total: int | None) -> None:
        import threading

        self.lake, self.markers, self.total = lake, markers, total
        self._seen: dict[str, int] = {}
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        try:  # markers of an earlier run (re-scored with --force): ignored until the reset removes them
            self._old = set(lake.list_keys(markers))
        except Exception:  # noqa: BLE001 - progress never fails the run
            self._old = set()

    def poll(self) -> dict[str, Any]:
        """``completed`` images, the batch's ``total`` records and the ``rate`` in images/s."""
        with self._lock:
            try:
                keys = set(self.lake.list_keys(self.markers))
                self._old &= keys
                for k in sorted(keys - self._old):
                    if k not in self._seen:
                        marker = self.lake.read_json(k)
                        self._seen[k] = int(marker.get("records", marker.get("scored", 0)) or 0)
                        if len(self._seen) == 1:
                            self._t0 = time.perf_counter() - float(marker.get("seconds", 0.0) or 0.0)
            except Exception:  # noqa: BLE001 - progress never fails the run
                pass
            n = sum(self._seen.values())
            return {
                "completed": n,
                "total": self.total,
                "rate": n / max(time.perf_counter() - self._t0, 1e-9),
            }


def draw_progress(read: Callable[[], dict[str, Any] | None], stop: Any) -> None:
    """A progress bar on stderr (images, images/s, ETA), fed by ``read()`` every 0.5 s until ``stop``
    is set: a :meth:`ShardProgress.poll` here, or the warm scorer's /progress."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        task = progress.add_task("score", total=None, rate="")
        while True:
            done = stop.wait(0.5)
            state = read()
            if state:
                rate = f"{state['rate']:,.0f} img/s"
                progress.update(task, total=state["total"], completed=state["completed"], rate=rate)
            if done:
                return


def score_one(
    lake: Any,
    settings: Any,
    location: str,
    *,
    batch_date: Any,
    model_version: str | None,
    runner: str,
    shard_size: int,
    workers: int,
    force: bool,
    dask_address: str | None,
    allow_empty: bool = False,
    shadow: bool = False,
    prefect_api: str | None = None,
    progress: bool = True,
    on_progress: Callable[[ShardProgress | None], None] | None = None,
) -> dict[str, Any]:
    """One batch through the `batch_scoring` flow, after the input checks (one line for bad input,
    before Prefect starts); ``progress``: a progress bar on stderr, fed by the shard markers.

    The local stack's warm scorer (infra/scorer.py) runs this too, without the bar: it is given the
    batch's :class:`ShardProgress` through ``on_progress`` once the checks pass (None at the end)."""
    import threading

    from flows.batch_scoring import batch_scoring
    from zalando.lake.keys import shard_markers_prefix
    from zalando.scoring.batch import _as_date, default_source_slug, describe_batch, make_batch_id
    from zalando.scoring.champion import resolve_model_version

    bdate = _as_date(batch_date)
    version = model_version or resolve_model_version(
        lake
    )  # no champion: a clear error, before Prefect starts
    batch_id = make_batch_id(bdate, default_source_slug(location))
    # the boundary and an empty location fail here, in one line, before Prefect starts
    total = describe_batch(
        lake, location, batch_date=bdate, hash_inputs=False, allow_empty=allow_empty
    ).records
    if prefect_api:  # after the input checks: bad input stays one line
        log.info("Prefect API: %s", prefect_api)
    shards = ShardProgress(lake, shard_markers_prefix(bdate, version, batch_id), total)
    if on_progress is not None:
        on_progress(shards)
    stop = threading.Event()
    watcher = threading.Thread(target=draw_progress, args=(shards.poll, stop), daemon=True)
    if progress:
        watcher.start()
    try:
        return batch_scoring(
            batch_uri=location,
            batch_date=bdate,
            model_version=model_version,
            shard_size=shard_size,
            runner=runner,
            workers=workers,
            dask_address=dask_address,
            force=force,
            profile=settings.profile,
            allow_empty=allow_empty,
            shadow=shadow,
        )
    finally:
        stop.set()
        if progress:
            watcher.join(timeout=5)
        if on_progress is not None:
            on_progress(None)


@app.command()
@handle_errors
def score(
    batch_uri: str = typer.Argument(
        None, help="Lake key or s3:// / file:// location of Parquet or image files (default: the test split)"
    ),
    model_version: str = typer.Option(None, help="Score with this version instead of the champion"),
    runner: str = typer.Option("local", help="local (Prefect's thread pool) or dask (DaskTaskRunner)"),
    shard_size: int = typer.Option(10_000, min=1, help="Rows per shard"),
    workers: int = typer.Option(1, min=1, max=64, help="Shards at a time"),
    dask_address: str = typer.Option(None, help="An existing Dask scheduler (with --runner dask)"),
    batch_date: str = typer.Option(None, "--date", help="The batch's date, YYYY-MM-DD (default: today)"),
    date_from: str = typer.Option(
        None, "--from", help="Backfill: first date (batches at inbox/batch_date=D, or BATCH_URI with {date})"
    ),
    date_to: str = typer.Option(None, "--to", help="Backfill: last date"),
    force: bool = typer.Option(False, help="Score again even if this batch is committed"),
    allow_empty: bool = typer.Option(
        False, "--allow-empty", help="A location without input files scores as an empty batch (else an error)"
    ),
    shadow: bool = typer.Option(
        False, "--shadow", help="Also score with the challenger (newest registered non-champion) beside it"
    ),
    catalog: bool = typer.Option(
        False, "--catalog", help="Score the retailer's catalogue in Postgres (the `catalogue` flow)"
    ),
    country: str = typer.Option("us", "--country", help="--catalog: the descriptions' country code"),
    full: bool = typer.Option(False, "--full", help="--catalog: every product, not only new or changed ones"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Score a batch with the champion (the `batch_scoring` flow), or backfill a range of dates, or
    (--catalog) the retailer's catalogue, incrementally, writing the groups back.

    A file:// location must lie under ZALANDO_BATCH_ROOTS (default: the work folder and the current
    directory), an s3:// one in the lake's bucket or ZALANDO_BATCH_BUCKETS. A backfill skips the
    days without input; a location named directly must hold input files unless --allow-empty.
    """
    from datetime import date

    setup_logging(verbose)
    _check_score_options(runner, date_from, date_to, catalog, batch_uri, dask_address, shadow, country, full)
    settings = settings_from()
    options = dict(
        runner=runner,
        shard_size=shard_size,
        workers=workers,
        force=force,
        dask_address=dask_address,
        allow_empty=allow_empty,
        shadow=shadow,
    )
    if not catalog and date_from is None:
        request = dict(
            options, location=batch_uri, batch_date=batch_date, model_version=model_version, verbose=verbose
        )
        if _score_in_stack(settings, request):
            return
    from zalando.scoring.batch import find_demo_batch
    from zalando.scoring.commit import BatchResult
    from zalando.scoring.run import INBOX_TEMPLATE, BackfillEntry, backfill

    prefect_api = flow_env(settings)
    if catalog:
        _score_catalogue(
            settings, prefect_api, country, full, batch_date, model_version, workers, allow_empty
        )
        return
    with lake_session(settings) as lake:
        kw = dict(options, prefect_api=prefect_api)
        if date_from is None:
            location = batch_uri or find_demo_batch(lake)
            summary = score_one(
                lake, settings, location, batch_date=batch_date, model_version=model_version, **kw
            )
            _print_scoring(summary)
            return

        def score_day(
            location: str, *, batch_date: date | None, source: str | None, model_version: str
        ) -> BatchResult:
            # the flow names the batch from its location (source is None: the same default slug)
            summary = score_one(
                lake, settings, location, batch_date=batch_date, model_version=model_version, **kw
            )
            _print_scoring(summary)
            return BatchResult.model_validate(summary)

        def show_no_input(entry: BackfillEntry) -> None:
            if entry.status == "no_input":
                console.print(f"{entry.batch_date}: no input at {entry.location}, skipped")

        backfill(
            open_lake_catalog(settings, lake),
            date_from=date_from,
            date_to=date_to,
            location_template=batch_uri if batch_uri and "{date}" in batch_uri else INBOX_TEMPLATE,
            source=None,
            model_version=model_version,
            stop_on_error=True,
            score_one=score_day,
            on_entry=show_no_input,
        )


def _score_in_stack(settings: Any, request: dict[str, Any]) -> bool:
    """Hand one batch to the local stack's warm scorer when `make up` runs one for these settings
    (and ZALANDO_SCORER is not ``off``, and PREFECT_API_URL names no other server); True when it
    answered (scored, or failed: then this exits as the command would have). No prefect, torch or
    lake client is imported on this path: the command costs the scorer's run and ~0.5 s."""
    import os

    from zalando import local_stack

    if os.environ.get("ZALANDO_SCORER", "").strip().lower() in ("off", "0", "false", "no"):
        return False
    work_dir = Path(settings.work_dir).resolve()
    asked = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if asked:
        stack = local_stack.running_prefect(work_dir)
        if stack is None or stack.api_url.rstrip("/") != asked:
            return False
    scorer = local_stack.running_scorer(work_dir)
    if scorer is None:
        return False
    payload = dict(
        request,
        batch_roots=[str(p) for p in settings.batch_root_paths()],
        settings=local_stack.settings_fingerprint(settings),
    )
    try:
        answer = _wait_for_scorer(scorer, payload)
    except local_stack.ScorerUnavailable as e:
        log.info("the local stack's scorer cannot take this batch (%s): scoring in this process", e)
        return False
    except OSError as e:
        fail(f"the local stack's scorer (pid {scorer.pid}) gave no answer: {e}; see its log in "
             f"{local_stack.state_dir(work_dir)}", 1)  # fmt: skip
    for rec in answer.get("logs", []):
        logging.getLogger(str(rec.get("name") or "zalando")).log(
            int(rec.get("level", logging.INFO)), "%s", rec.get("message", "")
        )
    if not answer.get("ok"):
        fail(str(answer.get("error") or "the local stack's scorer failed"), int(answer.get("exit_code", 1)))
    _print_scoring(answer["summary"])
    return True


def _wait_for_scorer(scorer: Any, payload: dict[str, Any], quiet_s: float = 1.5) -> dict[str, Any]:
    """The scorer's answer; a batch that takes longer than ``quiet_s`` gets a progress bar fed by
    the scorer's /progress (a small one is done before the bar would be worth its import)."""
    import threading

    from zalando import local_stack

    out: dict[str, Any] = {}

    def ask() -> None:
        try:
            out["answer"] = local_stack.request_score(scorer, payload)
        except BaseException as e:  # noqa: BLE001 - raised again in the command's thread
            out["error"] = e

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(quiet_s)
    if asking.is_alive():
        stop = threading.Event()
        bar = threading.Thread(
            target=draw_progress, args=(lambda: local_stack.scorer_progress(scorer), stop), daemon=True
        )
        bar.start()
        asking.join()
        stop.set()
        bar.join(timeout=5)
    if "error" in out:
        raise out["error"]
    return out["answer"]


def _check_score_options(
    runner: str, date_from: Any, date_to: Any, catalog: bool, batch_uri: str | None,
    dask_address: str | None, shadow: bool, country: str, full: bool,
) -> None:  # fmt: skip
    """`zalando score`'s options that do not go together: one line and exit 2."""
    if runner not in ("local", "dask"):
        fail(f"--runner {runner!r}: use local or dask")
    if (date_from is None) != (date_to is None):
        fail("--from and --to go together")
    if catalog and (batch_uri or date_from or dask_address or runner != "local" or shadow):
        fail(
            "--catalog scores the catalogue: no BATCH_URI, --from/--to, --runner, --dask-address or --shadow"
        )
    if not catalog and (country != "us" or full):
        fail("--country and --full go with --catalog")


def _score_catalogue(
    settings: Any,
    prefect_api: str,
    country: str,
    full: bool,
    batch_date: str | None,
    model_version: str | None,
    workers: int,
    allow_empty: bool,
) -> None:
    """`zalando score --catalog`: the bad-input checks before Prefect starts, then the `catalogue` flow."""
    from flows.catalogue import catalogue_scoring
    from zalando.catalogue.cli import check_catalogue_for_scoring, print_catalogue_scoring
    from zalando.catalogue.query import normalize_country
    from zalando.catalogue.server import embedded_postgres
    from zalando.scoring.batch import _as_date

    code = normalize_country(country)
    with lake_session(settings) as lake, embedded_postgres(settings):
        version = check_catalogue_for_scoring(settings, lake, model_version, allow_empty)
        log.info("Prefect API: %s", prefect_api)
        summary = catalogue_scoring(
            country=code,
            full=full,
            batch_date=_as_date(batch_date) if batch_date else None,
            model_version=version,
            workers=workers,
            allow_empty=allow_empty,
            profile=settings.profile,
        )
    print_catalogue_scoring(summary)


@app.command()
@handle_errors
def predictions(
    batch_id: str = typer.Argument(..., help="e.g. 2026-11-29-fashion-mnist-test"),
    model_version: str = typer.Option(None, help="Default: the newest version that scored this batch"),
    rows: int = typer.Option(5, min=0, max=100),
    as_of: str = typer.Option(
        None,
        "--as-of",
        metavar="TIMESTAMP|SNAPSHOT",
        help="Read the batch as it stood then: an ISO timestamp (UTC unless it says) or a snapshot id",
    ),
) -> None:
    """Per-group counts, the reconciliation and a few rows of a scored batch (now, or --as-of then)."""
    from zalando.scoring.query import predictions_preview

    setup_logging(False)
    settings = settings_from()
    with lake_session(settings) as lake:
        p = predictions_preview(open_lake_catalog(settings, lake), batch_id, model_version, rows, as_of=as_of)
    when = f" as of {p['as_of']} (snapshot {p['snapshot_id']})" if p["as_of"] else ""
    console.print(
        f"batch {p['batch_id']} scored by {p['model_version']}{when}: "
        f"{p['predictions_table']} where batch_id = '{p['batch_id']}'"
    )
    console.print(f"table metadata (DuckDB: iceberg_scan('…')): {p['metadata_location']}", soft_wrap=True)
    if p["other_versions"]:
        console.print(f"also scored by: {', '.join(p['other_versions'])}")
    counts = Table(title="predicted group")
    counts.add_column("group")
    counts.add_column("images", justify="right")
    for g, n in p["group_counts"].items():
        counts.add_row(str(g), str(n))
    console.print(counts)
    console.print("reconciliation: " + ", ".join(f"{k} {v}" for k, v in p["counts"].items()))
    if p["reasons"]:
        console.print("quarantined by reason: " + ", ".join(f"{k} {v}" for k, v in p["reasons"].items()))
    if p["rows"]:
        cols = [c for c in p["rows"][0] if c not in ("model_version", "batch_id")]
        t = Table(title=f"first {len(p['rows'])} rows")
        for c in cols:
            t.add_column(c)
        for r in p["rows"]:
            t.add_row(*(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
        console.print(t)


# --------------------------------------------------------------------------- reports
def _run_tables(lake: Any, run_id: str) -> dict[str, Any]:
    from zalando.errors import NotCommittedError
    from zalando.steps.training import metric_table, read_metric_tables

    out = read_metric_tables(lake, run_id, names=("per_group", "performance", "energy", "summary"))
    if out["summary"].empty and out["per_group"].empty:
        where = lake.catalog().identifier(metric_table("summary"))
        raise NotCommittedError(f"run {run_id!r} has no metrics in table {where}; see `zalando runs`")
    return out


@app.command()
@handle_errors
def report(
    run_id: str = typer.Option(..., "--run-id", help="A run id (see `zalando runs`)"),
    out: Path = typer.Option(None, help="Where to write the Markdown report (default: report-<run id>.md)"),
) -> None:
    """Print a run's tables (per group × experiment, performance, energy) and write its Markdown report."""
    from zalando.lake.keys import report_key
    from zalando.report import display_tables, render_tables

    setup_logging(False)
    with lake_session(settings_from()) as lake:
        t = _run_tables(lake, run_id)
        per_group = t["per_group"]
        if "split" in per_group.columns:
            per_group = per_group[per_group["split"] == "test"]
        render_tables(
            console,
            display_tables(per_group, t["performance"], t["energy"], t["summary"]),
            title_prefix=f"run {run_id}: ",
        )
        key = report_key(run_id)
        if not lake.is_committed(key):
            fail(f"run {run_id}: no committed report at {lake.uri(key)}")
        md = lake.read_file(key, "report.md")
        target = out or Path(f"report-{run_id}.md")
        target.write_bytes(md)
    console.print(f"Markdown report written to {target} (PNGs beside it in the lake: {lake.uri(key)})")


@app.command()
@handle_errors
def runs(limit: int = typer.Option(10, min=1, help="How many recent runs")) -> None:
    """Recent training runs with their headline numbers (test split)."""
    import pandas as pd

    from zalando.steps.training import read_metric_tables

    setup_logging(False)
    with lake_session(settings_from()) as lake:
        t = read_metric_tables(lake, names=("summary", "per_group"))
    s, pg = t["summary"], t["per_group"]
    run_ids = sorted(set(s["run_id"]) | set(pg["run_id"]), reverse=True)[:limit]
    s = s[s["split"] == "test"] if "split" in s.columns else s
    pg = pg[(pg["split"] == "test") & (pg["group_name"] == "One piece")]
    rows = []
    for rid in run_ids:
        op_run = pg[pg["run_id"] == rid]
        for rec in s[s["run_id"] == rid].sort_values("experiment").to_dict("records"):
            op = op_run[op_run["experiment"] == rec["experiment"]]
            rows.append(
                {
                    "run_id": rid,
                    "experiment": rec["experiment"],
                    "model_version": rec.get("model_version", ""),
                    "accuracy": rec.get("accuracy"),
                    "macro_f1": rec.get("macro_f1"),
                    "one_piece_recall": op["recall"].iloc[0] if len(op) else None,
                    "one_piece_precision": op["precision"].iloc[0] if len(op) else None,
                }
            )
    if not rows:
        console.print("no runs yet: `zalando run` (or `make run`) makes one")
        return
    df = pd.DataFrame(rows)
    table = Table(title="Recent runs (test split)")
    for c in df.columns:
        table.add_column(
            c.replace("_", " "),
            justify="right" if c not in ("run_id", "experiment", "model_version") else "left",
        )
    for rec in df.to_dict("records"):
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in rec.values()))
    console.print(table)


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
def gate(
    model_version: str = typer.Argument(..., help="A registered challenger (see `zalando models`)"),
    apply: bool = typer.Option(
        False, "--apply", help="Record the decision: promote when every gate passes, else reject"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Gate a registered challenger against the champion again, with what its shadow scoring showed
    (agreement, accuracy on reviewed items): prints the gate report."""
    from zalando.lake import new_run_id
    from zalando.registry import apply_gate_decision
    from zalando.steps.promotion import gate_registered

    setup_logging(verbose)
    settings = settings_from()
    with lake_session(settings) as lake:
        decision = gate_registered(lake, settings, model_version, new_run_id())
        console.print(decision.to_markdown(), markup=False, highlight=False)
        if apply:
            out = apply_gate_decision(lake, model_version, decision, actor=_actor())
            champion = (out.get("champion") or {}).get("model_version")
            console.print(
                f"{'promoted' if out['promoted'] else 'rejected'}: {model_version}; champion {champion}"
            )


@app.command()
@handle_errors
def rollback(reason: str = typer.Option("manual rollback", help="Recorded in the decision log")) -> None:
    """Put the previous champion back (recorded in the decision log)."""
    from zalando.registry import rollback as do_rollback

    setup_logging(False)
    with lake_session(settings_from()) as lake:
        pointer = do_rollback(lake, actor=_actor(), reason=reason)
    console.print(f"champion rolled back to {pointer['model_version']} ({pointer['experiment']})")


# --------------------------------------------------------------------------- the catalogue
def _model_cost(spec: Any, input_size: int, memo: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of ``spec``'s untrained network at ``input_size``.

    Built on the CPU without weights (none are loaded or downloaded); the global RNG is left as it was.
    One thread: a single image's forward pass gains nothing from more, and spinning threads on busy
    cores made it 10-40x slower.
    """
    import json

    import torch

    from zalando.models.architectures import build_model, count_macs, count_parameters

    key = json.dumps([spec.architecture, spec.num_outputs, input_size, spec.arch_params], sort_keys=True)
    if key not in memo:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                model = build_model(spec.architecture, spec.num_outputs, input_size, spec.arch_params)
            memo[key] = (count_parameters(model), count_macs(model))
        finally:
            torch.set_num_threads(threads)
    return memo[key]


@app.command()
@handle_errors
def experiments() -> None:
    """Every experiment (built-in and ZALANDO_EXPERIMENTS_FILE's): its network, cost, input size and profiles."""
    from zalando.models.experiments import load_catalog

    setup_logging(False)
    catalog = load_catalog(settings_from().experiments_file)
    table = Table(
        title=f"Experiments ({catalog.source})",
        caption="MFLOP per image = 2 x the multiply-accumulates of the conv and linear layers (count_macs), "
        "at each profile's input size (its max_input_size cap); parameters of the untrained network (no weights "
        "loaded).",
    )
    for title in (
        "experiment",
        "architecture",
        "parameters",
        "input px (profile)",
        "MFLOP/img",
        "trained by",
    ):
        table.add_column(title, justify="right" if title in ("parameters", "MFLOP/img") else "left")
    memo: dict[str, tuple[int, int]] = {}
    for name, spec in catalog.experiments.items():
        by_size: dict[int, list[str]] = {}
        for profile in catalog.profiles:
            by_size.setdefault(catalog.resolved(name, profile).input_size, []).append(profile)
        costs = {size: _model_cost(spec, size, memo) for size in by_size}
        params = [p for p, _ in costs.values()]  # one line per size only where the size changes them
        table.add_row(
            name,
            spec.architecture,
            "\n".join(f"{p:,}" for p in (params if len(set(params)) > 1 else params[:1])),
            "\n".join(f"{size} ({', '.join(profiles)})" for size, profiles in by_size.items()),
            "\n".join(f"{2 * macs / 1e6:,.1f}" for _, macs in costs.values()),
            ", ".join(p.name for p in catalog.profiles.values() if name in p.experiments) or "–",
        )
    console.print(table)


def _profile_value(value: Any) -> str:
    """A profile field as table text: '–' for no cap, one line per experiment or per setting."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        value = value.model_dump()
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple | list):
        return "\n".join(str(v) for v in value) or "–"
    if isinstance(value, dict):
        if not value:
            return "–"
        return "\n".join(
            f"{k}: " + (", ".join(f"{f}={_number(v)}" for f, v in sub.items()) if isinstance(sub, dict) else str(sub))
            for k, sub in value.items()
        )  # fmt: skip
    return _number(value)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@app.command()
@handle_errors
def profiles() -> None:
    """What each profile changes: its caps and numbers, the experiments it trains, its per-experiment overrides."""
    from zalando.models.experiments import ProfileParams, load_catalog

    setup_logging(False)
    catalog = load_catalog(settings_from().experiments_file)
    table = Table(
        title=f"Profiles ({catalog.source})",
        caption="–: no cap, each experiment keeps its own value. overrides: numbers set per experiment.",
        show_lines=True,
    )
    table.add_column("setting")
    for name in catalog.profiles:
        table.add_column(name)
    for field in ProfileParams.model_fields:
        if field != "name":
            table.add_row(field, *(_profile_value(getattr(p, field)) for p in catalog.profiles.values()))
    console.print(table)


# --------------------------------------------------------------------------- the lake's tables
@lake_app.command("maintain")
@handle_errors
def lake_maintain(
    older_than_days: float = typer.Option(7.0, min=0, help="Expire snapshots older than this many days"),
    orphans_older_than_days: float = typer.Option(
        3.0, min=0, help="Remove unreferenced files older than this many days"
    ),
    dry_run: bool = typer.Option(False, help="Expire nothing; list the orphan files that would go"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Expire old snapshots of every table and remove the files nothing references (per table)."""
    from zalando.steps.maintenance import maintain_lake

    setup_logging(verbose)
    with lake_session(settings_from()) as lake:
        with spinner("maintaining the lake's tables"):
            out = maintain_lake(
                lake,
                older_than_days=older_than_days,
                orphans_older_than_days=orphans_older_than_days,
                dry_run=dry_run,
            )
    title = (
        f"Lake maintenance{' (dry run)' if dry_run else ''}: snapshots older than {older_than_days:g} days"
    )
    table = Table(title=title)
    table.add_column("table")
    table.add_column("snapshots expired", justify="right")
    table.add_column(f"orphan files {'found' if dry_run else 'removed'}", justify="right")
    for t in out.tables:
        table.add_row(t.table, str(t.snapshots_expired), str(t.orphan_files))
    table.add_row("[bold]total", f"[bold]{out.snapshots_expired}", f"[bold]{out.orphan_files}")
    console.print(table)
    console.print(
        f"unfinished uploads {'found' if dry_run else 'aborted'}: {len(out.stale_uploads)}", highlight=False
    )
    if verbose:
        for t in out.tables:
            for key in t.orphan_keys:
                console.print(f"  {t.table}: {key}", highlight=False)
        for key in out.stale_uploads:
            console.print(f"  unfinished upload: {key}", highlight=False)
    console.print(f"done in {out.seconds:.1f}s")


@lake_app.command("migrate")
@handle_errors
def lake_migrate(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Move a lake written before the Iceberg tables into them (committed files only; idempotent)."""
    from zalando.lake.migrate import migrate_lake

    setup_logging(verbose)
    with lake_session(settings_from()) as lake:
        with spinner("migrating the legacy partitions"):
            report = migrate_lake(lake)
    if report.nothing_to_do:
        console.print(f"nothing to migrate: {lake.uri()} holds no legacy partition")
        return
    table = Table(title=f"Migrated {len(report.partitions)} partitions and {report.decisions} decisions")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, rows in sorted(report.rows.items()):
        table.add_row(name, str(rows))
    console.print(table)
    if report.left_out:
        console.print(f"left out {len(report.left_out)} uncommitted files (no manifest lists them):")
        for key in report.left_out:
            console.print(f"  {key}", highlight=False)


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


# --------------------------------------------------------------------------- review desk
app.command("ui")(ui)
app.add_typer(labels_app, name="labels")


def _exit_status(code: Any) -> int:
    """The process status Python gives ``SystemExit(code)``: None is 0, an int itself, else 1 (the
    interpreter has printed the message by then)."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _exit_without_teardown(status: list[int | None]) -> None:
    """The command's last exit handler: end the process with its status, skipping the interpreter's
    teardown (freeing every module of torch, Prefect, pyiceberg, scipy: 3 s of a 22 s `zalando score`
    on busy cores) that changes nothing outside the process.

    It runs after the exit handlers registered after it (Prefect stops its temporary server and drains
    its log and event workers, pyarrow finalizes S3, weakref finalizers remove temporary folders);
    non-daemon threads were joined before any of them. Of the handlers registered before it
    (`main` registers it first) only logging's exists, so it shuts logging down itself. When an
    exception other than SystemExit ended the command, ``status`` holds None: the normal exit.
    """
    import os

    if status[0] is None:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to flush
            stream.flush()
    os._exit(status[0])


def main() -> None:  # pragma: no cover - console entry point
    import atexit
    import os

    # OpenMP threads spin at most 10k iterations before sleeping. Unbounded spinning collapses when
    # the 2 cores are shared (the S3 server, Prefect, another job); never spinning (PASSIVE) trains
    # 40% slower on free cores. Must precede torch's import; an explicit setting wins.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    status: list[int | None] = [None]
    atexit.register(_exit_without_teardown, status)  # first registered, so the last to run
    try:
        app()
    except SystemExit as e:
        status[0] = _exit_status(e.code)
        raise
    status[0] = 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
