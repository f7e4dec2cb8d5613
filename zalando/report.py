"""The study's report for one run: Markdown tables and PNG figures, as bytes ready for the lake.

:func:`build_run_report` returns ``{"report.md": ..., "confusion_<exp>.png": ..., "pr_<exp>.png": ...,
"training_curves.png": ..., "worst_one_piece.png": ..., "gradcam_<...>.png": ...}`` for
``lake.commit_files(zalando.lake.keys.report_key(run_id), files, run_id)``. :func:`display_tables` gives the
same tables as DataFrames (for Prefect table artifacts: ``df.to_dict("records")``) and
:func:`render_tables` prints them with rich for the CLI.

The figures themselves are drawn in :mod:`zalando.figures` (the Agg canvas: no pyplot, no global
backend switch, no GUI, safe in worker threads).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from zalando.errors import DataError
from zalando.evaluate import summary_from_counts
from zalando.figures import confusion_png, gallery_png, pr_png, training_curves_png
from zalando.labels import GROUP_NAMES, LABEL_NAMES, NUM_GROUPS
from zalando.study import STUDY_BEST, STUDY_SCORING

if TYPE_CHECKING:
    from rich.console import Console

logger = logging.getLogger(__name__)

STUDY_REFERENCE_NAME = "study best (reference)"
STUDY_REFERENCE: dict[str, dict[str, float]] = STUDY_BEST
"""Per-group recall / precision / NPV of the study's best model on the test split (two decimals)."""


NA = "–"


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


def markdown_table(
    df: pd.DataFrame, formats: Mapping[str, str] | None = None, float_format: str = ".3f"
) -> str:
    """A GitHub-flavoured Markdown table (no tabulate needed). Missing values print as '–'.

    ``formats`` maps a column to a format spec (e.g. ``{"energy_kwh": ".3g"}``); other float columns use
    ``float_format``. Numeric columns are right-aligned; ``|`` in cells is escaped.
    """
    formats = dict(formats or {})
    headers = [str(c) for c in df.columns]
    numeric = [
        pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns
    ]
    rows = []
    for values in df.itertuples(index=False, name=None):
        cells = []
        for column, value in zip(df.columns, values, strict=True):
            cells.append(_cell(value, formats.get(str(column), float_format)))
        rows.append(cells)
    out = ["| " + " | ".join(_escape(h) for h in headers) + " |"]
    out.append("| " + " | ".join("---:" if n else "---" for n in numeric) + " |")
    out.extend("| " + " | ".join(_escape(c) for c in r) + " |" for r in rows)
    return "\n".join(out) + "\n"


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)) or value is pd.NA:
        return NA
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return f"{int(value):,}" if spec in (",", ",d") else str(int(value))
    if isinstance(value, float | np.floating):
        return format(float(value), spec)
    if isinstance(value, pd.Timestamp | datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _test_split(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the test split when a split column is present (else all rows)."""
    if "split" in frame.columns and (frame["split"] == "test").any():
        return frame[frame["split"] == "test"]
    return frame


def _experiments(*frames: pd.DataFrame | None) -> list[str]:
    seen: dict[str, None] = {}
    for frame in frames:
        if frame is not None and "experiment" in frame.columns:
            for e in frame["experiment"].astype(str):
                seen.setdefault(e, None)
    return list(seen)


def per_group_display(per_group: pd.DataFrame) -> pd.DataFrame:
    """Group x experiment with recall / precision / NPV / F1, the study's best model first in each group."""
    _require(per_group, "per_group", ["experiment", "group", "recall", "precision", "npv"])
    pg = _test_split(per_group).copy()
    pg["experiment"] = pg["experiment"].astype(str)
    rows = []
    for g, name in enumerate(GROUP_NAMES):
        ref = STUDY_REFERENCE[name]
        rows.append(
            {
                "Group": name,
                "Model": STUDY_REFERENCE_NAME,
                "Recall": ref["recall"],
                "Precision": ref["precision"],
                "NPV": ref["npv"],
                "F1": np.nan,
                "Support": pd.NA,
            }
        )
        for _, r in pg[pg["group"].astype(int) == g].iterrows():
            rows.append(
                {
                    "Group": name,
                    "Model": r["experiment"],
                    "Recall": r["recall"],
                    "Precision": r["precision"],
                    "NPV": r["npv"],
                    "F1": r.get("f1", np.nan),
                    "Support": r.get("support", pd.NA),
                }
            )
    return _typed(pd.DataFrame(rows), ints=["Support"], floats=["Recall", "Precision", "NPV", "F1"])


def summary_display(per_group: pd.DataFrame, summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per experiment: accuracy and macro / weighted F1 (from the summary table, or the counts)."""
    rows = []
    if summary is not None and not summary.empty:
        for _, r in _test_split(summary).iterrows():
            rows.append(
                {
                    "Experiment": str(r["experiment"]),
                    "Model version": r.get("model_version", NA),
                    "Accuracy": r["accuracy"],
                    "Macro recall": r["macro_recall"],
                    "Macro precision": r["macro_precision"],
                    "Macro F1": r["macro_f1"],
                    "Weighted F1": r["weighted_f1"],
                    "Images": r["n"],
                }
            )
        return _typed(pd.DataFrame(rows), ints=["Images"])
    _require(per_group, "per_group", ["experiment", "tp", "fp", "fn"])
    pg = _test_split(per_group)
    for experiment in _experiments(pg):
        e = pg[pg["experiment"].astype(str) == experiment].sort_values("group")
        s = summary_from_counts(e["tp"], e["fp"], e["fn"])
        version = str(e["model_version"].iloc[0]) if "model_version" in e else NA
        rows.append(
            {
                "Experiment": experiment,
                "Model version": version,
                "Accuracy": s["accuracy"],
                "Macro recall": s["macro_recall"],
                "Macro precision": s["macro_precision"],
                "Macro F1": s["macro_f1"],
                "Weighted F1": s["weighted_f1"],
                "Images": s["n"],
            }
        )
    return _typed(pd.DataFrame(rows), ints=["Images"])


def performance_display(performance: pd.DataFrame | None) -> pd.DataFrame:
    """Parameters, sizes and timed scoring per experiment and runtime, with the study's GPU time first."""
    ref = {
        "Experiment": STUDY_REFERENCE_NAME,
        "Runtime": STUDY_SCORING["device"],
        "Params (M)": np.nan,
        "Torch MB": np.nan,
        "ONNX MB": np.nan,
        "Batch": pd.NA,
        "Images": STUDY_SCORING["n_images"],
        "Wall s": STUDY_SCORING["wall_s"],
        "Images/s": STUDY_SCORING["n_images"] / STUDY_SCORING["wall_s"],
        "p50 ms": np.nan,
        "p95 ms": np.nan,
    }
    rows = [ref]
    if performance is not None:
        for _, r in performance.iterrows():
            params = r.get("params")
            rows.append(
                {
                    "Experiment": str(r["experiment"]),
                    "Runtime": r.get("runtime", NA),
                    "Params (M)": np.nan if pd.isna(params) else float(params) / 1e6,
                    "Torch MB": r.get("size_mb_torch", np.nan),
                    "ONNX MB": r.get("size_mb_onnx", np.nan),
                    "Batch": r.get("batch_size", pd.NA),
                    "Images": r.get("n_images", pd.NA),
                    "Wall s": r.get("wall_s", np.nan),
                    "Images/s": r.get("images_per_s", np.nan),
                    "p50 ms": r.get("p50_ms", np.nan),
                    "p95 ms": r.get("p95_ms", np.nan),
                }
            )
    return _typed(
        pd.DataFrame(rows),
        ints=["Batch", "Images"],
        floats=["Params (M)", "Torch MB", "ONNX MB", "Wall s", "Images/s", "p50 ms", "p95 ms"],
    )


def energy_display(energy: pd.DataFrame | None) -> pd.DataFrame:
    """Power, energy and emissions per experiment and phase, with how the power was obtained."""
    columns = [
        "Experiment",
        "Phase",
        "Duration s",
        "CPU W",
        "GPU W",
        "RAM W",
        "Energy kWh",
        "CO2e kg",
        "kWh / 1000 images",
        "Power method",
    ]
    if energy is None or energy.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for _, r in energy.iterrows():
        rows.append(
            dict(
                zip(
                    columns,
                    [
                        str(r["experiment"]),
                        r.get("label", NA),
                        r.get("duration_s"),
                        r.get("cpu_power_w"),
                        r.get("gpu_power_w"),
                        r.get("ram_power_w"),
                        r.get("energy_kwh"),
                        r.get("emissions_kg"),
                        r.get("kwh_per_1000_images"),
                        r.get("power_method", NA),
                    ],
                    strict=True,
                )
            )
        )
    return _typed(pd.DataFrame(rows, columns=columns), floats=columns[2:-1])


def _typed(frame: pd.DataFrame, ints: Sequence[str] = (), floats: Sequence[str] = ()) -> pd.DataFrame:
    """Nullable Int64 / float64 display columns, so missing cells print as '–' and numbers align right."""
    for column in ints:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").round().astype("Int64")
    for column in floats:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


DISPLAY_FORMATS: dict[str, str] = {
    "Params (M)": ".2f",
    "Torch MB": ".2f",
    "ONNX MB": ".2f",
    "Wall s": ".2f",
    "Images/s": ",.0f",
    "p50 ms": ".1f",
    "p95 ms": ".1f",
    "Duration s": ".1f",
    "CPU W": ".1f",
    "GPU W": ".1f",
    "RAM W": ".1f",
    "Energy kWh": ".3g",
    "CO2e kg": ".3g",
    "kWh / 1000 images": ".3g",
}


def display_tables(
    per_group: pd.DataFrame,
    performance: pd.DataFrame | None = None,
    energy: pd.DataFrame | None = None,
    summary: pd.DataFrame | None = None,
) -> dict[str, pd.DataFrame]:
    """The report's tables as DataFrames: per_group, summary, performance, energy (for artifacts and the CLI)."""
    return {
        "per_group": per_group_display(per_group),
        "summary": summary_display(per_group, summary),
        "performance": performance_display(performance),
        "energy": energy_display(energy),
    }


def render_tables(console: Console, tables: Mapping[str, pd.DataFrame], title_prefix: str = "") -> None:
    """Print display tables (from :func:`display_tables`) as rich tables on ``console``."""
    from rich.table import Table

    for name, frame in tables.items():
        table = Table(title=f"{title_prefix}{name.replace('_', ' ')}", show_lines=False)
        for column in frame.columns:
            numeric = pd.api.types.is_numeric_dtype(frame[column])
            table.add_column(str(column), justify="right" if numeric else "left")
        for values in frame.itertuples(index=False, name=None):
            table.add_row(
                *(
                    _cell(v, DISPLAY_FORMATS.get(str(c), ".3f"))
                    for c, v in zip(frame.columns, values, strict=True)
                )
            )
        console.print(table)


def _require(frame: pd.DataFrame, name: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{name} table: missing column(s) {missing}")


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """A file-name-safe form of an experiment name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "unnamed"


def build_run_report(
    run_id: str,
    per_group: pd.DataFrame,
    performance: pd.DataFrame | None = None,
    energy: pd.DataFrame | None = None,
    confusion: pd.DataFrame | None = None,
    pr_curves: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    worst_one_piece: Sequence[tuple[np.ndarray, int, np.ndarray]] | None = None,
    gradcam_pngs: Mapping[str, bytes] | None = None,
    summary: pd.DataFrame | None = None,
    label_group: Mapping[str, np.ndarray] | None = None,
    champion: str | None = None,
    created_at: datetime | None = None,
    models: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, bytes]:
    """Markdown report plus PNGs of one run, as {file name: bytes}; see the module docstring.

    Inputs are the lake's metric tables over all experiments of the run (``experiment`` column), PR curves
    from ``zalando.evaluate.pr_curves`` (a dict per experiment, or one frame with an ``experiment``
    column), histories per experiment (list of per-epoch dicts), the worst One piece mistakes as
    (image uint8 28x28, true label id, group probs (5,)), and Grad-CAM PNGs by name. ``models``:
    one model card per experiment (``zalando.models.bundle``), for how each model decides.
    """
    if per_group is None or per_group.empty:
        raise DataError("per_group table: is empty, there is nothing to report")
    experiments = _experiments(per_group, performance, energy, confusion)
    tables = display_tables(per_group, performance, energy, summary)
    md = [
        *_title_section(run_id, experiments, champion, created_at),
        *_metrics_section(tables["per_group"], tables["summary"]),
        *_models_section(models),
        *_label_group_section(label_group),
        *_performance_section(tables["performance"]),
        *_energy_section(tables["energy"]),
        "\n## Figures\n",
    ]
    files: dict[str, bytes] = {}
    for lines, pngs in (
        _confusion_figures(confusion),
        _pr_figures(pr_curves),
        _training_curves_figure(histories),
        _worst_one_piece_figure(worst_one_piece),
        _gradcam_figures(gradcam_pngs),
    ):
        md.extend(lines)
        files.update(pngs)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(md)).rstrip() + "\n"
    files["report.md"] = text.encode("utf-8")
    return files


# Each section below is a list of Markdown blocks; a figure section also returns its PNGs by file name.
Figures = tuple[list[str], dict[str, bytes]]


def _title_section(
    run_id: str, experiments: Sequence[str], champion: str | None, created_at: datetime | None
) -> list[str]:
    when = (created_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    md = [
        f"# Run report `{run_id}`\n",
        f"Generated {when}. Experiments: " + ", ".join(f"`{e}`" for e in experiments) + ".\n",
    ]
    if champion:
        md.append(f"Champion after this run: **`{champion}`**.\n")
    return md


def _metrics_section(per_group: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """The per-group table (the study's best model first in each group) and the summary per experiment."""
    return [
        "## Classical metrics per group (test split)\n",
        "Recall = TP/(TP+FN), precision = TP/(TP+FP), NPV = TN/(TN+FN), one group against the rest. "
        f"'{NA}' means undefined (a group never predicted or never present). The first row of each "
        "group is the study's best model.\n",
        markdown_table(per_group, DISPLAY_FORMATS),
        "\n### Summary\n",
        markdown_table(summary, DISPLAY_FORMATS),
    ]


def _models_section(models: Sequence[Mapping[str, Any]] | None) -> list[str]:
    if not models:
        return []
    return [
        "\n### How each model decides (all chosen on the validation split)\n",
        "Test-time augmentation, temperature and the operating point (per-group weights on the "
        "group probabilities that bring each group's validation recall up to the study's) are part "
        "of the scored graph, in torch and ONNX alike. A reduced-precision runtime scores only if its "
        "grouped accuracy on validation is within 0.05 points of fp32's (the difference is shown).\n",
        markdown_table(models_display(models)),
    ]


def _label_group_section(label_group: Mapping[str, np.ndarray] | None) -> list[str]:
    if not label_group:
        return []
    md = ["\n### Original labels by predicted group\n"]
    for experiment, matrix in label_group.items():
        frame = pd.DataFrame(np.asarray(matrix), columns=list(GROUP_NAMES))
        frame.insert(0, "Label", list(LABEL_NAMES))
        md.append(f"\n`{experiment}`\n\n" + markdown_table(frame))
    return md


def _performance_section(performance: pd.DataFrame) -> list[str]:
    return [
        "\n## Performance\n",
        "Scoring of the test split after warm-up batches; wall time, throughput and per-batch latency. "
        "Sizes in MiB. Our machines are shared 2-core CPUs: speed numbers are disturbed by other work. "
        f"The reference row is the study's {STUDY_SCORING['n_images']:,} images in "
        f"{STUDY_SCORING['wall_s']} s on a {STUDY_SCORING['device']}.\n",
        markdown_table(performance, DISPLAY_FORMATS),
    ]


def _energy_section(energy: pd.DataFrame) -> list[str]:
    if energy.empty:
        return ["\n## Energy\n", "_No energy was measured in this run._\n"]
    methods = sorted(set(energy["Power method"].astype(str)))
    return [
        "\n## Energy\n",
        markdown_table(energy, DISPLAY_FORMATS),
        "\nPower method: " + "; ".join(f"`{m}`" for m in methods) + ". Machines without power counters "
        "(no RAPL, as on our VMs) only get estimates from codecarbon: CPU power = TDP x load, RAM power "
        "a constant from the installed memory; GPU power is read from NVML when a GPU is present.\n",
    ]


def _confusion_figures(confusion: pd.DataFrame | None) -> Figures:
    if confusion is None or confusion.empty:
        return [], {}
    md, files = ["\n### Confusion matrices (test split)\n"], {}
    conf = _test_split(confusion)
    for experiment in _experiments(conf):
        cm = _confusion_matrix_of(conf[conf["experiment"].astype(str) == experiment])
        name = f"confusion_{safe_name(experiment)}.png"
        files[name] = confusion_png(cm, f"{experiment}: confusion (test)")
        md.append(f"![Confusion matrix of {experiment}]({name})\n")
    return md, files


def _pr_figures(pr_curves: pd.DataFrame | Mapping[str, pd.DataFrame] | None) -> Figures:
    curves_by_experiment = _pr_by_experiment(pr_curves)
    if not curves_by_experiment:
        return [], {}
    md, files = ["\n### Precision-recall curves (test split)\n"], {}
    for experiment, curves in curves_by_experiment.items():
        name = f"pr_{safe_name(experiment)}.png"
        files[name] = pr_png(curves, f"{experiment}: precision-recall (test)")
        md.append(f"![Precision-recall curves of {experiment}]({name})\n")
    return md, files


def _training_curves_figure(histories: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> Figures:
    if not histories or not any(histories.values()):
        return [], {}
    md = ["\n### Training curves\n\n![Training curves](training_curves.png)\n"]
    return md, {"training_curves.png": training_curves_png(histories)}


def _worst_one_piece_figure(worst_one_piece: Sequence[tuple[np.ndarray, int, np.ndarray]] | None) -> Figures:
    if not worst_one_piece:
        return ["\n### Worst One piece mistakes\n", "_No One piece mistakes to show._\n"], {}
    png = gallery_png(
        list(worst_one_piece), "Most confident mistakes involving One piece (missed or wrongly predicted)"
    )
    md = [
        "\n### Worst One piece mistakes\n",
        "The study's first future line: the One piece group's errors, with their probabilities.\n\n"
        "![Worst One piece mistakes](worst_one_piece.png)\n",
    ]
    return md, {"worst_one_piece.png": png}


def _gradcam_figures(gradcam_pngs: Mapping[str, bytes] | None) -> Figures:
    if not gradcam_pngs:
        return ["\n### Grad-CAM: where the model looked\n", "_No Grad-CAM maps in this run._\n"], {}
    md, files = ["\n### Grad-CAM: where the model looked\n"], {}
    for raw_name, data in gradcam_pngs.items():
        name = safe_name(raw_name.removesuffix(".png"))
        name = name if name.startswith("gradcam_") else f"gradcam_{name}"
        files[f"{name}.png"] = data
        md.append(f"![{name}]({name}.png)\n")
    return md, files


def models_display(cards: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per model card (as `zalando.models.bundle.build_bundle` writes it): how it was trained
    and how it turns scores into a group."""
    rows = []
    for card in cards:
        training = card.get("training") or {}
        op = card.get("operating_point") or {}
        weights = op.get("weights") or [1.0] * len(GROUP_NAMES)
        shifted = [f"{g} x{w:.2f}" for g, w in zip(GROUP_NAMES, weights, strict=False) if float(w) != 1.0]
        if not op:
            rule = "argmax"
        elif shifted:
            rule = ", ".join(shifted) + ("" if op.get("met") else " (floors not all met)")
        else:
            rule = "argmax (floors met without weights)"
        rows.append(
            {
                # build_bundle's card names the experiment "model" (the spec's name)
                "Experiment": card.get("experiment") or card.get("model") or NA,
                "Model version": card.get("model_version", NA),
                "Trained": f"{training.get('device', 'cpu')} {training.get('precision', 'fp32')}, "
                f"{training.get('epochs_run', NA)} epochs (best {training.get('best_epoch', NA)})",
                "TTA": _tta_cell(card),
                "Screen": _screen_cell(card),
                "Temperature": _cell(card.get("temperature"), ".3f"),
                "Operating point": rule,
                "Reduced precision (validation)": _runtime_verdicts(card),
            }
        )
    return pd.DataFrame(rows)


def _screen_cell(card: Mapping[str, Any]) -> str:
    """'below 0.99: 18.3% of validation rows to the full net' for a bundle with a screen net, else 'none'."""
    screen = card.get("screen") or {}
    if screen.get("below") is None:
        return "none"
    share = 100 * float((screen.get("validation") or {}).get("share", float("nan")))
    macs = screen.get("macs_per_image")
    cost = f", {macs / 1e6:.1f} MMAC" if isinstance(macs, int | float) else ""
    return f"below {float(screen['below']):.3g}: {share:.1f}% of validation rows to the full net{cost}"


def _tta_cell(card: Mapping[str, Any]) -> str:
    """'hflip below 0.95 (3.7% of validation rows)' where only doubtful rows are flipped, else the TTA."""
    flip = card.get("tta_flip") or {}
    if card.get("tta") == "hflip" and flip.get("below") is not None:
        share = 100 * float(flip.get("share", float("nan")))
        return f"hflip below {float(flip['below']):.3g} ({share:.1f}% of validation rows)"
    return str(card.get("tta", NA))


def _runtime_verdicts(card: Mapping[str, Any]) -> str:
    """'onnx-int8 -0.02 pts, torch-bf16 +0.00 pts' from the card's runtime verdicts; refused ones say so."""
    from zalando.admission import CARD_KEY
    from zalando.runtime import REDUCED_PRECISION

    runtimes = (card.get(CARD_KEY) or {}).get("runtimes") or {}
    cells = [
        f"{name} {v['diff_points']:+.2f} pts" + ("" if v.get("admitted") else " (not admitted)")
        for name, v in runtimes.items()
        if name in REDUCED_PRECISION
    ]
    return ", ".join(cells) or "not checked"


def _confusion_matrix_of(rows: pd.DataFrame) -> np.ndarray:
    _require(rows, "confusion", ["true_group", "pred_group", "count"])
    cm = np.zeros((NUM_GROUPS, NUM_GROUPS), dtype=np.int64)
    np.add.at(
        cm, (rows["true_group"].to_numpy(int), rows["pred_group"].to_numpy(int)), rows["count"].to_numpy(int)
    )
    return cm


def _pr_by_experiment(pr_curves: pd.DataFrame | Mapping[str, pd.DataFrame] | None) -> dict[str, pd.DataFrame]:
    if pr_curves is None:
        return {}
    if isinstance(pr_curves, pd.DataFrame):
        if pr_curves.empty:
            return {}
        _require(pr_curves, "pr_curves", ["experiment", "group", "threshold", "precision", "recall"])
        return {e: pr_curves[pr_curves["experiment"].astype(str) == e] for e in _experiments(pr_curves)}
    return {str(e): c for e, c in pr_curves.items() if c is not None and not c.empty}


def worst_one_piece_items(
    images: np.ndarray, y_true_label: np.ndarray, group_probs: np.ndarray, indices: np.ndarray
) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """The ``worst_one_piece`` argument of :func:`build_run_report` from arrays and chosen indices
    (e.g. ``zalando.evaluate.worst_mistakes(group_of(y), probs, group=2)``)."""
    return [
        (images[i], int(y_true_label[i]), np.asarray(group_probs[i])) for i in np.asarray(indices, dtype=int)
    ]
