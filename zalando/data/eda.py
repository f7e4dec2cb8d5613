"""Exploratory data analysis, as in the study's first section: distributions, duplicates, pixels,
and the average and median image per group."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

from zalando.data.arrays import images_from_table, labels_from_table
from zalando.data.ingest import SPLITS, load_raw
from zalando.data.validate import _row_keys
from zalando.labels import GROUP_NAMES, LABEL_NAMES, LABEL_TO_GROUP
from zalando.lake import Lake


def eda_tables(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, pd.DataFrame]:
    """Label and group distribution per split, and pixel/duplicate statistics per split."""
    labels_rows, groups_rows, pixel_rows = [], [], []
    for split, (images, labels) in splits.items():
        lc = np.bincount(labels, minlength=len(LABEL_NAMES))
        gc = np.bincount(LABEL_TO_GROUP[labels], minlength=len(GROUP_NAMES))
        labels_rows += [
            {
                "split": split,
                "label": i,
                "label_name": n,
                "group_name": GROUP_NAMES[LABEL_TO_GROUP[i]],
                "count": int(c),
            }
            for i, (n, c) in enumerate(zip(LABEL_NAMES, lc, strict=True))
        ]
        groups_rows += [
            {
                "split": split,
                "group": i,
                "group_name": n,
                "count": int(c),
                "share": float(c / max(len(labels), 1)),
            }
            for i, (n, c) in enumerate(zip(GROUP_NAMES, gc, strict=True))
        ]
        keys = _row_keys(images)
        pixel_rows.append(
            {
                "split": split,
                "images": len(images),
                "duplicates": int(len(keys) - len(np.unique(keys))),
                "pixel_min": int(images.min()) if len(images) else 0,
                "pixel_max": int(images.max()) if len(images) else 0,
                "pixel_mean": float(images.mean() / 255) if len(images) else 0.0,
            }
        )
    if len(splits) == 2 and "train" in splits and "test" in splits:
        tr, te = _row_keys(splits["train"][0]), _row_keys(splits["test"][0])
        cross = int(np.isin(te, tr).sum())
    else:
        cross = 0
    return {
        "labels": pd.DataFrame(labels_rows),
        "groups": pd.DataFrame(groups_rows),
        "pixels": pd.DataFrame(pixel_rows).assign(duplicates_across_splits=cross),
    }


def group_images_png(images: np.ndarray, labels: np.ndarray) -> bytes:
    """One figure: the average (top row) and median (bottom row) image of each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = LABEL_TO_GROUP[labels]
    fig, axes = plt.subplots(2, len(GROUP_NAMES), figsize=(2.2 * len(GROUP_NAMES), 4.8))
    for g, name in enumerate(GROUP_NAMES):
        sel = images[groups == g]
        for row, (stat, fn) in enumerate((("average", np.mean), ("median", np.median))):
            ax = axes[row, g]
            if len(sel):
                ax.imshow(fn(sel, axis=0), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{name}\n{stat} (n={len(sel)})" if row == 0 else f"{stat}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def distribution_png(groups: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pivot = groups.pivot(index="group_name", columns="split", values="count").reindex(GROUP_NAMES)
    ax = pivot.plot.bar(figsize=(7, 3.5), rot=0)
    ax.set_ylabel("images")
    ax.set_title("Images per group and split")
    fig = ax.get_figure()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def build_eda(lake: Lake) -> tuple[dict[str, pd.DataFrame], dict[str, bytes]]:
    """Read the raw tables and build the EDA tables and report files (Markdown + PNG)."""
    splits = {}
    for split in SPLITS:
        t = load_raw(lake, split, columns=["image", "label"])
        splits[split] = (images_from_table(t), labels_from_table(t))
    tables = eda_tables(splits)
    train_images, train_labels = splits["train"]
    groups_wide = (
        tables["groups"]
        .pivot(index="group_name", columns="split", values="count")
        .reindex(GROUP_NAMES)
        .reset_index()
    )
    labels_wide = (
        tables["labels"]
        .pivot(index=["label", "label_name", "group_name"], columns="split", values="count")
        .reset_index()
    )
    md = "\n\n".join(
        [
            "# Exploratory data analysis: Fashion-MNIST",
            "## Images per group\n\n" + _md(groups_wide),
            "![groups](eda_groups.png)",
            "## Images per label\n\n" + _md(labels_wide),
            "## Pixels and duplicates\n\n" + _md(tables["pixels"]),
            "## Average and median image per group (training split)\n\n![images](eda_group_images.png)",
        ]
    )
    files = {
        "eda.md": md.encode(),
        "eda_groups.png": distribution_png(tables["groups"]),
        "eda_group_images.png": group_images_png(train_images, train_labels),
    }
    return tables, files


def write_eda(lake: Lake, run_id: str) -> dict[str, Any]:
    """Build the EDA and commit it to ``reports/run_id=<run_id>/eda``.

    Its small tables stay plain Parquet objects beside the report (``eda_<name>.parquet``), not
    Iceberg tables: they are a picture of one ingest, rebuilt from raw_images at will.
    """
    import pyarrow as pa

    from zalando.lake import table_to_parquet_bytes
    from zalando.lake.keys import eda_key

    tables, files = build_eda(lake)
    key = eda_key(run_id)
    for name, df in tables.items():
        files[f"eda_{name}.parquet"] = table_to_parquet_bytes(pa.Table.from_pandas(df, preserve_index=False))
    lake.commit_files(key, files, run_id)
    return {"key": key, "uri": lake.uri(key), "files": sorted(files)}
