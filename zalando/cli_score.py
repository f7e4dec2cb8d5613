"""`zalando score` and `zalando predictions`: score a folder, a lake key or the retailer's catalogue,
in the warm scorer of the local stack when it runs (:mod:`infra.scorer`), else in this process; and
preview a batch's predictions.

:func:`score_one` is the scoring of one batch both paths run: the input checks, then the
``batch_scoring`` flow. The commands are registered in :mod:`zalando.cli`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from zalando.cli_common import (
    console,
    err_console,
    fail,
    flow_env,
    handle_errors,
    lake_session,
    open_lake_catalog,
    settings_from,
    setup_logging,
)

log = logging.getLogger(__name__)


def print_scoring(summary: dict[str, Any]) -> None:
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
            print_scoring(summary)
            return

        def score_day(
            location: str, *, batch_date: date | None, source: str | None, model_version: str
        ) -> BatchResult:
            # the flow names the batch from its location (source is None: the same default slug)
            summary = score_one(
                lake, settings, location, batch_date=batch_date, model_version=model_version, **kw
            )
            print_scoring(summary)
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
    print_scoring(answer["summary"])
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
