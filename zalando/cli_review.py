"""The review desk's commands: ``zalando ui`` (the web page) and ``zalando labels import|export|config``.

``zalando labels import`` measures the labelled KPIs of the batches it recorded decisions for at once
(issue 15). With a Prefect API set (``PREFECT_API_URL``, or the local stack's server when `make up`
runs it for this work folder) it runs the ``feedback`` flow, whose alarm event reaches that server's
automation and starts ``retrain``; without one it calls the step
directly: a flow would start a throw-away Prefect server (tens of seconds) whose event no automation
ever sees. The KPI table is committed either way; an alarm measured without an API is recorded as not
sent, and the next ``feedback/kpis`` run sends it.

Registered in :mod:`zalando.cli`; the shared helpers (settings, the lake session, error handling) come
from :mod:`zalando.cli_common`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

from zalando.cli_common import (
    console,
    fail,
    flow_env,
    handle_errors,
    lake_session,
    settings_from,
    setup_logging,
)

labels_app = typer.Typer(
    no_args_is_help=True,
    help="Reviewers' feedback labels: import a CSV or Label Studio export, export tasks.",
)
MAX_REASONS = 50
log = logging.getLogger(__name__)


def _ui_settings(**overrides: Any) -> Any:
    from pydantic import ValidationError

    from zalando.ui.settings import UiSettings

    try:
        return UiSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        fail(f"setting {where}: {first['msg']}")


@handle_errors
def ui(
    host: str = typer.Option(
        None, help="Address to bind (default 127.0.0.1); any other needs ZALANDO_UI_TOKEN"
    ),
    port: int = typer.Option(None, help="Port (default 8765)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request"),
) -> None:
    """Serve the review desk: runs and reports, batches and drift, the review queue."""
    import uvicorn

    from zalando.ui.app import create_app
    from zalando.ui.security import bind_problem
    from zalando.ui.store import LakeStore

    setup_logging(verbose)
    ui_settings = _ui_settings(host=host, port=port)
    token = ui_settings.token.get_secret_value() if ui_settings.token else None
    problem = bind_problem(ui_settings.host, token)
    if problem:
        fail(problem)
    with lake_session(settings_from()) as lake:
        app = create_app(LakeStore(lake), ui_settings)
        shown = f"[{ui_settings.host}]" if ":" in ui_settings.host else ui_settings.host
        console.print(
            f"review desk on http://{shown}:{ui_settings.port} (lake {lake.uri()}"
            + (", token required)" if token else ")")
        )
        uvicorn.run(
            app,
            host=ui_settings.host,
            port=ui_settings.port,
            log_level="info" if verbose else "warning",
            access_log=verbose,
        )


@labels_app.command("import")
@handle_errors
def import_labels(
    file: Path = typer.Argument(
        ..., help="A CSV (image_id,batch_id,label[,reviewer]) or a Label Studio JSON export"
    ),
    reviewer: str = typer.Option(
        None, help="Reviewer recorded for rows that name none (default: import:<file>)"
    ),
    kpis: bool = typer.Option(
        True, help="Measure the labelled KPIs of the batches with new decisions (an alarm retrains)"
    ),
) -> None:
    """Record reviewers' decisions from a file; bad rows are rejected with a reason, good ones kept."""
    from zalando.feedback import read_feedback_file, record_decisions
    from zalando.ui.store import LakeStore

    setup_logging(False)
    parsed = read_feedback_file(file)  # an unreadable file: one line, exit 2
    settings = settings_from()
    with lake_session(settings) as lake:
        result = record_decisions(
            LakeStore(lake),
            parsed.proposals,
            source="import",
            default_reviewer=reviewer or f"import:{file.name}",
        )
        batches = sorted({d.batch_id for d in result.accepted})
        measured = _measure_kpis(settings, lake, batches) if kpis and batches else []
    unlabelled = f", {parsed.unlabelled} tasks without annotations skipped" if parsed.unlabelled else ""
    console.print(
        f"{file}: {len(parsed.proposals)} decisions read ({parsed.kind}{unlabelled}): "
        f"{len(result.accepted)} recorded, {len(result.repeated)} already recorded, "
        f"{len(result.rejected)} rejected",
        highlight=False,
        soft_wrap=True,
    )
    for r in result.rejected[:MAX_REASONS]:
        console.print(f"  rejected {r.where}: {r.reason}", highlight=False, markup=False, soft_wrap=True)
    if len(result.rejected) > MAX_REASONS:
        console.print(f"  ... and {len(result.rejected) - MAX_REASONS} more rejected rows", highlight=False)
    for kpi in measured:
        _print_kpis(kpi)


def _measure_kpis(settings: Any, lake: Any, batches: list[str]) -> list[Any]:
    """The labelled KPIs of ``batches``: through the ``feedback`` flow when a Prefect API is set or the
    local stack runs (its alarm event reaches the automation), else the step directly (the alarm is
    recorded as not sent)."""
    import os

    from zalando.kpis import reviewed_thresholds
    from zalando.local_stack import running_prefect
    from zalando.steps.feedback import KpiResult, measure_labelled_kpis

    if not os.environ.get("PREFECT_API_URL") and running_prefect(Path(settings.work_dir)) is not None:
        log.info("Prefect API: %s", flow_env(settings))  # the stack's server: its automation sees the alarm
    if os.environ.get("PREFECT_API_URL"):
        from flows.feedback import labelled_kpis

        out = []
        for batch_id in batches:
            run = labelled_kpis(batch_id=batch_id, profile=settings.profile)
            out.extend(KpiResult.model_validate(r) for r in run["batches"].values())
        return out
    th = reviewed_thresholds(settings.kpi_thresholds)
    return [measure_labelled_kpis(lake, b, thresholds=th, run_id=f"labels-import-{b}") for b in batches]


def _print_kpis(kpi: Any) -> None:
    """One batch's labelled KPIs: a table per group and the alarm (or why nothing was measured)."""
    from rich.table import Table

    if kpi.skipped:
        console.print(f"batch {kpi.batch_id}: {kpi.skipped}; no labelled KPIs", highlight=False)
        return
    table = Table(
        title=f"labelled KPIs of batch {kpi.batch_id} (model {kpi.model_version}, {kpi.reviewed} reviewed items)"
    )
    for col in ("group", "reviewed", "predicted", "TP", "min TP", "recall", "precision", "alarm"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for g in kpi.groups:
        table.add_row(
            g.group_name, str(g.support), str(g.predicted), str(g.tp), "-" if g.min_tp is None else str(g.min_tp),
            "-" if g.recall is None else f"{g.recall:.3f}", "-" if g.precision is None else f"{g.precision:.3f}",
            g.reason or "-",
        )  # fmt: skip
    console.print(table)
    if not kpi.alarm:
        console.print("no KPI alarm", highlight=False)
    elif kpi.alarm_sent:
        console.print(f"KPI ALARM ({', '.join(kpi.alarm_groups)}): zalando.kpi.alarm sent", highlight=False)
    else:
        console.print(
            f"KPI ALARM ({', '.join(kpi.alarm_groups)}): recorded in {kpi.uri}; no Prefect API "
            "(PREFECT_API_URL) set, so the next `feedback/kpis` run sends zalando.kpi.alarm",
            highlight=False,
            soft_wrap=True,
        )


@labels_app.command("export")
@handle_errors
def export_labels(
    batch_id: str = typer.Argument(..., help="The batch (see `zalando ui` or `zalando predictions`)"),
    out: Path = typer.Option(None, help="Where to write the tasks (default: label-studio-<batch id>.json)"),
    all_rows: bool = typer.Option(False, "--all", help="Every prediction, not only the needs-review ones"),
    model_version: str = typer.Option(None, help="The model version (default: the newest that scored it)"),
    base_url: str = typer.Option(
        None, help="Where Label Studio reaches the page (default ZALANDO_UI_BASE_URL)"
    ),
) -> None:
    """Write the batch's review items as Label Studio tasks, the model's group as a pre-annotation."""
    from zalando.feedback import label_studio_tasks
    from zalando.ui.links import image_url
    from zalando.ui.store import LakeStore

    setup_logging(False)
    ui_settings = _ui_settings()
    base = base_url or ui_settings.base_url or f"http://{ui_settings.host}:{ui_settings.port}"
    token = ui_settings.token.get_secret_value() if ui_settings.token else None
    with lake_session(settings_from()) as lake:
        store = LakeStore(lake)
        batch = store.batch(batch_id, model_version)
        rows = store.prediction_rows(
            batch_id, batch.model_version, needs_review_only=not all_rows
        ).to_pylist()
    tasks = label_studio_tasks(rows, lambda b, i: image_url(base, b, i, token))
    target = out or Path(f"label-studio-{batch_id}.json")
    target.write_text(json.dumps(tasks, indent=2) + "\n", encoding="utf-8")
    console.print(
        f"{len(tasks)} tasks of batch {batch_id} (model {batch.model_version}) written to {target}; "
        "images served by `zalando ui` at "
        f"{base}; the labeling config: `zalando labels config`",
        highlight=False,
        soft_wrap=True,
    )


@labels_app.command("config")
def labels_config() -> None:
    """Print the Label Studio labeling config that exported tasks and imported results agree on."""
    from zalando.feedback import LABEL_STUDIO_CONFIG

    typer.echo(LABEL_STUDIO_CONFIG, nl=False)
