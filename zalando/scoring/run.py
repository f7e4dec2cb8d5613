"""Drivers: plan a batch, score its shards, commit it; backfill a run of batches.

* :func:`prepare_batch` -> :class:`BatchPlan`: pin the model version, skip a committed batch,
  check the model once (measuring which runtime the shards use), describe and shard the batch.
* :func:`run_shard`: one shard in this process, with the lake and the checked predictor built once
  per process: the body of the Prefect ``score-shard`` task and of a Dask ``client.map`` function.
* :func:`score_batch`: plan, every shard (here, or through ``map_shards``), then
  :func:`zalando.scoring.commit.finalize_batch`, in one call.
* :func:`backfill`: one batch per location or per day, skipping committed ones and empty days;
  each is scored by :func:`score_batch` or by the caller's ``score_one`` (the CLI runs the flow).

The drivers take the lake's catalog (:class:`~zalando.lake.catalog.LakeCatalog`: the tables, and
``cat.lake`` for plain objects); a shard needs only the lake (its files' names are in its target).

The flow ``flows/batch_scoring.py`` runs the same three stages as Prefect tasks
(``tasks/scoring.py``): ``plan_batch`` calls :func:`prepare_batch`, the ``score-shards`` subflow
maps ``score_shard`` (:func:`run_shard`) over ``plan.shards``, and ``commit_batch`` calls
:func:`~zalando.scoring.commit.finalize_batch`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from zalando.errors import LakeError, ZalandoError
from zalando.lake import Lake, new_run_id
from zalando.lake.catalog import LakeCatalog
from zalando.lake.commit import data_file_key
from zalando.lake.keys import embeddings_key
from zalando.lake.tables import (
    PREDICTIONS,
    PRODUCT_COLUMNS,
    QUARANTINE,
    TABLES,
    check_schema,
    ensure_table,
    evolve_schema,
    prediction_partition,
    quarantine_partition,
)
from zalando.runtime import Predictor, Runtime
from zalando.scoring.batch import (
    Batch,
    ScoringInputError,
    ShardRef,
    ShardTarget,
    _as_date,
    default_source_slug,
    describe_batch,
    has_inputs,
    make_batch_id,
    plan_shards,
    resolve_location,
    slugify,
)
from zalando.scoring.champion import load_champion_predictor, resolve_model_version
from zalando.scoring.commit import BatchResult, batch_summary, finalize_batch, is_batch_committed, reset_batch
from zalando.scoring.shadow import ShadowResult, score_shadow
from zalando.scoring.shard import ScoringOptions, ShardResult, score_shard, table_iceberg_schema

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10_000
INBOX_TEMPLATE = "inbox/batch_date={date}"


class BatchPlan(BaseModel):
    """A batch ready to score: its shards and the pinned model version (or: already committed)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    batch_id: str
    batch_date: date
    model_version: str
    committed: bool  # already committed and not forced: nothing to do
    runtime: str = "onnx"  # the runtime measured fastest for this model (pass it to run_shard)
    write_id: str | None = None  # names this plan's shard files (a re-plan gets new names)
    batch: Batch | None = None
    shards: list[ShardRef] = []


def prepare_batch(
    cat: LakeCatalog,
    location: str,
    *,
    model_version: str | None = None,
    batch_date: date | str | None = None,
    source: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    embedding_sample: int = 2048,
    hash_inputs: bool = True,
    runtime: Runtime = "auto",
    threads: int | None = None,
    check_model: bool = True,
    allow_empty: bool = False,
) -> BatchPlan:
    """Pin the model version, skip a committed batch (unless ``force``), describe and shard the rest.

    The location's boundary is checked first (:func:`~zalando.scoring.locations.resolve_location`):
    a location outside it fails before the model or any input is read. With ``check_model`` the
    model is loaded and fully checked here, once, before any shard runs (a bad champion fails the
    batch at planning), and ``runtime="auto"`` is measured into the concrete runtime the workers
    should use (``plan.runtime``). The tables the shards write are checked here too: a schema
    someone else changed fails the batch before any image is scored. Every shard gets its
    :class:`ShardTarget`: file names of this plan's own ``write_id``. A batch without input files
    is an error unless ``allow_empty``.

    The inputs are described (listed, footers read, hashed) on a second thread while the tables and
    the model are checked (in a fresh process the model's load and checks take seconds); a bad table
    or model still fails the plan before a bad input is reported. A committed batch is skipped before
    its inputs are read.
    """
    lake = cat.lake
    resolve_location(lake, location)
    bdate = _as_date(batch_date)
    slug = slugify(source) if source else default_source_slug(location)
    batch_id = make_batch_id(bdate, slug)
    version = model_version or resolve_model_version(lake)
    if is_batch_committed(cat, batch_id, version) and not force:
        log.info(
            "batch %s (model %s) is already committed: skipped (force=True re-scores it)", batch_id, version
        )
        return BatchPlan(batch_id=batch_id, batch_date=bdate, model_version=version, committed=True)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="describe-batch") as pool:
        described = pool.submit(
            describe_batch, lake, location, batch_date=bdate, source=slug, hash_inputs=hash_inputs,
            allow_empty=allow_empty, catalog=cat,
        )  # fmt: skip
        chosen = check_tables_and_model(cat, runtime, version, threads=threads, check_model=check_model)
        batch = described.result()
    if force:
        reset_batch(lake, batch, version)
    write_id = new_run_id()
    shards = [
        s.model_copy(update={"target": shard_target(cat, s, version, write_id)})
        for s in plan_shards(batch, shard_size, embedding_sample=embedding_sample)
    ]
    return BatchPlan(
        batch_id=batch_id,
        batch_date=bdate,
        model_version=version,
        committed=False,
        runtime=chosen,
        write_id=write_id,
        batch=batch,
        shards=shards,
    )


def shard_target(cat: LakeCatalog, shard: ShardRef, model_version: str, write_id: str) -> ShardTarget:
    """Where a shard of this plan writes: data files under the tables' ``data/`` folders, named by
    (batch date, model, batch, write id, shard), and its embedding sample."""
    d, b, sid = shard.batch_date, shard.batch_id, shard.shard_id
    return ShardTarget(
        write_id=write_id,
        predictions=data_file_key(
            cat, PREDICTIONS, run_id=write_id, shard_id=sid,
            partition=prediction_partition(d, model_version, b),
        ),
        quarantine=data_file_key(
            cat, QUARANTINE, run_id=write_id, shard_id=sid,
            partition=quarantine_partition(b, model_version),
        ),
        embeddings=embeddings_key(d, model_version, b, write_id, sid),
    )  # fmt: skip


def check_tables_and_model(
    cat: LakeCatalog, runtime: Runtime, version: str, *, threads: int | None, check_model: bool
) -> str:
    """The tables the shards write (:func:`check_scoring_tables`), then, with ``check_model``, the model
    loaded and fully checked once; returns the concrete runtime the shards use (``auto`` measured)."""
    check_scoring_tables(cat)
    if not check_model:
        return runtime if runtime != "auto" else "onnx"
    return load_champion_predictor(
        cat.lake, runtime, model_version=version, threads=threads, verify="full"
    ).runtime


def check_scoring_tables(cat: LakeCatalog) -> None:
    """The live predictions and quarantine tables (created when missing) live in this lake and have
    exactly the schema shards write: a LakeError naming the columns when someone else changed one."""
    for name in (PREDICTIONS, QUARANTINE):
        table = ensure_table(cat, name)
        where = f"scoring into {cat.identifier(name)}"
        if cat.key_of(table.location()) is None:  # a catalog shared by two lakes would mix their rows
            raise LakeError(
                f"{where}: the table lives at {table.location()}, outside the lake {cat.lake.uri_root}: "
                f"{cat.describe} belongs to another lake (give each lake its own ZALANDO_WORK_DIR or "
                "ZALANDO_ICEBERG_CATALOG_URI)"
            )
        live = table.schema()
        if name == PREDICTIONS and _lacks_product_columns(live):
            live = evolve_schema(cat, name, add=PRODUCT_COLUMNS)  # a table made before the catalogue
            log.warning(
                "%s: added the catalogue's nullable product columns (file batches leave them null)", where
            )
        if live == table_iceberg_schema(name):
            continue
        check_schema(live, TABLES[name].schema, where=where)  # names the missing/extra/mistyped columns
        raise LakeError(
            f"{where}: the table's column ids differ from the schema scoring writes "
            f"({', '.join(f'{f.name}={f.field_id}' for f in live.fields)}); evolve it with evolve_schema"
        )


def _lacks_product_columns(live: Any) -> bool:
    """The live predictions schema is exactly the spec's without the trailing PRODUCT_COLUMNS."""
    names = [f.name for f in live.fields]
    spec = TABLES[PREDICTIONS].schema.names
    return names == spec[: len(spec) - len(PRODUCT_COLUMNS)]


# ------------------------------------------------------------------------------------ per process

_LAKES: dict[str, Lake] = {}
_LAKES_LOCK = threading.Lock()


def _lake_for(settings: Any) -> Lake:
    key = settings.model_dump_json()
    with _LAKES_LOCK:
        lake = _LAKES.get(key)
        if lake is None:
            lake = _LAKES[key] = Lake.from_settings(settings)
    return lake


def run_shard(
    shard: ShardRef,
    model_version: str,
    *,
    options: ScoringOptions | None = None,
    settings: Any = None,
    lake: Lake | None = None,
    runtime: Runtime = "onnx",
    threads: int | None = None,
) -> ShardResult:
    """Score one shard in this process: the lake and the checked predictor are built once per process.

    This is the whole body of a Prefect ``score_shard`` task or a Dask ``client.map`` function.
    ``settings`` default: :func:`zalando.settings.load_settings` (the environment). ``runtime``:
    pass ``plan.runtime``; with ``onnx`` or ``onnx-int8`` the worker never imports torch (light checks:
    checksums, metadata, statistics, graphs; the full ONNX-vs-weights check ran once in
    :func:`prepare_batch`).
    """
    if lake is None:
        if settings is None:
            from zalando.settings import load_settings

            settings = load_settings()
        lake = _lake_for(settings)
        if threads is None and getattr(settings, "torch_threads", None):
            threads = settings.torch_threads
    predictor = load_champion_predictor(lake, runtime, model_version=model_version, threads=threads)
    return score_shard(lake, shard, predictor, model_version, options)


# ------------------------------------------------------------------------------------ whole batches

MapShards = Callable[[BatchPlan], Iterable[ShardResult]]


def score_batch(
    cat: LakeCatalog,
    location: str,
    *,
    model_version: str | None = None,
    batch_date: date | str | None = None,
    source: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    options: ScoringOptions | None = None,
    force: bool = False,
    runtime: Runtime = "auto",
    threads: int | None = None,
    map_shards: MapShards | None = None,
    progress: Callable[[ShardResult], None] | None = None,
    predictor: Predictor | None = None,
    on_plan: Callable[[BatchPlan], None] | None = None,
    allow_empty: bool = False,
    shadow: bool = False,
) -> BatchResult:
    """Score a batch end to end with the champion (or ``model_version``); skip it when committed.

    Shards run one after the other in this process unless ``map_shards`` is given: a function of
    the :class:`BatchPlan` returning the shard results, e.g. a Dask ``client.map(run_shard,
    plan.shards, model_version=plan.model_version, runtime=plan.runtime)``; ``progress`` is called
    after every shard.
    ``on_plan`` sees the plan first (its ``batch.records``: the total for a progress bar's ETA).
    ``predictor`` (with ``model_version``) replaces the registry's champion, e.g. in tests.
    A batch without input files is an error unless ``allow_empty`` (then an empty batch is committed).
    ``shadow``: then also score it with the challenger (:func:`zalando.scoring.shadow.score_shadow`,
    after the batch's commit, which never depends on it); its result is ``result.shadow``.
    """
    if predictor is not None and model_version is None:
        raise ScoringInputError("score_batch: a predictor needs its model_version")
    t0 = time.perf_counter()
    opts = options or ScoringOptions()
    plan = prepare_batch(
        cat,
        location,
        model_version=model_version,
        batch_date=batch_date,
        source=source,
        shard_size=shard_size,
        force=force,
        runtime=runtime,
        threads=threads,
        check_model=predictor is None,
        allow_empty=allow_empty,
    )
    if plan.committed:
        result = batch_summary(cat, plan.batch_id, plan.model_version)
    else:
        assert plan.batch is not None
        if on_plan:
            on_plan(plan)
        t_plan = time.perf_counter()
        results = _score_shards(cat.lake, plan, opts, predictor, threads, map_shards, progress)
        t_shards = time.perf_counter()
        result = finalize_batch(
            cat, plan.batch, plan.shards, plan.model_version, options=opts, results=results
        )
        result = timed_batch(result, results, started=t0, planned=t_plan, scored=t_shards)
    if shadow:
        result.shadow = shadow_plan(
            cat, plan, location, options=opts, shard_size=shard_size, runtime=runtime, threads=threads,
            force=force,
        )  # fmt: skip
    return result


def shadow_plan(
    cat: LakeCatalog,
    plan: BatchPlan,
    location: str | None,
    *,
    options: ScoringOptions,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runtime: Runtime = "auto",
    threads: int | None = None,
    force: bool = False,
) -> ShadowResult:
    """Shadow-score a planned (and by now committed) batch with the challenger; never raises.

    ``runtime``: ``auto`` measures the challenger's fastest runtime, as planning did the champion's."""
    return score_shadow(
        cat,
        batch_id=plan.batch_id,
        batch_date=plan.batch_date,
        champion_version=plan.model_version,
        shards=plan.shards,
        location=location,
        champion_committed_before=plan.committed,
        options=options,
        shard_size=shard_size,
        runtime=runtime,
        threads=threads,
        force=force,
    )


R = TypeVar("R", bound=BatchResult)


def timed_batch(
    result: R, results: Sequence[ShardResult], *, started: float, planned: float, scored: float
) -> R:
    """``result`` with the batch's own time: ``seconds`` from planning to commit (wall clock,
    ``time.perf_counter`` values), ``images_per_s`` over it, and ``timings``: plan, shards, finalize
    (the commit's own ``seconds``) and the shards' read/predict/write sums."""
    now = time.perf_counter()
    result.timings = {
        "plan": round(planned - started, 4),
        "shards": round(scored - planned, 4),
        "finalize": round(result.seconds, 4),
    }
    for key in ("read_decode", "predict", "write"):
        result.timings[f"shard_{key}"] = round(sum(r.timings.get(key, 0.0) for r in results), 4)
    result.seconds = now - started
    result.images_per_s = result.records / result.seconds if result.seconds > 0 else 0.0
    return result


def _score_shards(
    lake: Lake,
    plan: BatchPlan,
    opts: ScoringOptions,
    predictor: Predictor | None,
    threads: int | None,
    map_shards: MapShards | None,
    progress: Callable[[ShardResult], None] | None,
) -> list[ShardResult]:
    """Every shard's result: one after the other in this process, or from ``map_shards``."""
    if map_shards is not None:
        shard_results: Iterable[ShardResult] = map_shards(plan)
    else:
        if predictor is None:
            # checked and cached by prepare_batch; plan.runtime is the measured choice
            predictor = load_champion_predictor(
                lake, plan.runtime, model_version=plan.model_version, threads=threads
            )
        shard_results = (score_shard(lake, s, predictor, plan.model_version, opts) for s in plan.shards)
    results: list[ShardResult] = []
    for r in shard_results:
        results.append(r)
        if progress:
            progress(r)
    return results


# ------------------------------------------------------------------------------------ backfill


class BackfillEntry(BaseModel):
    """What a backfill did with one location (or day)."""

    location: str
    batch_date: date | None = None
    status: Literal["scored", "skipped", "no_input", "failed"]
    result: BatchResult | None = None
    error: str | None = None


class ScoreOne(Protocol):
    """Scores one batch of a backfill (default: :func:`score_batch` in this process)."""

    def __call__(
        self, location: str, *, batch_date: date | None, source: str | None, model_version: str
    ) -> BatchResult: ...


def date_range(date_from: date | str, date_to: date | str) -> list[date]:
    start, end = _as_date(date_from), _as_date(date_to)
    if end < start:
        raise ScoringInputError(f"backfill: --to {end} is before --from {start}")
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def backfill(
    cat: LakeCatalog,
    batches: Sequence[str] | None = None,
    *,
    date_from: date | str | None = None,
    date_to: date | str | None = None,
    location_template: str = INBOX_TEMPLATE,
    source: str | None = "inbox",
    stop_on_error: bool = False,
    score_one: ScoreOne | None = None,
    on_entry: Callable[[BackfillEntry], None] | None = None,
    **score_kwargs: Any,
) -> list[BackfillEntry]:
    """Score each batch in turn (a list of locations, or one per day from a date range), skipping committed ones.

    A date's batch lives at ``location_template.format(date=YYYY-MM-DD)`` (default
    ``inbox/batch_date=YYYY-MM-DD``); days with no input files are reported as ``no_input``.
    The model version is pinned once for the whole backfill (the champion at its start).
    ``score_one`` scores one batch (default: :func:`score_batch` with ``score_kwargs``);
    ``on_entry`` sees each entry as soon as it is known. A failed batch is reported as ``failed``
    and the backfill goes on, unless ``stop_on_error``: then its error is raised.
    """
    if batches is None and (date_from is None or date_to is None):
        raise ScoringInputError("backfill needs a list of batches or both a start and an end date")
    lake = cat.lake
    version = score_kwargs.pop("model_version", None) or resolve_model_version(lake)
    todo: list[tuple[str, date | None, str | None]] = []
    if batches is not None:
        todo += [(loc, score_kwargs.get("batch_date"), None) for loc in batches]
    else:
        todo += [
            (location_template.format(date=d.isoformat()), d, source) for d in date_range(date_from, date_to)
        ]  # type: ignore[arg-type]
    score_kwargs.pop("batch_date", None)
    if score_one is None:
        score_one = functools.partial(score_batch, cat, **score_kwargs)
    elif score_kwargs:
        raise ScoringInputError(f"backfill: {sorted(score_kwargs)} go to score_batch, not with score_one")
    out: list[BackfillEntry] = []
    for loc, d, src in todo:
        try:
            if d is not None and not has_inputs(lake, loc):
                entry = BackfillEntry(location=loc, batch_date=d, status="no_input")
            else:
                r = score_one(loc, batch_date=d, source=src, model_version=version)
                entry = BackfillEntry(
                    location=loc,
                    batch_date=r.batch_date,
                    status="skipped" if r.skipped else "scored",
                    result=r,
                )
        except ZalandoError as e:
            if stop_on_error:
                raise
            log.error("backfill: batch %s failed: %s", loc, e)
            entry = BackfillEntry(location=loc, batch_date=d, status="failed", error=str(e))
        out.append(entry)
        if on_entry:
            on_entry(entry)
    return out
