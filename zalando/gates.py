"""Quality gates and the canary set: may a challenger replace the champion?

:func:`evaluate_gates` compares a challenger's metrics (built by :func:`gate_metrics` from
``zalando.evaluate``'s frames) with per-group floors on recall, precision and NPV, latency, size, canary
accuracy, a macro-F1 margin over the champion, (with held-out feedback items) accuracy on those
items not below the champion's, and (with shadow scoring) agreement with the champion and accuracy on
the reviewed items of the shadowed batches. The canary set (:func:`select_canary_set`) is a fixed
slice of the hardest One piece / Upper part look-alikes, committed once and scored by every challenger.
Pure numpy/pandas/pyarrow: the callers read inputs from the lake and write the results back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zalando.data.arrays import check_image_array
from zalando.errors import ConfigError, DataError
from zalando.labels import GROUP_NAMES, LABEL_NAMES, check_group_probs, group_index, group_of
from zalando.study import STUDY_BEST

if TYPE_CHECKING:  # the catalogue imports this module to check a profile's gates
    from zalando.models.experiments import ProfileParams

log = logging.getLogger(__name__)


class GroupFloors(BaseModel):
    """Minimum recall, precision and NPV of one group (compared at ``GateConfig.decimals`` places)."""

    model_config = ConfigDict(extra="forbid")
    recall: float = Field(ge=0.0, le=1.0)
    precision: float = Field(ge=0.0, le=1.0)
    npv: float = Field(ge=0.0, le=1.0)


# The study's best model (MobileNetV2 fully fine-tuned), per group, as printed with 2 decimals.
STUDY_FLOORS: dict[str, dict[str, float]] = STUDY_BEST


def _default_floors() -> dict[str, GroupFloors]:
    return {g: GroupFloors(**v) for g, v in STUDY_FLOORS.items()}


class GateConfig(BaseModel):
    """What a challenger must pass to be promoted.

    Floors are compared after rounding half-up to ``decimals`` places, like the study's table: with
    2 decimals a floor of 1.00 means "at least 0.995", so a Footwear recall of 0.9950 passes and
    0.9949 fails. (An exact 1.00 would fail any model that makes a single mistake on validation.)

    Champion margin: the challenger's macro F1 must be >= champion macro F1 + ``min_f1_margin``
    (not rounded). With the default 0.001 a tie fails; set 0.0 to let ties pass.

    Learning from feedback: a retrain on a dataset version with held-out feedback items learns what
    the reviewers corrected, and the original validation split, where the champion already does well,
    cannot show that. When the challenger's accuracy on those items beats the champion's by at least
    ``min_feedback_gain`` (default 0.01, on at least ``min_reviewed_items`` items), the macro-F1 rule
    becomes "grouped accuracy on the original validation split at most ``max_accuracy_drop_with_feedback``
    below the champion's" (default 0.002: the 0.2 points issue 15 allows; macro F1 when a record
    has no accuracy) instead of "macro F1 above it by the margin". The per-group floors, canary and
    latency gates apply as always, so no group may fall below the study.

    Feedback gate: when the dataset version holds feedback items held out to validate on
    (``feedback_val``, see ``zalando.data.feedback_data``), the challenger's group accuracy on them must
    be >= the champion's minus ``max_feedback_drop`` (default 0: must not drop). Off (no row) when there
    are no such items, no champion number, or ``max_feedback_drop`` is None.

    Shadow gates (issue 15), used only when the challenger was shadow-scored beside this champion
    (``zalando.scoring.shadow.shadow_evidence``, the metrics' ``shadow`` entry): its share of images
    put in the champion's group must be >= ``min_shadow_agreement`` (default None: reported, not
    gated; disagreeing is what a better model does on the champion's mistakes), and its accuracy on
    the reviewed items of those batches >= the champion's minus ``max_reviewed_accuracy_drop``
    (default 0: must not drop) once at least ``min_reviewed_items`` are reviewed (fewer: reported).
    Reviewed items lean towards doubtful ones, but both models are measured on the same items.
    """

    model_config = ConfigDict(extra="forbid")
    floors: dict[str, GroupFloors] = Field(default_factory=_default_floors)
    decimals: int = Field(default=2, ge=0, le=6)
    max_latency_ms_per_1000: float | None = Field(default=1000.0, gt=0)
    max_size_mb: float | None = Field(default=50.0, gt=0)
    min_f1_margin: float = Field(default=0.001, ge=0.0)
    canary_floor: float | None = Field(default=0.5, ge=0.0, le=1.0)
    max_canary_drop: float | None = Field(default=0.05, ge=0.0, le=1.0)
    max_feedback_drop: float | None = Field(default=0.0, ge=0.0, le=1.0)  # issue 15: feedback gate
    require_same_dataset: bool = True
    min_shadow_agreement: float | None = Field(default=None, ge=0.0, le=1.0)  # issue 15: shadow gates
    max_reviewed_accuracy_drop: float | None = Field(default=0.0, ge=0.0, le=1.0)
    min_reviewed_items: int = Field(default=20, ge=1)
    min_feedback_gain: float | None = Field(default=0.01, ge=0.0, le=1.0)  # None: never relax the margin
    max_accuracy_drop_with_feedback: float = Field(default=0.002, ge=0.0, le=1.0)

    @field_validator("floors", mode="before")
    @classmethod
    def _normalise_group_names(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {GROUP_NAMES[group_index(k)]: f for k, f in v.items()}
        return v

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> GateConfig:
        """A GateConfig from user settings (a profile's ``gates``, a flow parameter); a ConfigError of
        one line naming the bad field otherwise."""
        try:
            return cls.model_validate(dict(settings))
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"quality gate settings: {errors}") from None
        except (ConfigError, TypeError, ValueError) as exc:  # an unknown group, settings not a mapping
            raise ConfigError(f"quality gate settings: {str(exc).splitlines()[0]}") from None


def gate_config(profile: ProfileParams, overrides: Mapping[str, Any] | None = None) -> GateConfig:
    """The quality gates ``profile`` applies: GateConfig's defaults (every gate, the study's floors),
    changed by the profile's ``gates`` and then by ``overrides`` (GateConfig fields, e.g.
    ``{"min_f1_margin": 0.0}``)."""
    return GateConfig.from_mapping({**profile.gates, **dict(overrides or {})})


class GateDecision(BaseModel):
    """The outcome of :func:`evaluate_gates`: every number compared, and why it failed if it did."""

    promote: bool
    challenger_version: str | None = None
    champion_version: str | None = None
    rows: list[dict[str, Any]]
    reasons: list[str]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["check", "value", "threshold", "rule", "passed"])

    def to_markdown(self) -> str:
        """A Markdown table for a Prefect artifact or a report."""
        verdict = "PROMOTE" if self.promote else "REJECT"
        lines = [
            f"**Gate decision: {verdict}** challenger `{self.challenger_version}` "
            f"vs champion `{self.champion_version}`",
            "",
            "| check | value | rule | threshold | passed |",
            "| --- | ---: | :---: | ---: | :---: |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['check']} | {_fmt(r['value'])} | {r['rule']} | {_fmt(r['threshold'])} | "
                f"{'yes' if r['passed'] else '**no**'} |"
            )
        if self.reasons:
            lines += ["", *[f"- {r}" for r in self.reasons]]
        return "\n".join(lines)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _per_group_map(per_group: Any, who: str) -> dict[int, Mapping[str, Any]]:
    """Accept {group name/key: {recall, precision, npv, ...}}, a list of records or a DataFrame."""
    if per_group is None:
        return {}
    if isinstance(per_group, pd.DataFrame):
        per_group = per_group.to_dict("records")
    if isinstance(per_group, Mapping):
        return {group_index(k): v for k, v in per_group.items()}
    out: dict[int, Mapping[str, Any]] = {}
    for rec in per_group:
        gid = next((rec[c] for c in ("group_name", "group", "group_key") if c in rec), None)
        if gid is None:
            raise DataError(f"{who} per_group record {rec!r}: needs a group_name, group or group_key field")
        g = group_index(gid if not isinstance(gid, float) else int(gid))
        if g in out:
            raise DataError(
                f"{who} per_group: group {GROUP_NAMES[g]!r} appears twice (filter one split, e.g. 'val')"
            )
        out[g] = rec
    return out


def gate_metrics(
    per_group: pd.DataFrame,
    summary: pd.DataFrame,
    performance: pd.DataFrame | None = None,
    *,
    model_version: str,
    dataset_version: str,
    canary_accuracy: float | None = None,
    split: str = "val",
    feedback_accuracy: float | None = None,
    feedback_items: int = 0,
) -> dict[str, Any]:
    """Build the metric dict :func:`evaluate_gates` reads from ``zalando.evaluate``'s frames.

    ``feedback_accuracy`` / ``feedback_items``: group accuracy on the dataset version's held-out
    feedback items and how many (``zalando.data.feedback_data.feedback_holdout_metrics``).

    ``per_group`` and ``summary`` rows are filtered to ``split`` when they have a split column.
    Latency is that of the fastest runtime in ``performance`` (ms per 1,000 images =
    1e6 / images_per_s); size is that runtime's file (size_mb_onnx for "onnx", else size_mb_torch).
    """

    def pick(frame: pd.DataFrame, name: str) -> pd.DataFrame:
        if "split" in frame.columns:
            frame = frame[frame["split"] == split]
        if frame.empty:
            raise DataError(f"{name}: no rows for split {split!r}")
        return frame

    pg = pick(per_group, "per_group")
    sm = pick(summary, "summary")
    if len(sm) != 1 or "macro_f1" not in sm.columns:
        raise DataError(f"summary: expected one row with macro_f1 for split {split!r}, got {len(sm)} rows")
    out: dict[str, Any] = {
        "model_version": model_version,
        "dataset_version": dataset_version,
        "split": split,
        "per_group": {
            GROUP_NAMES[group_index(r["group_name"])]: {
                k: _num(r.get(k)) for k in ("recall", "precision", "npv", "f1", "support")
            }
            for r in pg.to_dict("records")
        },
        "macro_f1": _num(sm["macro_f1"].iloc[0]),
        "accuracy": _num(sm["accuracy"].iloc[0]) if "accuracy" in sm.columns else None,
        "latency_ms_per_1000": None,
        "size_mb": None,
        "runtime": None,
        "canary_accuracy": canary_accuracy,
        "feedback_accuracy": feedback_accuracy,
        "feedback_items": int(feedback_items),
    }
    if performance is not None and len(performance) and "images_per_s" in performance.columns:
        perf = performance[performance["images_per_s"].astype(float) > 0]
        if len(perf):
            best = perf.loc[perf["images_per_s"].astype(float).idxmax()].to_dict()
            out["runtime"] = best.get("runtime")
            out["latency_ms_per_1000"] = 1e6 / float(best["images_per_s"])
            size_cols = (
                ("size_mb_onnx", "size_mb_torch") if best.get("runtime") == "onnx" else ("size_mb_torch",)
            )
            out["size_mb"] = next(
                (_num(best.get(c)) for c in size_cols if _num(best.get(c)) is not None), None
            )
    return out


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


class _Checks:
    """The rows of a gate decision, and the reason of every failed one."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.reasons: list[str] = []

    def add(
        self, check: str, value: float | None, threshold: float | None, rule: str, passed: bool, why: str
    ) -> None:
        self.rows.append(
            {"check": check, "value": value, "threshold": threshold, "rule": rule, "passed": passed}
        )
        if not passed:
            self.reasons.append(why)


def _check_floors(checks: _Checks, per_group: dict[int, Mapping[str, Any]], config: GateConfig) -> None:
    """Recall, precision and NPV of every group with a floor, rounded half-up to ``config.decimals``."""
    half = 0.5 * 10.0 ** (-config.decimals)
    for gname, floors in config.floors.items():
        metrics = per_group.get(group_index(gname), {})
        for metric in ("recall", "precision", "npv"):
            floor = getattr(floors, metric)
            value = _num(metrics.get(metric))
            # rounding half-up to `decimals` places, then >= floor, without float-rounding surprises
            passed = value is not None and value + 1e-12 >= floor - half
            why = (
                f"{gname} {metric} {'missing' if value is None else f'{value:.4f}'} "
                f"below floor {floor:.{config.decimals}f}"
            )
            checks.add(f"{metric}[{gname}]", value, floor, f">= ({config.decimals} dp)", passed, why)


def _check_latency_and_size(checks: _Checks, challenger: Mapping[str, Any], config: GateConfig) -> None:
    if config.max_latency_ms_per_1000 is not None:
        v = _num(challenger.get("latency_ms_per_1000"))
        thr = config.max_latency_ms_per_1000
        checks.add(
            "latency_ms_per_1000", v, thr, "<=", v is not None and v <= thr,
            f"latency {'missing' if v is None else f'{v:.1f} ms'} per 1,000 images above {thr:.1f} ms",
        )  # fmt: skip
    if config.max_size_mb is not None:
        v = _num(challenger.get("size_mb"))
        thr = config.max_size_mb
        checks.add(
            "size_mb", v, thr, "<=", v is not None and v <= thr,
            f"model size {'missing' if v is None else f'{v:.2f} MB'} above {thr:.2f} MB",
        )  # fmt: skip


def _check_canary(
    checks: _Checks, challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, config: GateConfig
) -> None:
    """Canary accuracy above its floor, and not more than ``max_canary_drop`` below the champion's."""
    canary = _num(challenger.get("canary_accuracy"))
    if config.canary_floor is not None:
        thr = config.canary_floor
        checks.add(
            "canary_accuracy", canary, thr, ">=", canary is not None and canary >= thr,
            f"canary accuracy {'missing' if canary is None else f'{canary:.4f}'} below floor {thr:.4f}",
        )  # fmt: skip
    champ_canary = _num(champion.get("canary_accuracy")) if champion else None
    if config.max_canary_drop is not None and champ_canary is not None:
        thr = champ_canary - config.max_canary_drop
        checks.add(
            "canary_accuracy_vs_champion", canary, thr, ">=", canary is not None and canary >= thr - 1e-12,
            f"canary accuracy {'missing' if canary is None else f'{canary:.4f}'} dropped more than "
            f"{config.max_canary_drop:.4f} below the champion's {champ_canary:.4f}",
        )  # fmt: skip


def _check_feedback(
    checks: _Checks, challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, config: GateConfig
) -> None:
    """Accuracy on the held-out feedback items not more than ``max_feedback_drop`` below the champion's
    (both measured on the same items: the challenger's dataset version)."""
    n = int(challenger.get("feedback_items") or 0)
    champ = _num(champion.get("feedback_accuracy")) if champion else None
    if config.max_feedback_drop is None or n == 0 or champ is None:
        if n and champion is not None and champ is None:
            log.warning(
                "feedback gate off: the champion has no accuracy on the %d held-out feedback items", n
            )
        return
    acc = _num(challenger.get("feedback_accuracy"))
    thr = champ - config.max_feedback_drop
    checks.add(
        "feedback_accuracy_vs_champion", acc, thr, ">=", acc is not None and acc >= thr - 1e-12,
        f"accuracy on the {n} held-out feedback items {'missing' if acc is None else f'{acc:.4f}'} is "
        f"more than {config.max_feedback_drop:.4f} below the champion's {champ:.4f}",
    )  # fmt: skip


def _check_shadow(
    checks: _Checks, challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, config: GateConfig
) -> None:
    """Agreement with the champion on the batches the challenger shadowed, and accuracy on their
    reviewed items not below the champion's; rows say which images they used. Nothing without
    shadow evidence beside this champion."""
    ev = challenger.get("shadow")
    if not ev:
        return
    if champion is None:
        return
    champ_version = champion.get("model_version") or ev.get("champion_version")  # unnamed: as measured
    if ev.get("champion_version") != champ_version:
        log.info(
            "shadow evidence of %s was measured beside %s, not the champion %s: not used",
            challenger.get("model_version"), ev.get("champion_version"), champ_version,
        )  # fmt: skip
        return
    used = f"{int(ev.get('items') or 0)} images of {len(ev.get('batches') or [])} shadowed batch(es)"
    rate, floor = _num(ev.get("agreement")), config.min_shadow_agreement
    if floor is None:
        checks.add("shadow_agreement", rate, None, f"reported ({used})", True, "")
    else:
        checks.add(
            "shadow_agreement", rate, floor, f">= ({used})", rate is not None and rate >= floor - 1e-12,
            f"shadow agreement with the champion {_fmt(rate)} below {floor:.4f} ({used})",
        )  # fmt: skip
    n = int(ev.get("reviewed_items") or 0)
    if n == 0:
        return
    acc, champ_acc = _num(ev.get("challenger_reviewed_accuracy")), _num(ev.get("champion_reviewed_accuracy"))
    drop = config.max_reviewed_accuracy_drop
    if drop is None or n < config.min_reviewed_items or champ_acc is None:
        why = "gate off" if drop is None else f"fewer than {config.min_reviewed_items} needed"
        rule = f"reported ({n} reviewed items; {why})"
        checks.add("reviewed_accuracy_vs_champion", acc, champ_acc, rule, True, "")
        return
    thr = champ_acc - drop
    checks.add(
        "reviewed_accuracy_vs_champion", acc, thr, f">= champion - {drop:g} ({n} reviewed items)",
        acc is not None and acc >= thr - 1e-12,
        f"accuracy on the {n} reviewed items of its shadowed batches {_fmt(acc)} is more than "
        f"{drop:.4f} below the champion's {champ_acc:.4f}",
    )  # fmt: skip


def _check_champion_margin(
    checks: _Checks, challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, config: GateConfig
) -> None:
    """Macro F1 beats the champion's by ``min_f1_margin``, both measured on the same dataset."""
    f1 = _num(challenger.get("macro_f1"))
    if champion is None:
        checks.add(
            "macro_f1_vs_champion", f1, None, "no champion", f1 is not None, "challenger macro F1 missing"
        )
        return
    champ_f1 = _num(champion.get("macro_f1"))
    ds_c, ds_ch = challenger.get("dataset_version"), champion.get("dataset_version")
    if config.require_same_dataset and ds_c and ds_ch and ds_c != ds_ch:
        checks.add(
            "macro_f1_vs_champion", f1, None, "same data", False,
            f"champion macro F1 was measured on dataset {ds_ch!r}, the challenger's on {ds_c!r}: "
            "evaluate the champion on the same validation data",
        )  # fmt: skip
        return
    gain = _feedback_gain(challenger, champion, config)
    if gain is not None:
        acc, champ_acc = _num(challenger.get("accuracy")), _num(champion.get("accuracy"))
        name, value, ref, what = "accuracy_vs_champion", acc, champ_acc, "grouped accuracy"
        if champ_acc is None:
            name, value, ref, what = "macro_f1_vs_champion", f1, champ_f1, "macro F1"
        if ref is not None:
            drop = config.max_accuracy_drop_with_feedback
            thr = ref - drop
            checks.add(
                name, value, thr, f">= champion - {drop:g} (feedback items +{gain:.4f})",
                value is not None and value >= thr - 1e-12,
                f"{what} {_fmt(value)} is more than {drop:g} below the champion's {ref:.4f} "
                f"(allowed because it gains {gain:.4f} on the held-out feedback items)",
            )  # fmt: skip
            return
    thr = None if champ_f1 is None else champ_f1 + config.min_f1_margin
    passed = f1 is not None and thr is not None and f1 >= thr - 1e-12
    if config.min_f1_margin > 0 and f1 is not None and champ_f1 is not None and f1 <= champ_f1:
        passed = False  # a tie never "beats by a margin", whatever float rounding says
    checks.add(
        "macro_f1_vs_champion", f1, thr, f">= champion + {config.min_f1_margin:g}", passed,
        f"macro F1 {_fmt(f1)} does not beat the champion's {_fmt(champ_f1)} "
        f"by {config.min_f1_margin:g}",
    )  # fmt: skip


def _feedback_gain(
    challenger: Mapping[str, Any], champion: Mapping[str, Any], config: GateConfig
) -> float | None:
    """The challenger's accuracy gain over the champion on the held-out feedback items, when it is at
    least ``min_feedback_gain`` on enough items (then the macro-F1 margin is relaxed); else None."""
    n = int(challenger.get("feedback_items") or 0)
    acc, champ = _num(challenger.get("feedback_accuracy")), _num(champion.get("feedback_accuracy"))
    if config.min_feedback_gain is None or n < config.min_reviewed_items or acc is None or champ is None:
        return None
    gain = acc - champ
    return gain if gain >= config.min_feedback_gain - 1e-12 else None


def evaluate_gates(
    challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, config: GateConfig | None = None
) -> GateDecision:
    """Decide whether ``challenger`` may replace ``champion``; a missing metric fails its check.

    Metric dicts (the same shape that :func:`zalando.registry.register_model` stores)::

        {"model_version": str, "dataset_version": str,
         "per_group": {"Upper part": {"recall": .97, "precision": .98, "npv": .99}, ...},
         "macro_f1": float, "latency_ms_per_1000": float, "size_mb": float,
         "canary_accuracy": float, "feedback_accuracy": float | None, "feedback_items": int,
         "shadow": zalando.scoring.shadow.ShadowEvidence as a dict (optional)}

    ``per_group`` may also be a list of records or a DataFrame with a ``group_name`` column. The
    champion's numbers must come from the same validation data (same ``dataset_version``).
    """
    config = config or GateConfig()
    checks = _Checks()
    _check_floors(checks, _per_group_map(challenger.get("per_group"), "challenger"), config)
    _check_latency_and_size(checks, challenger, config)
    _check_canary(checks, challenger, champion, config)
    _check_feedback(checks, challenger, champion, config)
    _check_shadow(checks, challenger, champion, config)
    _check_champion_margin(checks, challenger, champion, config)
    decision = GateDecision(
        promote=all(r["passed"] for r in checks.rows),
        challenger_version=challenger.get("model_version"),
        champion_version=champion.get("model_version") if champion else None,
        rows=checks.rows,
        reasons=checks.reasons,
    )
    log.info(
        "gates for %s vs %s: %s (%d/%d checks passed)",
        decision.challenger_version,
        decision.champion_version,
        "promote" if decision.promote else "reject",
        sum(r["passed"] for r in checks.rows),
        len(checks.rows),
    )
    return decision


# ---------------------------------------------------------------------------------------------- canary set

UPPER, ONE_PIECE = GROUP_NAMES.index("Upper part"), GROUP_NAMES.index("One piece")


def _pooled_features(images: np.ndarray) -> np.ndarray:
    """7x7 average-pooled pixels / 255: a cheap, deterministic 49-d shape descriptor."""
    x = images.reshape(len(images), 7, 4, 7, 4).astype(np.float32)
    return x.mean(axis=(2, 4)).reshape(len(images), 49) / 255.0


def _look_alike_margins(
    images: np.ndarray, groups: np.ndarray, group_probs: np.ndarray | None
) -> tuple[np.ndarray, str]:
    """Per candidate: how much closer it is to its own group than to the look-alike one, and how measured.

    ``groups`` are Upper part or One piece only; ``group_probs`` (the same rows) come from a reference
    model, or are None for the nearest-centroid rule on pooled pixels.
    """
    other = np.where(groups == UPPER, ONE_PIECE, UPPER)
    if group_probs is not None:
        rows = np.arange(len(groups))
        return group_probs[rows, groups] - group_probs[rows, other], "reference_model"
    f = _pooled_features(images)
    cu, co = f[groups == UPPER].mean(0), f[groups == ONE_PIECE].mean(0)
    du, do = np.linalg.norm(f - cu, axis=1), np.linalg.norm(f - co, axis=1)
    d_own = np.where(groups == UPPER, du, do)
    d_other = np.where(groups == UPPER, do, du)
    return (d_other - d_own) / np.maximum(d_other + d_own, 1e-12), "pixel_centroid"


def _hardest(groups: np.ndarray, margin: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` lowest-margin candidates, half One piece and half Upper part, lowest first."""
    picked: list[np.ndarray] = []
    want = {ONE_PIECE: n // 2, UPPER: n - n // 2}
    by_group = {grp: np.flatnonzero(groups == grp) for grp in want}
    for grp in (ONE_PIECE, UPPER):
        idx = by_group[grp][np.argsort(margin[by_group[grp]], kind="stable")]
        picked.append(idx[: want[grp]])
    short = n - sum(len(p) for p in picked)
    if short > 0:  # one group has too few images: fill from the other's next hardest
        for k, grp in enumerate((ONE_PIECE, UPPER)):
            idx = by_group[grp][np.argsort(margin[by_group[grp]], kind="stable")]
            extra = idx[len(picked[k]) : len(picked[k]) + short]
            picked[k] = np.concatenate([picked[k], extra])
            short -= len(extra)
        if short > 0:
            log.warning("canary set: only %d candidates, wanted %d", n - short, n)
    sel = np.concatenate(picked)
    return sel[np.argsort(margin[sel], kind="stable")]


def select_canary_set(
    val_images: np.ndarray,
    val_labels: np.ndarray,
    val_group_probs: np.ndarray | None = None,
    n: int = 200,
    *,
    image_ids: list[str] | np.ndarray | None = None,
) -> pa.Table:
    """The hardest One piece / Upper part look-alikes of the validation split, half from each group.

    Hardness is the margin p(true group) - p(the look-alike group) under a reference model's
    ``val_group_probs``; without a model, the same margin under a nearest-centroid rule on 7x7 pooled
    pixels (deterministic). Lowest margin first. Returns an Arrow table in the raw schema (image_id,
    image, label, label_name, group, group_name) plus val_index, margin and method, for the caller
    to commit to the lake once and reuse every night.
    """
    x = check_image_array(val_images, "val_images")
    y = np.asarray(val_labels)
    if y.shape != (len(x),):
        raise DataError(f"val_labels: expected shape ({len(x)},) to match val_images, got {y.shape}")
    if n < 2:
        raise DataError(f"canary size n: must be >= 2, got {n}")
    g = group_of(y)
    cand = np.flatnonzero((g == UPPER) | (g == ONE_PIECE))
    if not (g[cand] == UPPER).any() or not (g[cand] == ONE_PIECE).any():
        raise DataError("val_labels: the canary set needs both Upper part and One piece images")
    probs = None
    if val_group_probs is not None:
        probs = check_group_probs(val_group_probs, len(x), "val_group_probs")[cand]
    margin, method = _look_alike_margins(x[cand], g[cand], probs)
    sel = _hardest(g[cand], margin, n)
    vi = cand[sel]
    if image_ids is not None and len(image_ids) != len(x):
        raise DataError(f"image_ids: expected {len(x)} ids to match val_images, got {len(image_ids)}")
    ids = (
        [f"val-{i:05d}" for i in vi]
        if image_ids is None
        else [str(s) for s in np.asarray(image_ids, dtype=object)[vi]]
    )
    labels = y[vi].astype(np.int8)
    groups = g[vi].astype(np.int8)
    log.info(
        "canary set: %d images (%s), margin %.3f..%.3f", len(vi), method, margin[sel].min(), margin[sel].max()
    )
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "image": pa.array([x[i].tobytes() for i in vi], pa.binary(784)),
            "label": pa.array(labels, pa.int8()),
            "label_name": pa.array([LABEL_NAMES[i] for i in labels], pa.string()),
            "group": pa.array(groups, pa.int8()),
            "group_name": pa.array([GROUP_NAMES[i] for i in groups], pa.string()),
            "val_index": pa.array(vi.astype(np.int32), pa.int32()),
            "margin": pa.array(margin[sel].astype(np.float32), pa.float32()),
            "method": pa.array([method] * len(vi), pa.string()),
        }
    )


def canary_accuracy(group_probs: np.ndarray, true_groups: np.ndarray) -> float:
    """Group accuracy on the canary set (``true_groups`` is the table's ``group`` column)."""
    t = np.asarray(true_groups).astype(np.int64)
    if t.ndim != 1 or len(t) == 0:
        raise DataError(f"true_groups: expected a non-empty 1-d array, got shape {t.shape}")
    p = check_group_probs(group_probs, len(t), "canary group_probs")
    return float((p.argmax(axis=1) == t).mean())
