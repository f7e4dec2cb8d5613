"""`zalando catalog …`: the retailer's catalogue (init, demo, query, status, stop).

Registered in :mod:`zalando.cli` as a sub-app. Errors become one ``error:`` line and exit code 2
through the CLI's shared handler (:func:`zalando.cli_common.handle_errors`).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from zalando.cli_common import (
    console,
    fail,
    handle_errors,
    lake_session,
    settings_from,
    setup_logging,
    spinner,
)

catalog_app = typer.Typer(
    no_args_is_help=True,
    help="The retailer's catalogue in PostgreSQL (an embedded server unless ZALANDO_CATALOG_DSN is set).",
)


def _cli(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The main CLI's error handling, plus any stray psycopg error as one catalogue line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import psycopg

        from zalando.catalogue.errors import CatalogueError

        def guarded(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except psycopg.Error as e:
                first = next((s.strip() for s in str(e).splitlines() if s.strip()), e.__class__.__name__)
                raise CatalogueError(f"catalogue: {first}") from None

        return handle_errors(guarded)(*args, **kwargs)

    return wrapper


def _where(settings: Any) -> str:
    from zalando.catalogue.db import conninfo_for, describe

    return describe(conninfo_for(settings))


@catalog_app.command("init")
@_cli
def init_cmd(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Start the embedded server (no DSN) and leave it running; create the database and apply the schema."""
    from zalando.catalogue.db import connect, conninfo_for, ensure_database
    from zalando.catalogue.schema import SCHEMA_VERSION, init_schema
    from zalando.catalogue.server import server_for

    setup_logging(verbose)
    settings = settings_from()
    server, started = None, False
    if settings.embedded_catalog:
        server = server_for(settings)
        started = server.start()
    try:
        if server is not None:
            ensure_database(server)
        with connect(conninfo_for(settings)) as conn:
            init_schema(conn)
            products = conn.execute("SELECT count(*) FROM product").fetchone()[0]  # type: ignore[index]
    except BaseException:
        if started and server is not None:
            server.stop()
        raise
    if server is not None:
        console.print(
            f"catalogue server {'started' if started else 'already running'} on {server.address} "
            f"(data in {server.data_dir}); `zalando catalog stop` stops it"
        )
    console.print(f"schema version {SCHEMA_VERSION} in place in {_where(settings)}: {products} products")


@catalog_app.command("demo")
@_cli
def demo_cmd(
    products: int = typer.Option(2000, "--products", "-n", help="How many demo products (at least 10)"),
    source: str = typer.Option(
        None,
        "--source",
        "-s",
        help="Fashion-MNIST files: folder, https:// or s3:// (default: ZALANDO_DATA_SOURCE)",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Load DEMO DATA built from the Fashion-MNIST test split (replaces an earlier demo)."""
    from zalando.catalogue.db import catalogue_connection
    from zalando.catalogue.demo import load_demo
    from zalando.data.idx import read_split
    from zalando.data.sources import FILES, fetch_source

    setup_logging(verbose)
    settings = settings_from(data_source=source)
    with lake_session(settings) as lake, catalogue_connection(settings) as conn:
        with spinner(f"reading the test split from {settings.data_source}"):
            src = fetch_source(settings.data_source, cache_dir=Path(settings.work_dir) / "cache", s3=lake.s3)
            img, lab = FILES["test_images"], FILES["test_labels"]
            images, labels = read_split(img, src.files[img], lab, src.files[lab])
        with spinner(f"writing {products} demo products"):
            summary = load_demo(conn, lake, images, labels, n_products=products, seed=settings.seed)
    console.print(
        f"[bold]DEMO DATA[/] (generated from the Fashion-MNIST test split, marked in table demo_truth) "
        f"loaded into {_where(settings)}",
        highlight=False,
    )
    console.print(
        f"{summary.products} products, {summary.images} images, {summary.descriptions} descriptions "
        f"({summary.translated} translated; by country: "
        + ", ".join(f"{k} {v}" for k, v in summary.descriptions_by_country.items())
        + f"; {summary.products_without_us_description} products without a 'us' description)",
        highlight=False,
    )
    console.print(
        "deliberate defects: " + ", ".join(f"{k} {v}" for k, v in summary.defects.items()), highlight=False
    )
    console.print(
        f"images: {summary.image_prefix} ({summary.objects_written} objects written, "
        f"{summary.objects_reused} already there); done in {summary.seconds:.1f}s",
        highlight=False,
    )


@catalog_app.command("query")
@_cli
def query_cmd(
    country: str = typer.Option("us", "--country", "-c", help="Country code of the descriptions"),
    limit: int = typer.Option(20, "--limit", "-l", min=1, help="Rows to print (the counts cover all)"),
) -> None:
    """The catalogue query: every product's title, primary image (or why none) and description."""
    from zalando.catalogue.db import catalogue_connection
    from zalando.catalogue.demo import demo_products
    from zalando.catalogue.errors import CatalogueError
    from zalando.catalogue.query import catalogue_snapshot, normalize_country
    from zalando.catalogue.schema import check_schema

    setup_logging(False)
    code = normalize_country(country)
    settings = settings_from()
    t0 = time.perf_counter()
    with catalogue_connection(settings) as conn:
        check_schema(conn)
        demo = demo_products(conn)
        conn.rollback()
        with catalogue_snapshot(conn) as snap:
            total = snap.count_products()
            if total == 0:
                raise CatalogueError(f"catalogue {_where(settings)} has 0 products: an empty result")
            shown, problems, sources = [], Counter(), Counter()
            for row in snap.rows(code):
                if len(shown) < limit:
                    shown.append(row)
                problems[row.image_problem or "primary image ok"] += 1
                sources[row.description_source or "none"] += 1
    table = Table(title=f"first {len(shown)} of {total} products (descriptions for {code!r})")
    for col in ("product", "title", "image", "primary image URL / problem", "description", "source"):
        table.add_column(col, overflow="fold")
    for r in shown:
        table.add_row(
            str(r.product_id),
            Text(r.title if r.title is not None else "NULL"),
            str(r.image_id) if r.image_id is not None else "",
            Text(r.image_url or r.image_problem or ""),
            Text(r.description or ""),
            r.description_source or "",
        )
    console.print(table)
    if demo:
        console.print(f"[bold]DEMO DATA[/]: {demo} of these products are demo products (table demo_truth)")
    console.print(
        "primary image: " + ", ".join(f"{k} {v}" for k, v in problems.most_common()), highlight=False
    )
    console.print(
        "description: "
        + ", ".join(f"{k} {v}" for k, v in sources.most_common())
        + f"; read from one snapshot in {time.perf_counter() - t0:.2f}s",
        highlight=False,
    )


@catalog_app.command("status")
@_cli
def status_cmd() -> None:
    """Whether the embedded server runs (or the DSN answers), and what the catalogue holds."""
    from zalando.catalogue.db import connect, conninfo_for
    from zalando.catalogue.demo import demo_products
    from zalando.catalogue.schema import check_schema
    from zalando.catalogue.server import server_for

    settings = settings_from()
    if settings.embedded_catalog:
        server = server_for(settings)
        state = server.status()
        hint = {
            "stale": " (PID file left by a server that is gone; `zalando catalog init` replaces it)",
            "foreign": " (another program answers on this port)",
            "stopped": " (`zalando catalog init` starts it)",
        }.get(state, "")
        console.print(f"embedded catalogue on {server.address}: {state}{hint}", highlight=False)
        if state in ("stale", "foreign"):
            raise typer.Exit(1)
        if state != "running":
            return
    with connect(conninfo_for(settings)) as conn:
        check_schema(conn)
        products = conn.execute("SELECT count(*) FROM product").fetchone()[0]  # type: ignore[index]
        scored = conn.execute("SELECT count(*) FROM product_classification").fetchone()[0]  # type: ignore[index]
        demo = demo_products(conn)
    console.print(
        f"catalogue {_where(settings)}: schema ok, {products} products ({scored} classified)"
        + (f"; DEMO DATA ({demo} demo products)" if demo else ""),
        highlight=False,
    )


@catalog_app.command("stop")
@_cli
def stop_cmd() -> None:
    """Stop the embedded catalogue server."""
    from zalando.catalogue.server import server_for

    settings = settings_from()
    if not settings.embedded_catalog:
        fail("ZALANDO_CATALOG_DSN is set: there is no embedded catalogue server to stop")
    server = server_for(settings)
    console.print("catalogue server stopped" if server.stop() else "catalogue server was not running")


def check_catalogue_for_scoring(
    settings: Any, lake: Any, model_version: str | None, allow_empty: bool
) -> str:
    """`zalando score --catalog`, before Prefect starts: one line for each bad input (a champion, the
    catalogue reachable with these credentials, its schema, not empty); returns the model version."""
    from zalando.catalogue.db import connect, conninfo_for
    from zalando.catalogue.errors import CatalogueError
    from zalando.catalogue.schema import check_schema
    from zalando.scoring.champion import resolve_model_version

    version = model_version or resolve_model_version(lake)
    with connect(conninfo_for(settings)) as conn:
        check_schema(conn)
        products = conn.execute("SELECT count(*) FROM product").fetchone()[0]  # type: ignore[index]
        conn.rollback()
    if products == 0 and not allow_empty:
        raise CatalogueError(
            f"catalogue {_where(settings)} has 0 products: an empty batch, nothing scored "
            "(--allow-empty commits it as an empty batch)"
        )
    return version


def print_catalogue_scoring(s: dict[str, Any]) -> None:
    """The summary of a catalogue batch: the reconciliation, quarantine reasons, text check, write-back."""

    console.print(
        f"catalogue batch {s['batch_id']} ({s['database']}, descriptions for {s['country']!r}) "
        f"with model {s['model_version']}",
        highlight=False,
    )
    table = Table()
    cols = ("products", "scored", "quarantined", "skipped (unchanged)", "needs review", "written back")
    for c in cols:
        table.add_column(c, justify="right")
    wb = s["write_back"]
    table.add_row(
        str(s["products"]), str(s["scored"]), str(s["quarantined"]), str(s["skipped_products"]),
        str(s["needs_review"]), str(wb["written"]),
    )  # fmt: skip
    console.print(table)
    rec = s["reconciliation"]
    console.print(
        f"reconciled: {rec['products']} products = {rec['scored']} scored + {rec['quarantined']} "
        f"quarantined + {rec['skipped']} skipped",
        highlight=False,
    )
    if s["products"] == 0:
        console.print("the catalogue has 0 products: an empty batch was committed", highlight=False)
    if s.get("reasons"):
        console.print(
            "quarantined by reason: " + ", ".join(f"{k} {v}" for k, v in s["reasons"].items()),
            highlight=False,
        )
    t = s["text"]
    console.print(
        f"text_disagrees: {t['disagreeing']} of {t['products']} scored products "
        f"(of {t['naming_an_article']} whose description names an article); low confidence "
        f"{s['low_confidence']}",
        highlight=False,
    )
    console.print(
        f"write-back: {wb['written']} written, {wb['unchanged']} unchanged, {wb['kept_newer']} kept (newer), "
        f"{wb['products_gone']} products gone"
        + (f"; repaired {', '.join(r['batch_id'] for r in s['repaired'])}" if s.get("repaired") else ""),
        highlight=False,
    )
    console.print(
        f"predictions: {s['predictions_table']} where batch_id = '{s['batch_id']}' "
        f"(snapshot {s['snapshot_id']})",
        highlight=False,
    )
