"""Shadow scoring (issue 15): score a batch again with a challenger, beside the champion.

The challenger (:func:`find_challenger`) is the newest registered model version (by its registry
record's ``registered_at``) that is neither the champion nor the version that scored the batch:
tonight's model the gates rejected (a ``reject`` row in ``registry_decisions``), or one registered
and not decided on yet (no row). Its rows go to the Iceberg table ``shadow_predictions``: the
predictions schema plus ``champion_model_version``, partitioned the same way, ``shadow`` true, the
challenger's version in ``model_version``. They never go to ``predictions``, so no reader of a
batch's predictions (ours, DuckDB, Spark) can count them.

Exactly once, like the batch itself: one data file per shard under this shadow run's own write id,
one commit per batch that replaces the batch's earlier shadow rows of that challenger, then the
batch's rows in ``shadow_agreement`` (:func:`agreement_table`), written last: what "already
shadowed" reads.

The champion's commit never depends on this: :func:`score_shadow` runs after it, and a challenger
that cannot be loaded or scored gives a ``failed`` result and one warning line, never an error.
:func:`shadow_evidence` adds a challenger's agreement up over batches, with its accuracy on the
reviewed items (its shadow rows joined with the reviewers' labels), for the promotion gates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from zalando.errors import DataError
from zalando.labels import GROUP_NAMES, NUM_GROUPS, group_index
from zalando.lake import new_run_id
from zalando.lake.catalog import LakeCatalog
from zalando.lake.commit import add_data_files, data_file_key, replace_partition, scan, write_data_file
from zalando.lake.tables import (
    PREDICTIONS,
    SHADOW_AGREEMENT,
    SHADOW_PREDICTIONS,
    TABLES,
    ensure_table,
    prediction_partition,
    shadow_agreement_rows,
)
from zalando.scoring.batch import Batch, ShardRef, describe_batch, plan_shards
from zalando.scoring.champion import load_champion_predictor
from zalando.scoring.inputs import read_shard
from zalando.scoring.shard import (
    ScoringOptions,
    predict_in_sub_batches,
    prediction_table,
    table_iceberg_schema,
)

if TYPE_CHECKING:
    from zalando.feedback import Decision
    from zalando.lake import Lake
    from zalando.runtime import Predictor, Runtime

log = logging.getLogger(__name__)

OVERALL = "overall"  # group_name of the overall row of shadow_agreement
SHADOW_SNAPSHOT_PREFIX = "zalando.shadow."

ShadowStatus = Literal["scored", "skipped", "no_challenger", "failed"]


class AgreementRow(BaseModel):
    """One row of ``shadow_agreement``: a group (or ``overall``)."""

    group_name: str
    n_champion: int  # images the champion put in the group (overall: images both scored)
    n_challenger: int  # images the challenger put in the group
    n_agree: int  # images both put in the group (overall: images both put in the same group)
    agreement_rate: float | None  # n_agree / n_champion; None when the champion put none there


class ShadowResult(BaseModel):
    """What shadow scoring did with one batch."""

    batch_id: str
    champion_version: str
    challenger_version: str | None = None
    challenger_decision: str | None = None  # its last action in registry_decisions; None: not decided
    status: ShadowStatus
    scored: int = 0
    data_files: int = 0
    snapshot_id: int | None = None
    agreement: float | None = None  # the overall rate
    groups: list[AgreementRow] = []
    error: str | None = None  # why it failed (status failed)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- challenger


def find_challenger(lake: Lake, exclude: Iterable[str] = ()) -> str | None:
    """The newest registered version (registry record's ``registered_at``, then its name) that is not
    the champion nor in ``exclude``; None when there is none."""
    from zalando.registry import get_champion, get_model, registered_versions

    champion = get_champion(lake)
    skip = set(exclude) | ({champion["model_version"]} if champion else set())
    records = [get_model(lake, v) for v in registered_versions(lake) if v not in skip]
    if not records:
        return None
    newest = max(records, key=lambda r: (str(r.get("registered_at") or ""), str(r["model_version"])))
    return str(newest["model_version"])


def last_decision(lake: Lake, model_version: str) -> str | None:
    """The action of the newest logged decision about ``model_version`` ('reject', ...), or None."""
    from zalando.registry import decision_log

    log_df = decision_log(lake)
    rows = log_df[log_df["model_version"] == model_version]
    return None if rows.empty else str(rows["action"].iloc[-1])


# ---------------------------------------------------------------------------------------------- agreement


def agreement_rows(champion_groups: np.ndarray, challenger_groups: np.ndarray) -> list[AgreementRow]:
    """Per group and overall, of the same images in the same order: how many each model put in the
    group, how many both did, and n_agree / n_champion (pure)."""
    a = np.asarray(champion_groups, dtype=np.int64)
    b = np.asarray(challenger_groups, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise DataError(f"agreement: expected two equal 1-d arrays of groups, got {a.shape} and {b.shape}")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= NUM_GROUPS):
        raise DataError(f"agreement: group ids must lie in 0..{NUM_GROUPS - 1}")
    same = a == b
    n_champ = np.bincount(a, minlength=NUM_GROUPS)
    n_chall = np.bincount(b, minlength=NUM_GROUPS)
    n_agree = np.bincount(a[same], minlength=NUM_GROUPS)
    rows = [
        AgreementRow(
            group_name=GROUP_NAMES[g],
            n_champion=int(n_champ[g]),
            n_challenger=int(n_chall[g]),
            n_agree=int(n_agree[g]),
            agreement_rate=float(n_agree[g] / n_champ[g]) if n_champ[g] else None,
        )
        for g in range(NUM_GROUPS)
    ]
    n = len(a)
    rows.append(
        AgreementRow(
            group_name=OVERALL,
            n_champion=n,
            n_challenger=n,
            n_agree=int(same.sum()),
            agreement_rate=float(same.mean()) if n else None,
        )
    )
    return rows


def join_groups(champion: pa.Table, challenger: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The two models' ``pred_group`` of the images both scored (joined on ``image_id``)."""
    for who, t in (("champion", champion), ("challenger", challenger)):
        ids = t.column("image_id")
        if len(ids) != len(set(ids.to_pylist())):
            raise DataError(f"agreement: the {who}'s rows hold an image id twice")
    right = challenger.select(["image_id", "pred_group"]).rename_columns(["image_id", "challenger_group"])
    joined = champion.select(["image_id", "pred_group"]).join(right, "image_id", join_type="inner")
    return (
        joined.column("pred_group").to_numpy().astype(np.int64),
        joined.column("challenger_group").to_numpy().astype(np.int64),
    )


def agreement_table(
    rows: Sequence[AgreementRow],
    *,
    batch_id: str,
    batch_date: date,
    champion_version: str,
    challenger_version: str,
    computed_at: datetime | None = None,
) -> pa.Table:
    """The batch's rows of ``shadow_agreement`` (the overall row has a null group)."""
    at = computed_at or datetime.now(UTC)
    records = [
        {
            "batch_id": batch_id,
            "batch_date": batch_date,
            "champion_version": champion_version,
            "challenger_version": challenger_version,
            "group": None if r.group_name == OVERALL else group_index(r.group_name),
            **r.model_dump(),
            "computed_at": at,
        }
        for r in rows
    ]
    return pa.Table.from_pylist(records, schema=TABLES[SHADOW_AGREEMENT].schema)


def agreement_markdown(result: ShadowResult) -> str:
    """The shadow result as Markdown, for a Prefect artifact."""
    head = (
        f"# Shadow scoring of batch {result.batch_id}\n\n"
        f"Champion `{result.champion_version}`, challenger `{result.challenger_version or '—'}`"
        f" ({result.challenger_decision or 'no decision yet'}): **{result.status}**"
    )
    if result.status == "no_challenger":
        return head + "\n\nNo registered model besides the champion: nothing to shadow.\n"
    if result.status == "failed":
        return head + f"\n\nThe batch's predictions are committed; the shadow failed: {result.error}\n"
    lines = [
        head,
        "",
        "| group | champion | challenger | both | agreement |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result.groups:
        rate = "—" if r.agreement_rate is None else f"{r.agreement_rate:.2%}"
        name = f"**{r.group_name}**" if r.group_name == OVERALL else r.group_name
        lines.append(f"| {name} | {r.n_champion} | {r.n_challenger} | {r.n_agree} | {rate} |")
    lines += [
        "",
        f"Rows: `{SHADOW_PREDICTIONS}` where `batch_id = '{result.batch_id}'` and "
        f"`model_version = '{result.challenger_version}'` (never in `{PREDICTIONS}`). "
        "Agreement: of the images the champion put in a group, the share the challenger put there too.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- scoring


def shadow_rows(
    lake: Lake,
    shard: ShardRef,
    predictor: Predictor,
    challenger_version: str,
    champion_version: str,
    options: ScoringOptions,
) -> pa.Table:
    """The challenger's rows of one shard (its usable images; the champion's commit holds the
    quarantine), in the ``shadow_predictions`` schema."""
    data = read_shard(lake, shard, options.image_prep, options.keep_rejected_bytes)
    ok_idx = np.flatnonzero(data.ok)
    ids_all = data.ids if isinstance(data.ids, pa.Array) else pa.array(data.ids, pa.string())
    ids = ids_all.take(pa.array(ok_idx, pa.int64()))
    probs, _ = predict_in_sub_batches(predictor, data.images[ok_idx], options.sub_batch, 0)
    scored_at = datetime.now(UTC).replace(microsecond=0)
    table = prediction_table(
        ids, probs, challenger_version, shard.batch_id, shard.batch_date, scored_at,
        options.confidence_threshold,
    )  # fmt: skip
    n = table.num_rows
    table = table.set_column(table.schema.get_field_index("shadow"), "shadow", pa.repeat(True, n))
    table = table.append_column("champion_model_version", pa.repeat(pa.scalar(champion_version), n))
    return table.cast(TABLES[SHADOW_PREDICTIONS].schema)


@dataclass(frozen=True)
class _Job:
    """One shadow run of one batch: what :func:`score_shadow` was asked, the challenger chosen."""

    batch_id: str
    batch_date: date
    champion_version: str
    challenger_version: str
    shards: Sequence[ShardRef] | None
    location: str | None
    committed_before: bool
    options: ScoringOptions
    shard_size: int
    runtime: Runtime
    threads: int | None
    force: bool


def score_shadow(
    cat: LakeCatalog,
    *,
    batch_id: str,
    batch_date: date,
    champion_version: str,
    shards: Sequence[ShardRef] | None = None,
    location: str | None = None,
    champion_committed_before: bool = False,
    options: ScoringOptions | None = None,
    shard_size: int = 10_000,
    runtime: Runtime = "onnx",
    threads: int | None = None,
    force: bool = False,
    challenger: str | None = None,
    predictor: Predictor | None = None,
) -> ShadowResult:
    """Score the batch's shards with the challenger into ``shadow_predictions``, then commit its
    agreement with the champion's committed rows; never raises.

    ``shards``: the champion's plan (``plan.shards``); when the champion's batch was committed by an
    earlier run (``champion_committed_before``, nothing planned) the batch is described again from
    ``location``, and skipped when this challenger already shadowed it beside this champion (unless
    ``force``). ``challenger`` (default :func:`find_challenger`) and ``predictor`` (default: its
    checked bundle) are for tests and for choosing by hand.
    """
    t0 = time.perf_counter()
    lake = cat.lake
    base = {"batch_id": batch_id, "champion_version": champion_version}
    version = challenger
    try:
        version = version or find_challenger(lake, exclude=[champion_version])
        if version is None:
            log.info(
                "shadow scoring of batch %s asked for, but there is no challenger (no registered model "
                "version besides the champion %s): the champion's scoring goes on alone",
                batch_id, champion_version,
            )  # fmt: skip
            return ShadowResult(**base, status="no_challenger")
        decision = last_decision(lake, version)
        job = _Job(
            batch_id, batch_date, champion_version, version, shards, location, champion_committed_before,
            options or ScoringOptions(), shard_size, runtime, threads, force,
        )  # fmt: skip
        result = _score_shadow(cat, job, predictor)
        result.challenger_decision = decision
    except Exception as e:  # noqa: BLE001 - the shadow never fails the batch, whatever went wrong
        why = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
        log.warning(
            "shadow scoring of batch %s with challenger %s failed (the champion's predictions are "
            "committed): %s: %s",
            batch_id, version, e.__class__.__name__, why,
        )  # fmt: skip
        return ShadowResult(
            **base, challenger_version=version, status="failed", error=f"{e.__class__.__name__}: {why}",
            seconds=time.perf_counter() - t0,
        )  # fmt: skip
    result.seconds = time.perf_counter() - t0
    return result


def _score_shadow(cat: LakeCatalog, job: _Job, predictor: Predictor | None) -> ShadowResult:
    """Score, commit the shadow rows, then their agreement with the champion's committed rows."""
    lake = cat.lake
    b, d, champ, version = job.batch_id, job.batch_date, job.champion_version, job.challenger_version
    if job.committed_before and not job.force:
        done = committed_agreement(cat, b, version)
        if done and done[0]["champion_version"] == champ:
            log.info("batch %s: already shadowed by %s beside %s; skipped", b, version, champ)
            return _result(b, champ, version, "skipped", done)
    shards = job.shards
    if not shards and job.committed_before:
        shards = _shards_again(lake, b, d, job.location, job.shard_size)
    opts = job.options
    pred = predictor or load_champion_predictor(lake, job.runtime, model_version=version, threads=job.threads)
    ensure_table(cat, SHADOW_PREDICTIONS)
    schema = table_iceberg_schema(SHADOW_PREDICTIONS)
    partition = prediction_partition(d, version, b)
    write_id = new_run_id()  # a new shadow run never rewrites a file an earlier one committed
    keys: list[str] = []
    pieces: list[pa.Table] = []
    for s in shards or ():
        rows = shadow_rows(lake, s, pred, version, champ, opts)
        if rows.num_rows:
            key = data_file_key(
                cat, SHADOW_PREDICTIONS, run_id=write_id, shard_id=s.shard_id, partition=partition
            )
            write_data_file(lake, key, rows, schema=schema)
            keys.append(key)
            pieces.append(rows.select(["image_id", "pred_group"]))
    scored = sum(p.num_rows for p in pieces)
    props = {
        f"{SHADOW_SNAPSHOT_PREFIX}batch-id": b,
        f"{SHADOW_SNAPSHOT_PREFIX}champion-version": champ,
        f"{SHADOW_SNAPSHOT_PREFIX}challenger-version": version,
        f"{SHADOW_SNAPSHOT_PREFIX}scored": scored,
    }
    committed = add_data_files(cat, SHADOW_PREDICTIONS, keys, replace=partition, properties=props)
    champion_rows = scan(
        cat, PREDICTIONS, prediction_partition(d, champ, b), columns=["image_id", "pred_group"]
    )
    challenger_rows = pa.concat_tables(pieces) if pieces else champion_rows.schema.empty_table()
    rows = agreement_rows(*join_groups(champion_rows, challenger_rows))
    if rows[-1].n_champion != champion_rows.num_rows or scored != champion_rows.num_rows:
        log.warning(
            "batch %s: the champion scored %d images, the challenger %d, both %d",
            b, champion_rows.num_rows, scored, rows[-1].n_champion,
        )  # fmt: skip
    table = agreement_table(
        rows, batch_id=b, batch_date=d, champion_version=champ, challenger_version=version
    )
    replace_partition(cat, SHADOW_AGREEMENT, table, shadow_agreement_rows(b, version))
    overall = rows[-1].agreement_rate
    log.info(
        "batch %s shadowed by %s: %d images, agreement with champion %s %s (snapshot %s)",
        b, version, scored, champ, "—" if overall is None else f"{overall:.2%}", committed.snapshot_id,
    )  # fmt: skip
    result = _result(b, champ, version, "scored", table.to_pylist())
    result.scored, result.data_files, result.snapshot_id = scored, len(keys), committed.snapshot_id
    return result


def _shards_again(
    lake: Lake, batch_id: str, batch_date: date, location: str | None, shard_size: int
) -> list[ShardRef]:
    """The shards of a batch the champion committed earlier, cut again from its location."""
    if location is None:
        raise DataError(f"shadow of batch {batch_id}: committed earlier, so it needs the batch's location")
    slug = batch_id[len(batch_date.isoformat()) + 1 :]
    batch: Batch = describe_batch(lake, location, batch_date=batch_date, source=slug, hash_inputs=False)
    if batch.batch_id != batch_id:
        raise DataError(f"shadow of batch {batch_id}: {location} describes batch {batch.batch_id}")
    return plan_shards(batch, shard_size, embedding_sample=0)


def committed_agreement(cat: LakeCatalog, batch_id: str, challenger_version: str) -> list[dict[str, Any]]:
    """The batch's committed ``shadow_agreement`` rows for one challenger (empty: not shadowed)."""
    return scan(cat, SHADOW_AGREEMENT, shadow_agreement_rows(batch_id, challenger_version)).to_pylist()


def _result(
    batch_id: str, champion: str, challenger: str, status: ShadowStatus, rows: Sequence[Mapping[str, Any]]
) -> ShadowResult:
    groups = [AgreementRow.model_validate(r) for r in _ordered(rows)]
    overall = next((g for g in groups if g.group_name == OVERALL), None)
    return ShadowResult(
        batch_id=batch_id,
        champion_version=champion,
        challenger_version=challenger,
        status=status,
        scored=overall.n_champion if overall else 0,
        agreement=overall.agreement_rate if overall else None,
        groups=groups,
    )


def _ordered(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Agreement rows in group order, the overall row last."""
    return sorted(rows, key=lambda r: NUM_GROUPS if r.get("group") is None else int(r["group"]))


# ---------------------------------------------------------------------------------------------- for the gates


class ShadowEvidence(BaseModel):
    """What shadow scoring tells about a challenger beside one champion, over every shadowed batch."""

    challenger_version: str
    champion_version: str
    batches: list[str]
    items: int  # images both models scored
    agreement: float | None  # same group / items
    groups: list[AgreementRow]  # added up over the batches
    reviewed_items: int = 0  # of those, with a reviewer's group label (first decision, not unusable)
    challenger_reviewed_accuracy: float | None = None
    champion_reviewed_accuracy: float | None = None
    challenger_reviewed_tp: dict[str, int] = {}  # true positives per group on the reviewed items


class ReviewedComparison(BaseModel):
    """Reviewed items with both models' groups: the reviewers' label, the champion's, the challenger's."""

    y_true: list[int]
    y_champion: list[int]
    y_challenger: list[int]


def reviewed_comparison(
    decisions: Sequence[Decision], challenger_groups: Mapping[str, int]
) -> ReviewedComparison:
    """The reviewed items the challenger scored too (pure): ``decisions`` as
    :func:`zalando.feedback.first_decisions` gives them (one per image; ``unusable`` ones are left
    out), the champion's group the one each decision recorded, the challenger's from its shadow rows."""
    from zalando.feedback import UNUSABLE

    y_true, y_champ, y_chall = [], [], []
    for d in decisions:
        if d.label == UNUSABLE or d.image_id not in challenger_groups:
            continue
        y_true.append(group_index(d.label))
        y_champ.append(group_index(d.predicted_group))
        y_chall.append(int(challenger_groups[d.image_id]))
    return ReviewedComparison(y_true=y_true, y_champion=y_champ, y_challenger=y_chall)


def shadow_evidence(
    lake: Lake, challenger_version: str, champion_version: str | None
) -> ShadowEvidence | None:
    """The challenger's agreement with ``champion_version`` over every batch it shadowed, and both
    models' accuracy on the reviewed items of those batches; None when it shadowed none."""
    if champion_version is None:
        return None
    cat = lake.catalog()
    rows = scan(
        cat, SHADOW_AGREEMENT,
        {"challenger_version": challenger_version, "champion_version": champion_version},
    ).to_pylist()  # fmt: skip
    if not rows:
        return None
    groups = _added_up(rows)
    overall = groups[-1]
    batches = sorted({r["batch_id"] for r in rows})
    ev = ShadowEvidence(
        challenger_version=challenger_version,
        champion_version=champion_version,
        batches=batches,
        items=overall.n_champion,
        agreement=overall.agreement_rate,
        groups=groups,
    )
    return _with_reviewed(lake, ev)


def _added_up(rows: Sequence[Mapping[str, Any]]) -> list[AgreementRow]:
    """Agreement rows of many batches added up, per group and overall (the overall row last)."""
    totals = {name: np.zeros(3, np.int64) for name in (*GROUP_NAMES, OVERALL)}
    for r in rows:
        totals[r["group_name"]] += (r["n_champion"], r["n_challenger"], r["n_agree"])
    return [
        AgreementRow(
            group_name=name, n_champion=int(t[0]), n_challenger=int(t[1]), n_agree=int(t[2]),
            agreement_rate=float(t[2] / t[0]) if t[0] else None,
        )
        for name, t in totals.items()
    ]  # fmt: skip


def _with_reviewed(lake: Lake, ev: ShadowEvidence) -> ShadowEvidence:
    """``ev`` with the reviewed items of its batches: decisions on the champion's rows joined with
    the challenger's shadow rows of the same images."""
    from zalando.feedback import first_decisions
    from zalando.kpis import labelled_kpis, reviewed_thresholds
    from zalando.ui.store import LakeStore

    store = LakeStore(lake)
    cat = lake.catalog()
    y_true: list[int] = []
    y_champ: list[int] = []
    y_chall: list[int] = []
    with_feedback = set(store.feedback_batches())
    for b in ev.batches:
        if b not in with_feedback:
            continue
        decisions = [d for d in store.read_feedback(b) if d.model_version == ev.champion_version]
        if not decisions:
            continue
        shadow = scan(
            cat, SHADOW_PREDICTIONS,
            {"batch_id": b, "model_version": ev.challenger_version}, columns=["image_id", "pred_group"],
        )  # fmt: skip
        groups = dict(
            zip(shadow.column("image_id").to_pylist(), shadow.column("pred_group").to_pylist(), strict=True)
        )
        cmp = reviewed_comparison(list(first_decisions(decisions).values()), groups)
        y_true += cmp.y_true
        y_champ += cmp.y_champion
        y_chall += cmp.y_challenger
    if not y_true:
        return ev
    t, a, c = (np.asarray(y, dtype=np.int64) for y in (y_true, y_champ, y_chall))
    kpis = labelled_kpis(t, c, reviewed_thresholds())
    return ev.model_copy(
        update={
            "reviewed_items": len(t),
            "challenger_reviewed_accuracy": float((c == t).mean()),
            "champion_reviewed_accuracy": float((a == t).mean()),
            "challenger_reviewed_tp": {str(r.group_name): int(r.tp) for r in kpis.itertuples()},
        }
    )
