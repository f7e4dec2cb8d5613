"""Scoring a catalogue: the pieces chained, query to write-back, on the batch-scoring engine.

One catalogue batch, in three stages (``flows/catalogue.py`` runs them as tasks, the benchmark in
one process):

1. :func:`plan_catalogue_batch`: repair the write-backs an earlier run left pending
   (:func:`zalando.catalogue.writeback.repair`); ONE snapshot (REPEATABLE READ) of the query's rows
   and the previous scores; the incremental selection; the products file (the candidates, with what
   the selection needs later) written to the lake; shards of kind ``catalogue`` over its rows, each
   with the engine's deterministic :class:`~zalando.scoring.batch.ShardTarget`; the model checked once.
2. :func:`run_catalogue_shard`: the engine's :func:`~zalando.scoring.shard.score_shard` with
   :func:`read_catalogue_shard` as its reader: fetch the shard's primary images (bounded, parallel),
   leave out the unchanged digests, decode; every catalogue defect and fetch or decode problem a
   quarantine row with its reason code. Predictions carry the product (id, image id, URL, digest,
   title, description) and the text check's review reason ``text_disagrees``.
3. :func:`commit_catalogue_batch`: reconcile ``products = scored + quarantined + skipped`` row by row
   (a CatalogueError naming the ids if not); :func:`register_batch` in the catalogue's ledger; the
   engine's exactly-once lake commit (:func:`~zalando.scoring.commit.finalize_batch`); the write-back
   of the committed predictions, in one transaction.

Nothing is written to the catalogue before stage 3, and stage 3 writes only once the batch reconciles:
a bad input (no server, a missing column, 0 products) leaves the catalogue untouched.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from zalando.catalogue.errors import CatalogueError
from zalando.catalogue.fetch import FetchedImage, ImageFetcher, redact_url
from zalando.catalogue.incremental import (
    Candidate,
    PreviousScore,
    Reconciliation,
    drop_unchanged,
    read_previous,
    reconcile,
    select_for_scoring,
)
from zalando.catalogue.query import ProductRow, catalogue_snapshot, normalize_country
from zalando.catalogue.schema import check_schema
from zalando.catalogue.text import TEXT_DISAGREES, TextCheckSummary, review_reason, summarize_text_checks
from zalando.catalogue.writeback import (
    PredictionRow,
    WriteBackResult,
    pending_batches,
    register_batch,
    repair,
    write_back,
)
from zalando.images import ImagePrepConfig, ImageRejected, decode_image
from zalando.lake import Lake, new_run_id
from zalando.lake.catalog import LakeCatalog
from zalando.lake.commit import scan
from zalando.lake.tables import BATCHES, PREDICTIONS, QUARANTINE, TABLES
from zalando.runtime import Predictor, Runtime
from zalando.scoring.batch import Batch, InputFile, ShardRef, make_batch_id, plan_shards
from zalando.scoring.champion import load_champion_predictor, resolve_model_version
from zalando.scoring.commit import BatchResult, finalize_batch
from zalando.scoring.inputs import Evidence, ShardInput
from zalando.scoring.locations import open_input
from zalando.scoring.run import _lake_for, check_tables_and_model, shard_target
from zalando.scoring.shard import ScoringError, ScoringOptions, ShardResult, read_shard_markers, score_shard

log = logging.getLogger(__name__)

DEFAULT_CATALOGUE_SHARD_SIZE = 1000
LOW_CONFIDENCE = "low_confidence"  # review reason of a scored product below the confidence threshold
PRODUCTS_PREFIX = "catalogue/batches"

# the products file of a batch: one row per product of the snapshot (every one is a candidate; the
# fetched digest decides which are unchanged), with its last score for that decision
PRODUCTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # the engine's record id: the product id as text
        ("product_id", pa.int64()),
        ("catalogue_image_id", pa.int64()),
        ("image_url", pa.string()),
        ("image_problem", pa.string()),
        ("title", pa.string()),
        ("description", pa.string()),
        ("description_source", pa.string()),
        ("score_reason", pa.string()),
        ("prev_model_version", pa.string()),
        ("prev_image_id", pa.int64()),
        ("prev_image_url", pa.string()),
        ("prev_image_sha256", pa.string()),
        ("prev_batch_id", pa.string()),
        ("prev_scored_at", pa.timestamp("us", tz="UTC")),
    ]
)


class CatalogueBatchPlan(BaseModel):
    """A catalogue batch ready to score: its snapshot's products file, shards and pinned model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    batch_id: str
    batch_date: date
    model_version: str
    country: str
    full: bool
    database: str  # user@host:port/db, never a password
    products: int  # in the snapshot
    score_reasons: dict[str, int]  # why each product is a candidate (new, champion_changed, ...)
    repaired: list[WriteBackResult] = []
    runtime: str = "onnx"
    write_id: str
    batch: Batch
    shards: list[ShardRef] = []
    query_s: float = 0.0


class CatalogueBatchResult(BatchResult):
    """A committed catalogue batch: the engine's result, reconciled against the catalogue, written back."""

    country: str
    database: str
    products: int
    skipped_products: int  # unchanged since their last score: nothing written for them
    needs_review: int = 0  # scored products for the review queue (low confidence or text_disagrees)
    reconciliation: Reconciliation
    write_back: WriteBackResult
    repaired: list[WriteBackResult] = []
    text: TextCheckSummary
    score_reasons: dict[str, int] = {}
    predictions_uri: str = ""


# ------------------------------------------------------------------------------------ plan


def committed_catalogue_batches(cat: LakeCatalog, batch_ids: list[str]) -> dict[str, datetime | None]:
    """Of ``batch_ids``, those the lake committed (a row in ``batches``), with their commit times."""
    out: dict[str, datetime | None] = {}
    for b in batch_ids:
        rows = scan(cat, BATCHES, {"batch_id": b}, columns=["committed_at"]).column(0).to_pylist()
        if rows:
            out[b] = max(rows)
    return out


def committed_predictions(cat: LakeCatalog, batch_id: str) -> list[PredictionRow]:
    """The committed champion predictions of a catalogue batch, as the write-back takes them."""
    cols = ["product_id", "pred_group_name", "confidence", "model_version", "batch_id", "scored_at"]
    cols += ["catalogue_image_id", "image_url", "image_sha256", "shadow"]
    rows = scan(cat, PREDICTIONS, {"batch_id": batch_id}, columns=cols).to_pylist()
    return [
        PredictionRow(
            product_id=r["product_id"],
            group=r["pred_group_name"],
            confidence=min(max(float(r["confidence"]), 0.0), 1.0),
            model_version=r["model_version"],
            batch_id=r["batch_id"],
            scored_at=r["scored_at"],
            image_id=r["catalogue_image_id"],
            image_url=r["image_url"],
            image_sha256=r["image_sha256"],
        )
        for r in rows
        if not r["shadow"] and r["product_id"] is not None
    ]


def repair_write_backs(conn: psycopg.Connection, cat: LakeCatalog) -> list[WriteBackResult]:
    """Write back every batch this catalogue registered and the lake committed, but whose write-back
    never happened (a crash between the commit and the upsert)."""
    pending = pending_batches(conn)
    if not pending:
        return []
    return repair(conn, committed_catalogue_batches(cat, pending), lambda b: committed_predictions(cat, b))


def free_batch_id(cat: LakeCatalog, batch_date: date, country: str) -> str:
    """``<date>-catalogue-<country>``, or ``…-2``, ``…-3`` once that is committed: every run of a day
    is a batch of its own (an incremental run holds only what changed, so it must never replace an
    earlier run's rows); a run that crashed before its commit is continued under its own id."""
    base = make_batch_id(batch_date, f"catalogue-{country}")
    taken = set(scan(cat, BATCHES, None, columns=["batch_id"]).column(0).to_pylist())
    n = 1
    while (bid := base if n == 1 else f"{base}-{n}") in taken:
        n += 1
    return bid


def _products_table(candidates: list[Candidate]) -> pa.Table:
    rows = []
    for c in candidates:
        r, p = c.row, c.previous
        rows.append(
            {
                "image_id": str(r.product_id),
                "product_id": r.product_id,
                "catalogue_image_id": r.image_id,
                "image_url": r.image_url,
                "image_problem": r.image_problem,
                "title": r.title,
                "description": r.description,
                "description_source": r.description_source,
                "score_reason": c.reason,
                "prev_model_version": p.model_version if p else None,
                "prev_image_id": p.image_id if p else None,
                "prev_image_url": p.image_url if p else None,
                "prev_image_sha256": p.image_sha256 if p else None,
                "prev_batch_id": p.batch_id if p else None,
                "prev_scored_at": p.scored_at if p else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=PRODUCTS_SCHEMA)


def _write_products(lake: Lake, key: str, table: pa.Table, shard_size: int) -> InputFile:
    """The products file as the batch's one input (row groups of one shard each)."""
    import hashlib

    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=max(1, shard_size), compression="zstd")
    data = buf.getvalue()
    lake.write_bytes(key, data)
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    return InputFile(
        name=key.rsplit("/", 1)[-1],
        uri=lake.uri(key),
        kind="parquet",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        rows=table.num_rows,
        row_groups=tuple(md.row_group(i).num_rows for i in range(md.num_row_groups)),
    )


def plan_catalogue_batch(
    cat: LakeCatalog,
    conn: psycopg.Connection,
    *,
    database: str,
    country: str = "us",
    full: bool = False,
    batch_date: date | None = None,
    model_version: str | None = None,
    shard_size: int = DEFAULT_CATALOGUE_SHARD_SIZE,
    allow_empty: bool = False,
    runtime: Runtime = "auto",
    threads: int | None = None,
    check_model: bool = True,
) -> CatalogueBatchPlan:
    """Stage 1 (see the module): repair, snapshot, select, write the products file, cut shards.

    Raises CatalogueError in one line for a catalogue it cannot use (a missing table or column, 0
    products without ``allow_empty``), before anything is written to the catalogue or the lake.
    """
    lake = cat.lake
    code = normalize_country(country)
    check_schema(conn)
    version = model_version or resolve_model_version(lake)  # no champion: one line, nothing written
    chosen = check_tables_and_model(cat, runtime, version, threads=threads, check_model=check_model)
    t0 = time.perf_counter()
    with catalogue_snapshot(conn) as snap:
        rows: list[ProductRow] = list(snap.rows(code))
        previous = read_previous(snap)
    query_s = time.perf_counter() - t0
    if not rows and not allow_empty:
        raise CatalogueError(
            f"catalogue {database} has 0 products: an empty batch, nothing scored "
            "(--allow-empty commits it as an empty batch)"
        )
    repaired = repair_write_backs(conn, cat)
    candidates, skipped = select_for_scoring(rows, previous, version, full)
    assert not skipped  # verify_content: every product is fetched, its digest decides
    bdate = batch_date or datetime.now(UTC).date()
    batch_id = free_batch_id(cat, bdate, code)
    write_id = new_run_id()
    inputs = []
    if candidates:
        key = f"{PRODUCTS_PREFIX}/batch_id={batch_id}/products-{write_id}.parquet"
        inputs.append(_write_products(lake, key, _products_table(candidates), shard_size))
    batch = Batch(
        batch_id=batch_id,
        batch_date=bdate,
        source=f"catalogue-{code}",
        location=f"catalogue {database} (country {code})",
        location_uri=inputs[0].uri if inputs else f"catalogue:{database}",
        inputs=inputs,
    )
    shards = [
        s.model_copy(update={"kind": "catalogue", "target": shard_target(cat, s, version, write_id)})
        for s in plan_shards(batch, shard_size, embedding_sample=0)
    ]
    reasons: dict[str, int] = {}
    for c in candidates:
        reasons[c.reason] = reasons.get(c.reason, 0) + 1
    log.info(
        "catalogue batch %s: %d products (%s), %d shards, model %s; snapshot read in %.2fs",
        batch_id, len(rows), ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none",
        len(shards), version, query_s,
    )  # fmt: skip
    return CatalogueBatchPlan(
        batch_id=batch_id,
        batch_date=bdate,
        model_version=version,
        country=code,
        full=full,
        database=database,
        products=len(rows),
        score_reasons=dict(sorted(reasons.items())),
        repaired=repaired,
        runtime=chosen,
        write_id=write_id,
        batch=batch,
        shards=shards,
        query_s=query_s,
    )


# ------------------------------------------------------------------------------------ one shard


def _candidate(r: dict[str, Any]) -> Candidate:
    row = ProductRow(
        product_id=r["product_id"],
        title=r["title"],
        image_id=r["catalogue_image_id"],
        image_url=r["image_url"],
        image_problem=r["image_problem"],
        description=r["description"],
        description_source=r["description_source"],
    )
    prev = None
    if r["prev_model_version"] is not None:
        prev = PreviousScore(
            product_id=r["product_id"],
            model_version=r["prev_model_version"],
            image_id=r["prev_image_id"],
            image_url=r["prev_image_url"],
            image_sha256=r["prev_image_sha256"],
            batch_id=r["prev_batch_id"],
            scored_at=r["prev_scored_at"],
        )
    return Candidate(row, r["score_reason"], prev)


def _read_products(lake: Lake, ref: ShardRef) -> list[dict[str, Any]]:
    """The shard's rows of the products file (the plan wrote it; a changed file is a bug)."""
    assert ref.uri is not None
    fs, path = open_input(ref.uri, lake)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    rows = table.slice(ref.row_start, ref.records).to_pylist()
    if len(rows) != ref.records:
        raise ScoringError(f"catalogue shard {ref.batch_id}/{ref.shard_id}: products file has fewer rows")
    return rows


def _detail(f: FetchedImage, pid: int) -> str:
    if f.detail and f.detail != f.problem:
        return f.detail
    return f"product {pid}: {f.problem}"


def read_catalogue_shard(
    lake: Lake, ref: ShardRef, cfg: ImagePrepConfig, keep_rejected_bytes: int, *, fetcher: ImageFetcher
) -> ShardInput:
    """A catalogue shard's inputs for the engine: its products' primary images fetched and decoded,
    the unchanged ones left out, every problem a quarantine record (its reason code, the URL as the
    source, size and sha256; the first bytes only of a payload that claims to be an image)."""
    t0 = time.perf_counter()
    products = _read_products(lake, ref)
    candidates = [_candidate(r) for r in products]
    fetched = fetcher.fetch_all([c.row for c in candidates])
    fetch_s = time.perf_counter() - t0
    to_score, unchanged = drop_unchanged(candidates, fetched)
    index = {r["product_id"]: i for i, r in enumerate(products)}
    out = ShardInput(len(to_score))
    rows = [products[index[f.product_id]] for f in to_score]
    for i, f in enumerate(to_score):
        pid = f.product_id
        source = redact_url(f.url) if f.url else f"catalogue product {pid}"
        row_no = ref.row_start + index[pid]
        if not f.ok:
            evidence = Evidence(f.size, f.sha256)
            out.reject(i, str(pid), source, row_no, str(f.problem), _detail(f, pid), evidence)
            continue
        assert f.data is not None
        try:
            out.images[i] = decode_image(f.data, cfg, name=source)
        except ImageRejected as e:
            evidence = Evidence.of(f.data, keep_rejected_bytes)
            out.reject(i, str(pid), source, row_no, e.reason, e.detail, evidence)
    out.ids = pa.array([str(f.product_id) for f in to_score], pa.string())
    out.rows = np.array([ref.row_start + index[f.product_id] for f in to_score], dtype=np.int64)
    out.unchanged_ids = [str(s.product_id) for s in unchanged]
    out.timings = {"fetch": fetch_s}
    out.annotate = functools.partial(annotate_products, products=rows, fetched=to_score)
    return out


def annotate_products(
    table: pa.Table, ok_idx: np.ndarray, *, products: list[dict[str, Any]], fetched: list[FetchedImage]
) -> pa.Table:
    """The scored products' prediction rows with their product columns and review reason: the text
    check's ``text_disagrees`` (and needs_review) where the description names another group's
    article, else ``low_confidence`` where the confidence is below the threshold."""
    picked = [products[i] for i in ok_idx.tolist()]
    digests = [fetched[i].sha256 for i in ok_idx.tolist()]
    groups = table.column("pred_group_name").to_pylist()
    needs = table.column("needs_review").to_pylist()
    reasons: list[str | None] = []
    for p, g, n in zip(picked, groups, needs, strict=True):
        reasons.append(review_reason(p["description"], g) or (LOW_CONFIDENCE if n else None))
    values = {
        "product_id": [p["product_id"] for p in picked],
        "catalogue_image_id": [p["catalogue_image_id"] for p in picked],
        "image_url": [p["image_url"] for p in picked],
        "image_sha256": digests,
        "title": [p["title"] for p in picked],
        "description": [p["description"] for p in picked],
        "review_reason": reasons,
        "needs_review": [n or r == TEXT_DISAGREES for n, r in zip(needs, reasons, strict=True)],
    }
    schema = TABLES[PREDICTIONS].schema
    for name, vals in values.items():
        i = schema.get_field_index(name)
        table = table.set_column(i, schema.field(i), pa.array(vals, schema.field(i).type))
    return table


def score_catalogue_shard(
    lake: Lake,
    shard: ShardRef,
    predictor: Predictor,
    model_version: str,
    fetcher: ImageFetcher,
    options: ScoringOptions | None = None,
) -> ShardResult:
    """One catalogue shard, exactly once, through the engine's :func:`score_shard`."""
    read = functools.partial(read_catalogue_shard, fetcher=fetcher)
    return score_shard(lake, shard, predictor, model_version, options, read=read)


def run_catalogue_shard(
    shard: ShardRef,
    model_version: str,
    *,
    settings: Any,
    options: ScoringOptions | None = None,
    runtime: Runtime = "onnx",
    threads: int | None = None,
) -> ShardResult:
    """One catalogue shard in this process (the body of the ``score-catalogue-shard`` task): the lake
    and the checked predictor are built once per process, the fetcher from the settings."""
    lake = _lake_for(settings)
    threads = threads or getattr(settings, "torch_threads", None)
    predictor = load_champion_predictor(lake, runtime, model_version=model_version, threads=threads)
    fetcher = ImageFetcher.from_settings(settings, lake, (options or ScoringOptions()).image_prep)
    return score_catalogue_shard(lake, shard, predictor, model_version, fetcher, options)


# ------------------------------------------------------------------------------------ commit


def _file_ids(lake: Lake, markers: list[dict[str, Any]], table: str) -> list[int]:
    ids: list[int] = []
    for m in markers:
        for key, entry in m["files"].items():
            if entry.get("table") == table:
                col = pq.read_table(io.BytesIO(lake.read_bytes(key)), columns=["image_id"]).column(0)
                ids += [int(x) for x in col.to_pylist()]
    return ids


def reconcile_catalogue_batch(cat: LakeCatalog, plan: CatalogueBatchPlan) -> Reconciliation:
    """Every product of the snapshot is exactly one of scored, quarantined or skipped, by id, from the
    shards' files and markers (before anything is committed); a CatalogueError naming ids if not."""
    lake = cat.lake
    markers = read_shard_markers(lake, plan.shards, plan.model_version)
    missing = [s.shard_id for s, m in zip(plan.shards, markers, strict=True) if m is None]
    if missing:
        raise ScoringError(
            f"catalogue batch {plan.batch_id}: shards {missing[:10]} not committed; run it again to finish them"
        )
    done = [m for m in markers if m is not None]
    products: list[int] = []
    for f in plan.batch.inputs:
        fs, path = open_input(f.uri, lake)
        with fs.open_input_file(path) as fh:
            products += pq.read_table(fh, columns=["product_id"]).column(0).to_pylist()
    skipped = [int(x) for m in done for x in m.get("unchanged_ids", [])]
    rec = reconcile(products, _file_ids(lake, done, PREDICTIONS), _file_ids(lake, done, QUARANTINE), skipped)
    if rec.products != plan.products:
        raise CatalogueError(
            f"reconciliation: the products file holds {rec.products} products, the snapshot {plan.products}"
        )
    return rec


def commit_catalogue_batch(
    cat: LakeCatalog,
    conn: psycopg.Connection,
    plan: CatalogueBatchPlan,
    options: ScoringOptions | None = None,
    results: list[ShardResult] | None = None,
) -> CatalogueBatchResult:
    """Stage 3 (see the module): reconcile, register the batch, commit it to the lake, write it back."""
    rec = reconcile_catalogue_batch(cat, plan)
    register_batch(conn, plan.batch_id)  # BEFORE the lake commit: a crash after it is repaired
    result = finalize_batch(
        cat, plan.batch, plan.shards, plan.model_version, options=options, results=results
    )
    rows = committed_predictions(cat, plan.batch_id)
    if len(rows) != rec.scored:
        raise ScoringError(
            f"catalogue batch {plan.batch_id}: {len(rows)} committed predictions, {rec.scored} scored"
        )
    wb = write_back(conn, plan.batch_id, rows, committed_at=datetime.now(UTC))
    texts = scan(
        cat,
        PREDICTIONS,
        {"batch_id": plan.batch_id},
        columns=["description", "pred_group_name", "needs_review"],
    ).to_pylist()
    text = summarize_text_checks((r["description"], r["pred_group_name"]) for r in texts)
    log.info("catalogue batch %s: %s", plan.batch_id, text.line())
    return CatalogueBatchResult(
        **result.model_dump(),
        country=plan.country,
        database=plan.database,
        products=rec.products,
        skipped_products=rec.skipped,
        needs_review=sum(bool(r["needs_review"]) for r in texts),
        reconciliation=rec,
        write_back=wb,
        repaired=plan.repaired,
        text=text,
        score_reasons=plan.score_reasons,
    )
