"""The `zalando` command: thin, calls library functions or flows.

Every command reads the typed settings (env prefix ZALANDO_), starts the embedded S3 server when
no endpoint is configured (reusing one that `zalando stack up` left running), and turns a
ZalandoError into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from zalando.catalogue.cli import catalog_app
from zalando.cli_common import (
    console,
    fail,
    flow_env,
    handle_errors,
    lake_session,
    settings_from,
    setup_logging,
    spinner,
)
from zalando.cli_review import labels_app, ui
from zalando.cli_score import predictions, print_scoring, score

log = logging.getLogger(__name__)
app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Zalando: nightly batch scoring of fashion images."
)
stack_app = typer.Typer(no_args_is_help=True, help="The embedded S3 server, kept running between commands.")
app.add_typer(stack_app, name="stack")
app.add_typer(catalog_app, name="catalog")
lake_app = typer.Typer(no_args_is_help=True, help="The lake's Iceberg tables: maintenance and migration.")
app.add_typer(lake_app, name="lake")


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
    print_scoring(result["scoring"])
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


# --------------------------------------------------------------------------- scoring (zalando/cli_score.py)
app.command()(score)
app.command()(predictions)


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
