"""The model registry in the lake: registered versions, the champion pointer, the decision log.

The decision log is the Iceberg table ``registry_decisions``: one row per decision (promote,
reject, rollback), appended and never rewritten. Concurrent writers each append their own commit
(a lost race is retried on the fresh snapshot), so none can clobber another's history; decision ids
sort in time order. The rest are plain objects (keys in :mod:`zalando.lake.keys`):

* ``registry/models/<model_version>.json`` — one record per registered version (metrics, spec,
  dataset and code version, bundle key). Re-registering a version replaces its record.
* ``registry/champion.json`` — the pointer: model_version, experiment, bundle_key, since, reason,
  actor, decision_id. One small object, replaced whole: every reader needs just this.
* ``registry/canary/`` — the canary set (committed partition, ``canary.parquet``), chosen once.
* ``registry/references/model_version=<v>/`` — each model's drift reference profile
  (committed partition, ``reference.parquet``, one row; see ``zalando.drift.reference_to_table``).
  Both are read whole by key, never queried: objects, not tables.

Order of writes: the decision first, then the pointer. A crash in between leaves a logged decision
whose pointer update is missing; re-running the promotion (same version) finishes it.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow as pa

from zalando.drift import reference_from_table, reference_to_table
from zalando.errors import ModelError, NotCommittedError
from zalando.lake import Lake
from zalando.lake import keys as lake_keys
from zalando.lake.tables import DECISION_ID_PROPERTY

log = logging.getLogger(__name__)

DECISIONS_TABLE = "registry_decisions"

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@,-]{0,127}$")
_TS_FORMAT = "%Y%m%dT%H%M%S.%fZ"

MODEL_COLUMNS = [
    "model_version", "experiment", "dataset_version", "code_version", "bundle_key", "registered_at", "is_champion",
]  # fmt: skip
DECISION_COLUMNS = [
    "decision_id", "at", "action", "model_version", "experiment", "previous_champion", "champion_after",
    "actor", "reason", "decision",
]  # fmt: skip


class RegistryError(ModelError):
    """The registry cannot do what was asked (bad version name, nothing to roll back to, ...)."""


class UnknownModelError(RegistryError):
    """A model version that is not registered."""


class NoChampionError(RegistryError):
    """No champion has been promoted yet."""


def _check_version(model_version: str) -> str:
    if not isinstance(model_version, str) or not _VERSION.match(model_version):
        raise RegistryError(
            f"model version {model_version!r}: must be 1-128 characters of [A-Za-z0-9._:+@,-], "
            "starting with a letter or digit"
        )
    return model_version


def _model_key(model_version: str) -> str:
    return lake_keys.model_record_key(_check_version(model_version))


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------- models


def register_model(
    lake: Lake,
    *,
    model_version: str,
    experiment: str,
    metrics: Mapping[str, Any],
    spec: Mapping[str, Any],
    dataset_version: str,
    code_version: str,
    bundle_key: str,
) -> dict[str, Any]:
    """Record a trained model version (idempotent: the same version again replaces its record).

    ``metrics`` is the dict that :func:`zalando.gates.evaluate_gates` reads (per_group, macro_f1,
    latency_ms_per_1000, size_mb, canary_accuracy, ...); ``bundle_key`` is where the bundle lives.
    """
    key = _model_key(model_version)
    for name, value in (
        ("experiment", experiment),
        ("dataset_version", dataset_version),
        ("bundle_key", bundle_key),
    ):
        if not isinstance(value, str) or not value:
            raise RegistryError(f"register {model_version}: {name} must be a non-empty string, got {value!r}")
    record = {
        "model_version": model_version,
        "experiment": experiment,
        "dataset_version": dataset_version,
        "code_version": str(code_version),
        "bundle_key": bundle_key,
        "registered_at": _now().isoformat(),
        "metrics": dict(metrics),
        "spec": dict(spec),
    }
    lake.write_json(key, record)
    log.info("registered model %s (%s) -> %s", model_version, experiment, lake.uri(key))
    return record


def registered_versions(lake: Lake) -> list[str]:
    """Every registered model version, sorted by name."""
    n = len(lake_keys.MODEL_RECORDS) + 1
    keys = lake.list_keys(lake_keys.MODEL_RECORDS)
    return sorted(key[n:-5] for key in keys if key.endswith(".json") and "/" not in key[n:])


def get_model(lake: Lake, model_version: str) -> dict[str, Any]:
    """The registration record of one version; UnknownModelError lists the valid ones."""
    key = _model_key(model_version)
    if not lake.exists(key):
        known = registered_versions(lake)
        raise UnknownModelError(
            f"model version {model_version!r} is not registered; registered versions: "
            + (", ".join(known) if known else "none (train one with `zalando train`)")
        )
    return lake.read_json(key)


def list_models(lake: Lake) -> pd.DataFrame:
    """One row per registered version (oldest first) with its scalar metrics as ``metrics.*`` columns."""
    champion = get_champion(lake)
    current = champion["model_version"] if champion else None
    rows = []
    for v in registered_versions(lake):
        rec = lake.read_json(_model_key(v))
        row = {c: rec.get(c) for c in MODEL_COLUMNS if c != "is_champion"}
        row["is_champion"] = v == current
        for k, val in _flatten(rec.get("metrics", {}), "metrics").items():
            row[k] = val
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=MODEL_COLUMNS)
    df = pd.DataFrame(rows)
    return df.sort_values(["registered_at", "model_version"], kind="stable").reset_index(drop=True)


def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts to 'a.b.c' keys, keeping only scalars (lists and tables are left out)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
    elif obj is None or isinstance(obj, str | int | float | bool):
        out[prefix] = obj
    return out


# ---------------------------------------------------------------------------------------------- champion


def get_champion(lake: Lake) -> dict[str, Any] | None:
    """The champion pointer (model_version, experiment, bundle_key, since, reason, ...) or None."""
    if not lake.exists(lake_keys.CHAMPION_KEY):
        return None
    return lake.read_json(lake_keys.CHAMPION_KEY)


def require_champion(lake: Lake) -> dict[str, Any]:
    """The champion pointer; NoChampionError saying how to get one when there is none."""
    champion = get_champion(lake)
    if champion is None:
        known = registered_versions(lake)
        hint = (
            f"promote one of the registered versions ({', '.join(known)}) with `zalando promote VERSION`"
            if known
            else "train one with `zalando train` (the training flow promotes a champion that passes the gates)"
        )
        raise NoChampionError(f"no champion model in {lake.uri(lake_keys.REGISTRY)}: {hint}")
    return champion


# ---------------------------------------------------------------------------------------------- decisions


def _new_decision_id(lake: Lake) -> tuple[str, datetime]:
    """A sortable id: UTC time (made strictly later than the latest logged decision) + uuid."""
    now = _now()
    last = _last_decision_id(lake)
    if last:
        try:
            last_t = datetime.strptime(last.split("-", 1)[0], _TS_FORMAT).replace(tzinfo=UTC)
            if now <= last_t:
                now = last_t + timedelta(microseconds=1)
        except ValueError:
            log.warning("decision id %s does not start with a timestamp", last)
    return f"{now.strftime(_TS_FORMAT)}-{uuid.uuid4().hex[:12]}", now


def _last_decision_id(lake: Lake) -> str | None:
    """The newest logged decision's id: the current snapshot says which (no data file is read);
    a log without that property (written by other means) is scanned."""
    from zalando.lake.tables import load_table

    table = load_table(lake.catalog(), DECISIONS_TABLE)
    snapshot = table.current_snapshot() if table is not None else None
    if snapshot is None:
        return None
    if snapshot.summary is not None and snapshot.summary[DECISION_ID_PROPERTY]:
        return str(snapshot.summary[DECISION_ID_PROPERTY])
    ids = _decision_rows(lake, columns=["decision_id"]).column("decision_id").to_pylist()
    return max((i for i in ids if i), default=None)


def _decision_rows(lake: Lake, columns: list[str] | None = None) -> pa.Table:
    from zalando.lake.commit import scan

    return scan(lake.catalog(), DECISIONS_TABLE, columns=columns)


def _jsonable_decision(decision: Any) -> dict[str, Any] | None:
    if decision is None:
        return None
    if hasattr(decision, "model_dump"):  # a pydantic model such as gates.GateDecision
        return decision.model_dump(mode="json")
    if isinstance(decision, Mapping):
        return dict(decision)
    raise RegistryError(f"decision: expected a dict or a GateDecision, got {type(decision).__name__}")


def _record_decision(
    lake: Lake,
    *,
    action: str,
    model_version: str,
    experiment: str | None,
    previous_champion: str | None,
    champion_after: str | None,
    actor: str,
    reason: str,
    decision: Any,
) -> dict[str, Any]:
    from zalando.lake.commit import append

    if not actor or not isinstance(actor, str):
        raise RegistryError(f"{action} {model_version}: actor must be a non-empty string (who decided)")
    if not reason or not isinstance(reason, str):
        raise RegistryError(f"{action} {model_version}: reason must be a non-empty string (why)")
    decision_id, at = _new_decision_id(lake)
    record = {
        "decision_id": decision_id,
        "at": at.isoformat(),
        "action": action,
        "model_version": model_version,
        "experiment": experiment,
        "previous_champion": previous_champion,
        "champion_after": champion_after,
        "actor": actor,
        "reason": reason,
        "decision": _jsonable_decision(decision),
    }
    row = {
        **record,
        "at": at,
        "decision": None if record["decision"] is None else json.dumps(record["decision"], sort_keys=True),
    }
    props = {"zalando.action": action, DECISION_ID_PROPERTY: decision_id}
    append(lake.catalog(), DECISIONS_TABLE, pa.Table.from_pylist([row]), properties=props)
    return record


def _set_champion(lake: Lake, record: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    pointer = {
        "model_version": model["model_version"],
        "experiment": model["experiment"],
        "bundle_key": model["bundle_key"],
        "dataset_version": model.get("dataset_version"),
        "since": record["at"],
        "reason": record["reason"],
        "actor": record["actor"],
        "decision_id": record["decision_id"],
    }
    lake.write_json(lake_keys.CHAMPION_KEY, pointer)
    return pointer


def promote(
    lake: Lake, model_version: str, *, reason: str, actor: str, decision: Any = None
) -> dict[str, Any]:
    """Make ``model_version`` the champion and log why; returns the new pointer.

    ``decision`` is the gate decision (a ``GateDecision`` or its dict) or None for a manual
    promotion. Promoting the current champion again changes nothing and logs nothing.
    """
    model = get_model(lake, model_version)
    current = get_champion(lake)
    if current and current.get("model_version") == model_version:
        log.info("model %s is already the champion; nothing to do", model_version)
        return current
    record = _record_decision(
        lake,
        action="promote",
        model_version=model_version,
        experiment=model["experiment"],
        previous_champion=current["model_version"] if current else None,
        champion_after=model_version,
        actor=actor,
        reason=reason,
        decision=decision,
    )
    pointer = _set_champion(lake, record, model)
    log.info("promoted %s (was %s) by %s: %s", model_version, record["previous_champion"], actor, reason)
    return pointer


def reject(
    lake: Lake, model_version: str, *, reason: str, actor: str, decision: Any = None
) -> dict[str, Any]:
    """Log that a challenger was not promoted (the champion stays); returns the log record."""
    model = get_model(lake, model_version)
    current = get_champion(lake)
    cur = current["model_version"] if current else None
    record = _record_decision(
        lake,
        action="reject",
        model_version=model_version,
        experiment=model["experiment"],
        previous_champion=cur,
        champion_after=cur,
        actor=actor,
        reason=reason,
        decision=decision,
    )
    log.info("rejected %s (champion stays %s): %s", model_version, cur, reason)
    return record


def apply_gate_decision(lake: Lake, model_version: str, decision: Any, *, actor: str) -> dict[str, Any]:
    """Promote or reject ``model_version`` as a gate decision says; the decision goes in the log.

    Returns ``{"promoted": bool, "champion": pointer | None, "record": log record | None}``.
    """
    d = _jsonable_decision(decision)
    if d is None or "promote" not in d:
        raise RegistryError(f"gate decision for {model_version}: needs a 'promote' field, got {d!r}")
    if d["promote"]:
        pointer = promote(lake, model_version, reason="passed every quality gate", actor=actor, decision=d)
        return {"promoted": True, "champion": pointer, "record": None}
    reasons = d.get("reasons") or ["failed a quality gate"]
    record = reject(lake, model_version, reason="; ".join(reasons), actor=actor, decision=d)
    return {"promoted": False, "champion": get_champion(lake), "record": record}


def _decision_records(lake: Lake) -> list[dict[str, Any]]:
    """Every logged decision as the dict ``_record_decision`` returned, oldest first."""
    out = []
    for r in _decision_rows(lake).sort_by("decision_id").to_pylist():
        r["at"] = r["at"].isoformat() if r.get("at") is not None else None
        r["decision"] = None if r.get("decision") is None else json.loads(r["decision"])
        out.append(r)
    return out


def decision_log(lake: Lake) -> pd.DataFrame:
    """Every promotion, rejection and rollback, oldest first (``decision`` holds the gate table as JSON)."""
    rows = _decision_rows(lake).sort_by("decision_id").to_pylist()
    for r in rows:
        r["at"] = r["at"].isoformat() if r.get("at") is not None else None
    return pd.DataFrame(rows, columns=DECISION_COLUMNS)


def champion_history(lake: Lake) -> list[str]:
    """The champions as a stack, replayed from the log: promote pushes, rollback pops."""
    stack: list[str] = []
    for r in _decision_records(lake):
        if r.get("action") == "promote" and (not stack or stack[-1] != r["model_version"]):
            stack.append(r["model_version"])
        elif r.get("action") == "rollback" and stack:
            stack.pop()
    return stack


def rollback(lake: Lake, *, actor: str, reason: str) -> dict[str, Any]:
    """Make the previous champion in the log the champion again; returns the new pointer.

    Rolling back twice goes back two champions (the log is replayed as a stack).
    """
    current = require_champion(lake)
    cur = current["model_version"]
    stack = champion_history(lake)
    if stack and stack[-1] == cur:
        stack.pop()
    target = next((v for v in reversed(stack) if v != cur), None)
    if target is None:
        raise RegistryError(
            f"cannot roll back: {cur} is the first champion in the log; "
            "promote another version with `zalando promote VERSION`"
        )
    model = get_model(lake, target)
    record = _record_decision(
        lake,
        action="rollback",
        model_version=target,
        experiment=model["experiment"],
        previous_champion=cur,
        champion_after=target,
        actor=actor,
        reason=reason,
        decision=None,
    )
    pointer = _set_champion(lake, record, model)
    log.info("rolled back from %s to %s by %s: %s", cur, target, actor, reason)
    return pointer


# ---------------------------------------------------------------------------------------------- canary, references


def save_canary_set(lake: Lake, table: pa.Table, *, run_id: str, force: bool = False) -> str:
    """Commit the canary set (from ``gates.select_canary_set``) once; later calls keep the first
    one unless ``force``, so every night scores the same images. Returns the partition key."""
    if lake.is_committed(lake_keys.CANARY_KEY) and not force:
        log.info("canary set already in %s; keeping it", lake.uri(lake_keys.CANARY_KEY))
        return lake_keys.CANARY_KEY
    lake.commit_partition(
        lake_keys.CANARY_KEY,
        {"canary": table},
        run_id,
        extra={"method": table.column("method")[0].as_py() if len(table) else None},
    )
    log.info("canary set of %d images committed to %s", table.num_rows, lake.uri(lake_keys.CANARY_KEY))
    return lake_keys.CANARY_KEY


def has_canary_set(lake: Lake) -> bool:
    return lake.is_committed(lake_keys.CANARY_KEY)


def load_canary_set(lake: Lake) -> pa.Table:
    """The committed canary set (raw-table schema plus val_index, margin, method)."""
    try:
        return lake.read_partition(lake_keys.CANARY_KEY)
    except NotCommittedError:
        raise RegistryError(
            f"no canary set in {lake.uri(lake_keys.CANARY_KEY)}: the training flow selects one from the validation split"
        ) from None


def reference_key(model_version: str) -> str:
    return lake_keys.reference_key(_check_version(model_version))


def save_reference(lake: Lake, model_version: str, reference: Mapping[str, Any], *, run_id: str) -> str:
    """Commit a model's drift reference profile (``drift.reference_profile``); returns its key."""
    key = reference_key(model_version)
    lake.commit_partition(key, {"reference": reference_to_table(reference)}, run_id)
    return key


def load_reference(lake: Lake, model_version: str) -> dict[str, Any]:
    """The drift reference profile of ``model_version`` (for ``drift.drift_report``)."""
    key = reference_key(model_version)
    try:
        return reference_from_table(lake.read_partition(key))
    except NotCommittedError:
        raise RegistryError(
            f"no drift reference for model {model_version} in {lake.uri(key)}: "
            "the training flow writes one per model (drift.reference_profile + registry.save_reference)"
        ) from None
