"""Reporting step: the study's report of one training run (Markdown + PNGs) in ``reports/run_id=…/``.

It reads back what the run committed (every evaluated model's rows of the metric tables and its
test probabilities, the bundles' histories and model cards) and renders it with :mod:`zalando.report`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel

from zalando.errors import DataError
from zalando.lake import Lake
from zalando.lake.keys import bundle_key, report_key
from zalando.steps.training import Evaluation, read_metric_tables

log = logging.getLogger(__name__)


class RunReport(BaseModel):
    """Where the run's report is, its files, and its display tables (for Prefect artifacts)."""

    key: str
    uri: str
    report_uri: str
    files: dict[str, str]  # file name -> URI
    tables: dict[str, list[dict[str, Any]]]  # display table name -> rows


@dataclass
class _Figures:
    """What the report draws per experiment, read back from the lake."""

    probs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (labels, group probs)
    curves: dict[str, Any] = field(default_factory=dict)
    label_group: dict[str, Any] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    cards: list[dict[str, Any]] = field(default_factory=list)


def write_run_report(
    lake: Lake, run_id: str, evaluations: Sequence[Evaluation], champion: str | None
) -> RunReport:
    """The study's report for this run in ``reports/run_id=…/``: tables of every registered
    evaluation, and the gallery and Grad-CAM maps of the champion (or else the best model)."""
    from zalando.report import build_run_report, display_tables

    evaluations = [e for e in evaluations if e.registered and e.eval_key]  # the registered ones
    if not evaluations:
        raise DataError(f"report for run {run_id}: no evaluated model")
    tables = _metric_tables_of(lake, evaluations)
    figures = _per_model_figures(lake, evaluations)
    # the gallery and Grad-CAM maps of the champion if it was evaluated tonight, else the best model
    focus = next((e for e in evaluations if e.model_version == champion), None) or max(
        evaluations, key=lambda e: e.gate_metrics.get("macro_f1") or 0.0
    )
    worst, gradcams = _focus_figures(lake, focus, figures.probs[focus.experiment])
    files = build_run_report(
        run_id,
        tables["per_group"],
        performance=tables["performance"],
        energy=tables["energy"],
        confusion=tables["confusion"],
        pr_curves=figures.curves,
        histories=figures.histories,
        worst_one_piece=worst,
        gradcam_pngs=gradcams,
        summary=tables["summary"],
        label_group=figures.label_group,
        champion=champion,
        models=figures.cards,
    )
    key = report_key(run_id)
    lake.commit_files(key, files, run_id, extra={"champion": champion, "focus": focus.model_version})
    display = display_tables(tables["per_group"], tables["performance"], tables["energy"], tables["summary"])
    return RunReport(
        key=key,
        uri=lake.uri(key),
        report_uri=lake.uri(f"{key}/report.md"),
        files={name: lake.uri(f"{key}/{name}") for name in sorted(files)},
        tables={name: json.loads(df.to_json(orient="records")) for name, df in display.items()},
    )


def _metric_tables_of(lake: Lake, evaluations: Sequence[Evaluation]) -> dict[str, Any]:
    """Each metric table's rows of these evaluations, in their order (one scan per run and table)."""
    import pandas as pd

    runs: dict[str, list[str]] = {}
    for e in evaluations:
        runs.setdefault(e.run_id, []).append(e.experiment)
    per_run = [read_metric_tables(lake, run_id, experiments) for run_id, experiments in runs.items()]
    out = {}
    for name in per_run[0]:
        frames = [t[name] for t in per_run]
        df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        order = {(e.run_id, e.experiment): i for i, e in enumerate(evaluations)}
        rank = [order[(r, x)] for r, x in zip(df["run_id"], df["experiment"], strict=True)]
        out[name] = df.assign(_order=rank).sort_values("_order", kind="stable").drop(columns="_order")
        out[name] = out[name].reset_index(drop=True)
    return out


def _read_probs(lake: Lake, key: str) -> tuple[np.ndarray, np.ndarray]:
    t = lake.read_partition(key)
    probs = np.asarray(t.column("group_probs").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    return t.column("label").to_numpy().astype(np.int64), probs.reshape(t.num_rows, -1)


def _per_model_figures(lake: Lake, evaluations: Sequence[Evaluation]) -> _Figures:
    """Per experiment: test probabilities, PR curves, label x group matrix, training history; the model cards."""
    from zalando.evaluate import label_group_matrix, pr_curves, predicted_groups
    from zalando.labels import group_of

    out = _Figures()
    for e in evaluations:
        labels, probs = _read_probs(lake, str(e.eval_key))
        out.probs[e.experiment] = (labels, probs)
        out.curves[e.experiment] = pr_curves(group_of(labels), probs)
        out.label_group[e.experiment] = label_group_matrix(labels, predicted_groups(probs))
        bkey = bundle_key(e.experiment, e.model_version)
        meta = json.loads(lake.read_file(bkey, "bundle.json"))
        out.histories[e.experiment] = meta.get("history", [])
        out.cards.append(json.loads(lake.read_file(bkey, "model_card.json")))
    return out


def _focus_figures(
    lake: Lake, focus: Evaluation, labelled_probs: tuple[np.ndarray, np.ndarray]
) -> tuple[Any, dict[str, bytes]]:
    """The worst One piece mistakes of the focus model, and Grad-CAM maps of its confused pairs."""
    from zalando.data.arrays import images_from_table
    from zalando.data.ingest import load_raw
    from zalando.evaluate import worst_mistakes
    from zalando.gradcam import confused_pair_gradcams
    from zalando.labels import GROUP_NAMES, group_of
    from zalando.models.bundle import load_bundle
    from zalando.report import worst_one_piece_items

    labels, probs = labelled_probs
    images = images_from_table(load_raw(lake, "test", columns=["image"]))
    one_piece = GROUP_NAMES.index("One piece")
    worst = worst_one_piece_items(images, labels, probs, worst_mistakes(group_of(labels), probs, one_piece))
    try:
        bundle = load_bundle(lake, focus.experiment, focus.model_version)
        gradcams = confused_pair_gradcams(
            bundle.scoring_model(), images, group_of(labels), probs, y_true_label=labels
        )
    except (DataError, ValueError, RuntimeError) as exc:  # an architecture Grad-CAM cannot hook
        log.warning("Grad-CAM skipped for %s: %s", focus.model_version, exc)
        gradcams = {}
    return worst, gradcams
