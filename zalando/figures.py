"""The report's figures: confusion matrices, precision-recall curves, training curves, an image gallery.

Each is drawn on a matplotlib ``Figure`` with the Agg canvas (:func:`new_figure`): no pyplot, no global
backend switch, no GUI, safe in worker threads; :func:`figure_png` turns it into PNG bytes for the lake.
:mod:`zalando.report` places them beside its tables; :mod:`zalando.gradcam` draws its heat maps the same way.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from zalando.errors import DataError
from zalando.labels import GROUP_NAMES, LABEL_NAMES, NUM_GROUPS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ONE_PIECE = GROUP_NAMES.index("One piece")


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib Figure drawn with the Agg canvas: no pyplot, no global backend, no GUI, thread-safe."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure (tight layout)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def confusion_png(cm: np.ndarray, title: str, names: Sequence[str] = GROUP_NAMES) -> bytes:
    """A confusion matrix: colour = share of the true row, text = count."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.shape != (len(names), len(names)):
        raise DataError(f"confusion_png: matrix {cm.shape} does not fit {len(names)} class names")
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    fig = new_figure((5.2, 4.4))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true group")
    for (i, j), count in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if share[i, j] > 0.5 else "black",
        )
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return figure_png(fig)


def pr_png(curves: pd.DataFrame, title: str) -> bytes:
    """Precision-recall curves, one line per group, with the (approximate) average precision."""
    fig = new_figure((5.2, 4.4))
    ax = fig.add_subplot()
    for g, name in enumerate(GROUP_NAMES):
        c = curves[curves["group"] == g].sort_values("threshold", ascending=False)
        if c.empty or not np.isfinite(c["recall"]).all():
            continue
        recall, precision = c["recall"].to_numpy(float), c["precision"].to_numpy(float)
        ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
        ax.plot(recall, precision, label=f"{name} (AP≈{ap:.3f})", linewidth=1.2)
    ax.set_xlim(0.0, 1.01)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=10)
    return figure_png(fig)


def training_curves_png(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """Loss curves (left) and the other per-epoch metrics in 0..1 (right), one colour per experiment."""
    fig = new_figure((11.0, 4.2))
    ax_loss, ax_metric = fig.subplots(1, 2)
    skip = {"epoch", "lr", "learning_rate", "seconds", "time_s", "train_s", "epoch_s", "images_per_s"}
    for color, (experiment, history) in zip(_colors(len(histories)), histories.items(), strict=False):
        if not history:
            continue
        frame = pd.DataFrame(list(history))
        x = frame["epoch"].to_numpy() if "epoch" in frame else np.arange(1, len(frame) + 1)
        for column in frame.columns:
            if column in skip or not pd.api.types.is_numeric_dtype(frame[column]):
                continue
            values = frame[column].to_numpy(dtype=float)
            style = "--" if column.startswith(("train", "loss")) else ":" if "group" in column else "-"
            if "loss" in column or "nll" in column:
                ax_loss.plot(x, values, style, color=color, label=f"{experiment}: {column}", linewidth=1.1)
            elif np.nanmin(values) >= 0.0 and np.nanmax(values) <= 1.0:
                ax_metric.plot(x, values, style, color=color, label=f"{experiment}: {column}", linewidth=1.1)
    from matplotlib.ticker import MaxNLocator

    for ax, label in ((ax_loss, "loss"), (ax_metric, "metric")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    ax_loss.set_title("Loss per epoch (dashed: training, dotted: group level)", fontsize=10)
    ax_metric.set_title("Accuracy per epoch (dashed: training, dotted: group level)", fontsize=10)
    return figure_png(fig)


def gallery_png(
    items: Sequence[tuple[np.ndarray, int, np.ndarray]],
    title: str,
    focus_group: int = ONE_PIECE,
    ncols: int = 8,
) -> bytes:
    """Images with their true label, predicted group and probabilities: (image 28x28 uint8, label, probs (5,))."""
    if not items:
        raise DataError("gallery_png: no images to draw")
    n = len(items)
    cols = min(ncols, n)
    rows = -(-n // cols)
    fig = new_figure((1.6 * cols, 2.0 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (image, label, probs) in zip(axes, items, strict=False):
        probs = np.asarray(probs, dtype=float)
        image = np.asarray(image)
        if image.shape != (28, 28) or probs.shape != (NUM_GROUPS,):
            raise DataError(
                f"gallery_png: expected a 28x28 image and {NUM_GROUPS} probabilities, got {image.shape} and {probs.shape}"
            )
        pred = int(probs.argmax())
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"{LABEL_NAMES[int(label)]}\n→ {GROUP_NAMES[pred]} {probs[pred]:.2f}\n"
            f"P({GROUP_NAMES[focus_group]}) {probs[focus_group]:.2f}",
            fontsize=6.5,
        )
    fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(max(n, 1))]
