"""Classical, performance and lake-table metrics for one trained model (pure numpy/pandas/pyarrow).

Classical metrics follow one zero-division rule, applied everywhere in this module:

* a per-group ratio whose denominator is zero is **NaN** ("undefined"), never 0 and never a warning:
  a group that is never predicted has NaN precision, a group that never occurs has NaN recall, and a
  group predicted for every sample has NaN NPV;
* F1 is computed as ``2 TP / (2 TP + FP + FN)``: it equals the harmonic mean of precision and recall when
  both are defined, is 0 for a group that occurs but is never predicted (or is predicted but never
  occurs), and NaN only when the group neither occurs nor is predicted;
* averages follow scikit-learn's ``zero_division=0``: macro averages are taken over the groups that occur
  or are predicted, with undefined values counted as 0; weighted averages weight by support.

Quality gates should treat NaN as failing a floor (``not value >= floor``).

Lake tables: :func:`metric_tables` builds the per_group, confusion, performance, energy and summary tables
for one (run_id, experiment, model_version); :func:`metric_arrow_tables` casts them to the schemas below
so they can be committed to the lake's metric tables (``zalando.steps.training.commit_metric_tables``:
one Iceberg table each, the model's rows replaced by run_id and experiment). ``run_id`` and
``experiment`` are dictionary-encoded strings here; the tables store them as plain strings.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from zalando.errors import DataError
from zalando.labels import GROUP_NAMES, LABEL_NAMES, NUM_GROUPS, NUM_LABELS
from zalando.runtime import run_concurrently

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MB = 1024**2
"""Bytes per MB in every size this module reports (MiB, as torch tooling reports model sizes)."""

# ---------------------------------------------------------------------------------------------------
# Lake table schemas
# ---------------------------------------------------------------------------------------------------

KEY_TYPE = pa.dictionary(pa.int32(), pa.string())
"""Type of the hive path keys (run_id, experiment) inside the files: what pyarrow infers from paths."""

_KEY_FIELDS = [
    pa.field("run_id", KEY_TYPE, nullable=False),
    pa.field("experiment", KEY_TYPE, nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
]
_CREATED_AT = pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False)

PER_GROUP_SCHEMA = pa.schema(
    [
        *_KEY_FIELDS,
        pa.field("split", pa.string(), nullable=False),
        pa.field("group", pa.int8(), nullable=False),
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("recall", pa.float64()),
        pa.field("precision", pa.float64()),
        pa.field("npv", pa.float64()),
        pa.field("f1", pa.float64()),
        pa.field("support", pa.int64(), nullable=False),
        pa.field("tp", pa.int64(), nullable=False),
        pa.field("fp", pa.int64(), nullable=False),
        pa.field("tn", pa.int64(), nullable=False),
        pa.field("fn", pa.int64(), nullable=False),
        _CREATED_AT,
    ]
)
"""One row per group: recall = TP/(TP+FN), precision = TP/(TP+FP), NPV = TN/(TN+FN), F1; NaN = undefined."""

CONFUSION_SCHEMA = pa.schema(
    [
        *_KEY_FIELDS,
        pa.field("split", pa.string(), nullable=False),
        pa.field("true_group", pa.int8(), nullable=False),
        pa.field("pred_group", pa.int8(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        _CREATED_AT,
    ]
)
"""The 5x5 group confusion matrix in long format: all 25 cells, zeros included."""

PERFORMANCE_SCHEMA = pa.schema(
    [
        *_KEY_FIELDS,
        pa.field("runtime", pa.string(), nullable=False),
        pa.field("params", pa.int64()),
        pa.field("size_mb_torch", pa.float64()),
        pa.field("size_mb_onnx", pa.float64()),
        pa.field("n_images", pa.int64()),
        pa.field("batch_size", pa.int64()),
        pa.field("wall_s", pa.float64()),
        pa.field("images_per_s", pa.float64()),
        pa.field("p50_ms", pa.float64()),
        pa.field("p95_ms", pa.float64()),
        _CREATED_AT,
    ]
)
"""One row per scoring runtime ("torch", "onnx", and "torch-bf16" on CPUs with native bf16): size in MiB, wall time after warm-up, batch latencies."""

ENERGY_SCHEMA = pa.schema(
    [
        *_KEY_FIELDS,
        pa.field("label", pa.string(), nullable=False),
        pa.field("country_iso_code", pa.string()),
        pa.field("duration_s", pa.float64()),
        pa.field("cpu_power_w", pa.float64()),
        pa.field("gpu_power_w", pa.float64()),
        pa.field("ram_power_w", pa.float64()),
        pa.field("cpu_energy_kwh", pa.float64()),
        pa.field("gpu_energy_kwh", pa.float64()),
        pa.field("ram_energy_kwh", pa.float64()),
        pa.field("energy_kwh", pa.float64()),
        pa.field("emissions_kg", pa.float64()),
        pa.field("images", pa.int64()),
        pa.field("kwh_per_1000_images", pa.float64()),
        pa.field("power_method", pa.string(), nullable=False),
        _CREATED_AT,
    ]
)
"""One row per measured phase (label "train", "score-onnx", ...): see zalando.energy.EnergyReading."""

SUMMARY_SCHEMA = pa.schema(
    [
        *_KEY_FIELDS,
        pa.field("split", pa.string(), nullable=False),
        pa.field("n", pa.int64(), nullable=False),
        pa.field("accuracy", pa.float64()),
        pa.field("macro_recall", pa.float64()),
        pa.field("macro_precision", pa.float64()),
        pa.field("macro_f1", pa.float64()),
        pa.field("weighted_recall", pa.float64()),
        pa.field("weighted_precision", pa.float64()),
        pa.field("weighted_f1", pa.float64()),
        _CREATED_AT,
    ]
)
"""One row per split: accuracy and macro / weighted averages (the headline numbers of a run)."""

METRIC_SCHEMAS: dict[str, pa.Schema] = {
    "per_group": PER_GROUP_SCHEMA,
    "confusion": CONFUSION_SCHEMA,
    "performance": PERFORMANCE_SCHEMA,
    "energy": ENERGY_SCHEMA,
    "summary": SUMMARY_SCHEMA,
}
"""Table name (file name without .parquet inside metrics/run_id=…/experiment=…/) -> schema."""


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------


def _as_ids(values: Any, name: str, n: int) -> np.ndarray:
    """Return ``values`` as a 1-D int64 array of ids in 0..n-1, or raise DataError naming ``name``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name}: expected a 1-D array of class ids, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{name}: is empty, nothing to evaluate")
    if not np.issubdtype(arr.dtype, np.integer):
        if (
            np.issubdtype(arr.dtype, np.floating)
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        ):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{name}: expected integer class ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n:
        raise DataError(f"{name}: class ids must be in 0..{n - 1}, got {lo}..{hi}")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise DataError(f"{name_a} and {name_b} differ in length: {a.shape[0]} vs {b.shape[0]}")


def _as_probs(probs: Any, name: str, n_rows: int, n_cols: int) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.shape != (n_rows, n_cols):
        raise DataError(f"{name}: expected shape ({n_rows}, {n_cols}), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name}: contains NaN or infinite values")
    return arr


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0, without a warning."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


# ---------------------------------------------------------------------------------------------------
# Classical metrics
# ---------------------------------------------------------------------------------------------------


def confusion_matrix(y_true: Any, y_pred: Any, n: int) -> np.ndarray:
    """(n, n) int64 counts: rows are true classes, columns predicted classes."""
    t = _as_ids(y_true, "y_true", n)
    p = _as_ids(y_pred, "y_pred", n)
    _same_length(t, p, "y_true", "y_pred")
    return np.bincount(t * n + p, minlength=n * n).reshape(n, n).astype(np.int64)


def counts_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class one-vs-rest counts tp, fp, fn, tn and support from a square confusion matrix."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise DataError(f"confusion matrix: expected a square 2-D array, got shape {cm.shape}")
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    fn = support - tp
    fp = predicted - tp
    tn = cm.sum() - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "support": support}


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class recall, precision, NPV, F1 (NaN where undefined, see module docstring) and counts."""
    c = counts_from_confusion(cm)
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        **c,
    }


def group_metrics(y_true_group: Any, y_pred_group: Any) -> pd.DataFrame:
    """One row per group (0..4): group, group_name, recall, precision, npv, f1, support, tp, fp, tn, fn."""
    cm = confusion_matrix(y_true_group, y_pred_group, NUM_GROUPS)
    return _per_group_frame(cm)


def _per_group_frame(cm: np.ndarray) -> pd.DataFrame:
    m = metrics_from_confusion(cm)
    return pd.DataFrame(
        {
            "group": np.arange(NUM_GROUPS, dtype=np.int8),
            "group_name": list(GROUP_NAMES),
            "recall": m["recall"],
            "precision": m["precision"],
            "npv": m["npv"],
            "f1": m["f1"],
            "support": m["support"],
            "tp": m["tp"],
            "fp": m["fp"],
            "tn": m["tn"],
            "fn": m["fn"],
        }
    )


def summary_from_confusion(cm: np.ndarray) -> dict[str, float | int]:
    """Accuracy plus macro and weighted recall / precision / F1 (scikit-learn ``zero_division=0`` rule)."""
    c = counts_from_confusion(cm)
    return summary_from_counts(c["tp"], c["fp"], c["fn"])


def summary_from_counts(tp: Any, fp: Any, fn: Any) -> dict[str, float | int]:
    """The summary of :func:`summary_from_confusion` from per-class one-vs-rest counts (e.g. a per_group table)."""
    tp, fp, fn = (np.asarray(v, dtype=np.int64) for v in (tp, fp, fn))
    support = tp + fn
    total = int(support.sum())
    if total == 0:
        raise DataError("per-class counts: hold no samples, nothing to summarise")
    m = {
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    present = (support + tp + fp) > 0  # occurs or is predicted
    weights = support.astype(np.float64) / total
    out: dict[str, float | int] = {"n": total, "accuracy": float(tp.sum() / total)}
    for name in ("recall", "precision", "f1"):
        values = np.nan_to_num(m[name], nan=0.0)
        out[f"macro_{name}"] = float(values[present].mean())
        out[f"weighted_{name}"] = float((values * weights).sum())
    return out


def summary_metrics(y_true_group: Any, y_pred_group: Any) -> dict[str, float | int]:
    """n, accuracy, macro_/weighted_ recall, precision and f1 over the 5 groups."""
    return summary_from_confusion(confusion_matrix(y_true_group, y_pred_group, NUM_GROUPS))


def label_group_matrix(y_true_label: Any, y_pred_group: Any) -> np.ndarray:
    """(10, 5) int64: how many images of each original label were predicted as each group."""
    t = _as_ids(y_true_label, "y_true_label", NUM_LABELS)
    p = _as_ids(y_pred_group, "y_pred_group", NUM_GROUPS)
    _same_length(t, p, "y_true_label", "y_pred_group")
    return np.bincount(t * NUM_GROUPS + p, minlength=NUM_LABELS * NUM_GROUPS).reshape(NUM_LABELS, NUM_GROUPS)


def label_group_frame(matrix: np.ndarray) -> pd.DataFrame:
    """The label x group matrix as a labelled DataFrame (index: label names, columns: group names)."""
    return pd.DataFrame(np.asarray(matrix), index=list(LABEL_NAMES), columns=list(GROUP_NAMES))


def predicted_groups(group_probs: Any) -> np.ndarray:
    """Arg-max group per row of an (N, 5) probability array."""
    arr = np.asarray(group_probs)
    if arr.ndim != 2 or arr.shape[1] != NUM_GROUPS:
        raise DataError(f"group_probs: expected shape (N, {NUM_GROUPS}), got {arr.shape}")
    return arr.argmax(axis=1).astype(np.int64)


def pr_curves(y_true_group: Any, group_probs: Any, max_points: int | None = 500) -> pd.DataFrame:
    """Precision-recall curve per group (one-vs-rest on the group probability), vectorised by sorting.

    Rows: group, group_name, threshold (descending within a group), precision, recall, one per distinct
    score (a sample is predicted positive when its score >= threshold). Recall is NaN for a group that
    never occurs. ``max_points`` thins each curve to about that many points (endpoints kept); None keeps all.
    """
    t = _as_ids(y_true_group, "y_true_group", NUM_GROUPS)
    probs = _as_probs(group_probs, "group_probs", t.shape[0], NUM_GROUPS)
    frames = []
    for g in range(NUM_GROUPS):  # a loop over the 5 groups, not over samples
        precision, recall, thresholds = _pr_curve(t == g, probs[:, g])
        if max_points is not None and thresholds.size > max_points:
            keep = np.unique(np.linspace(0, thresholds.size - 1, max_points).round().astype(np.int64))
            precision, recall, thresholds = precision[keep], recall[keep], thresholds[keep]
        frames.append(
            pd.DataFrame(
                {
                    "group": np.int8(g),
                    "group_name": GROUP_NAMES[g],
                    "threshold": thresholds,
                    "precision": precision,
                    "recall": recall,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _pr_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = positive[order].astype(np.int64)
    # last index of each block of equal scores: every distinct threshold
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    precision = _ratio(tps, tps + fps)
    recall = _ratio(tps, np.full_like(tps, int(y.sum())))
    return precision, recall, s[last]


def average_precision(y_true_group: Any, group_probs: Any) -> np.ndarray:
    """(5,) average precision per group: sum over thresholds of (R_k - R_{k-1}) * P_k; NaN if absent."""
    t = _as_ids(y_true_group, "y_true_group", NUM_GROUPS)
    probs = _as_probs(group_probs, "group_probs", t.shape[0], NUM_GROUPS)
    out = np.full(NUM_GROUPS, np.nan)
    for g in range(NUM_GROUPS):
        precision, recall, _ = _pr_curve(t == g, probs[:, g])
        if np.all(np.isfinite(recall)):
            out[g] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return out


def most_confused_pairs(cm: np.ndarray, k: int = 3) -> list[tuple[int, int, int]]:
    """The k unordered class pairs with most mix-ups, as (a, b, cm[a,b] + cm[b,a]), largest first."""
    cm = np.asarray(cm, dtype=np.int64)
    sym = np.triu(cm + cm.T, k=1)
    order = np.argsort(-sym, axis=None, kind="stable")[:k]
    rows, cols = np.unravel_index(order, sym.shape)
    return [(int(a), int(b), int(sym[a, b])) for a, b in zip(rows, cols, strict=True) if sym[a, b] > 0]


def worst_mistakes(y_true_group: Any, group_probs: Any, group: int, k: int = 16) -> np.ndarray:
    """Indices of the k most confident mistakes involving ``group`` (missed or wrongly predicted).

    A mistake involves the group when the true group is ``group`` and the prediction is not, or the
    prediction is ``group`` and the truth is not. Ranked by the probability of the (wrong) predicted group.
    """
    t = _as_ids(y_true_group, "y_true_group", NUM_GROUPS)
    probs = _as_probs(group_probs, "group_probs", t.shape[0], NUM_GROUPS)
    if not 0 <= group < NUM_GROUPS:
        raise DataError(f"group: must be in 0..{NUM_GROUPS - 1}, got {group}")
    pred = probs.argmax(axis=1)
    involved = np.flatnonzero((pred != t) & ((t == group) | (pred == group)))
    confidence = probs[involved, pred[involved]]
    return involved[np.argsort(-confidence, kind="stable")[:k]]


# ---------------------------------------------------------------------------------------------------
# Performance
# ---------------------------------------------------------------------------------------------------


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of a torch module (all of them, or only those that require grad)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def torch_model_bytes(model: torch.nn.Module) -> int:
    """Size in bytes of the model's state_dict serialized with torch.save (what weights.pt holds)."""
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def model_size_mb(data: bytes | int) -> float:
    """Size in MB (MiB, 2**20 bytes) of serialized bytes, or of a byte count."""
    n = len(data) if isinstance(data, bytes | bytearray | memoryview) else int(data)
    if n < 0:
        raise DataError(f"model size: byte count must be >= 0, got {n}")
    return n / MB


def time_scoring(
    predict_fn: Callable[[np.ndarray], Any],
    images: np.ndarray,
    batch_size: int = 128,
    warmup: int = 2,
    parallelism: int = 1,
) -> dict[str, float | int]:
    """Time ``predict_fn`` over ``images`` in batches, after ``warmup`` untimed batches.

    ``parallelism`` batches run at once, as the scoring engine hands a predictor its sub-batches
    (pass the predictor's own ``parallelism`` to time what production runs).
    Returns n_images, batch_size, n_batches, warmup_batches, wall_s (all timed batches), images_per_s,
    p50_ms and p95_ms (per-batch latency), mean_ms. The warm-up batches are taken from the start of
    ``images`` and then scored again in the timed pass, so every image is timed exactly once.
    """
    if batch_size < 1:
        raise DataError(f"batch_size: must be >= 1, got {batch_size}")
    if warmup < 0:
        raise DataError(f"warmup: must be >= 0, got {warmup}")
    if parallelism < 1:
        raise DataError(f"parallelism: must be >= 1, got {parallelism}")
    n = int(len(images))
    if n == 0:
        raise DataError("images: is empty, nothing to time")
    starts = range(0, n, batch_size)
    for i, start in enumerate(starts):
        if i >= warmup:
            break
        predict_fn(images[start : start + batch_size])

    def timed(start: int) -> float:
        b0 = time.perf_counter()
        predict_fn(images[start : start + batch_size])
        return time.perf_counter() - b0

    t0 = time.perf_counter()
    latencies = np.asarray(run_concurrently(timed, starts, parallelism), dtype=np.float64)
    wall = time.perf_counter() - t0
    return {
        "n_images": n,
        "batch_size": int(batch_size),
        "n_batches": len(starts),
        "warmup_batches": min(warmup, len(starts)),
        "wall_s": wall,
        "images_per_s": n / wall if wall > 0 else float("nan"),
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p95_ms": float(np.percentile(latencies, 95) * 1e3),
        "mean_ms": float(latencies.mean() * 1e3),
    }


# ---------------------------------------------------------------------------------------------------
# Lake tables
# ---------------------------------------------------------------------------------------------------


def metric_tables(
    run_id: str,
    experiment: str,
    model_version: str,
    y_true_group: Any,
    y_pred_group: Any,
    performance: Sequence[Mapping[str, Any]] = (),
    energy: Sequence[Mapping[str, Any]] = (),
    split: str = "test",
    created_at: datetime | None = None,
) -> dict[str, pd.DataFrame]:
    """The per_group, confusion, summary, performance and energy tables of one evaluated model.

    ``performance``: one mapping per runtime with "runtime" and any of params, size_mb_torch, size_mb_onnx
    plus the keys of :func:`time_scoring`. ``energy``: rows from ``zalando.energy.EnergyReading.as_row()``.
    Columns follow the schemas in :data:`METRIC_SCHEMAS`; extra keys in the mappings are dropped.
    """
    for name, value in (("run_id", run_id), ("experiment", experiment), ("model_version", model_version)):
        if not isinstance(value, str) or not value:
            raise DataError(f"{name}: must be a non-empty string, got {value!r}")
    created = pd.Timestamp(created_at or datetime.now(UTC))
    created = created.tz_localize("UTC") if created.tzinfo is None else created.tz_convert("UTC")
    keys = {"run_id": run_id, "experiment": experiment, "model_version": model_version}

    cm = confusion_matrix(y_true_group, y_pred_group, NUM_GROUPS)
    per_group = _per_group_frame(cm)
    per_group.insert(0, "split", split)
    true_idx, pred_idx = np.indices(cm.shape)
    confusion = pd.DataFrame(
        {
            "split": split,
            "true_group": true_idx.ravel().astype(np.int8),
            "pred_group": pred_idx.ravel().astype(np.int8),
            "count": cm.ravel(),
        }
    )
    summary = pd.DataFrame([{"split": split, **summary_from_confusion(cm)}])
    frames = {
        "per_group": per_group,
        "confusion": confusion,
        "summary": summary,
        "performance": pd.DataFrame([dict(r) for r in performance]),
        "energy": pd.DataFrame([dict(r) for r in energy]),
    }
    out: dict[str, pd.DataFrame] = {}
    for name, frame in frames.items():
        schema = METRIC_SCHEMAS[name]
        frame = frame.copy()
        for key, value in keys.items():
            frame[key] = value
        frame["created_at"] = created
        out[name] = _conform(frame, schema, name)
    return out


def _conform(frame: pd.DataFrame, schema: pa.Schema, name: str) -> pd.DataFrame:
    """Columns in schema order; missing nullable columns filled with None; a missing required one raises."""
    data: dict[str, Any] = {}
    for field in schema:
        if field.name in frame.columns:
            data[field.name] = frame[field.name]
        elif field.nullable or len(frame) == 0:
            data[field.name] = [None] * len(frame)
        else:
            raise DataError(f"{name} table: missing required column {field.name!r}")
    return pd.DataFrame(data, index=range(len(frame)))


def to_arrow(name: str, frame: pd.DataFrame) -> pa.Table:
    """Cast one metric DataFrame to its documented schema (raises DataError naming the table)."""
    if name not in METRIC_SCHEMAS:
        raise DataError(f"metric table: unknown name {name!r}, expected one of {sorted(METRIC_SCHEMAS)}")
    schema = METRIC_SCHEMAS[name]
    frame = _conform(frame, schema, name)
    columns = []
    for field in schema:
        values = frame[field.name]
        try:
            if pa.types.is_dictionary(field.type):
                arr = pa.array(values.astype(object), type=pa.string()).dictionary_encode()
                arr = arr.cast(field.type)
            elif pa.types.is_timestamp(field.type):
                arr = pa.array(pd.to_datetime(values, utc=True), type=field.type)
            elif pa.types.is_integer(field.type):
                arr = pa.array(_integral(values, name, field.name), type=field.type)
            else:
                cleaned = values.astype(object).where(values.notna(), None)
                arr = pa.array(cleaned.tolist(), type=field.type, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as exc:
            raise DataError(f"{name} table: column {field.name!r} does not fit {field.type}: {exc}") from exc
        if not field.nullable and arr.null_count:
            raise DataError(f"{name} table: column {field.name!r} has {arr.null_count} missing values")
        columns.append(arr)
    return pa.Table.from_arrays(columns, schema=schema)


def _integral(values: pd.Series, table: str, column: str) -> list[int | None]:
    """Values as Python ints (None where missing); a fractional or non-numeric value raises DataError."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() & values.notna()
    floats = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    fractional = np.isfinite(floats) & (floats != np.round(floats))
    if bad.any() or fractional.any():
        example = values[bad | fractional].iloc[0]
        raise DataError(f"{table} table: column {column!r} needs whole numbers, got {example!r}")
    return [None if np.isnan(v) else int(v) for v in floats]


def metric_arrow_tables(frames: Mapping[str, pd.DataFrame]) -> dict[str, pa.Table]:
    """Arrow tables (with the documented schemas) for the lake's metric tables; empty tables are kept."""
    return {name: to_arrow(name, frame) for name, frame in frames.items()}
