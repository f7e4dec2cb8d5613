"""What the pages draw, as pure functions: the report's Markdown as safe HTML with its figures served
from the lake, the per-group comparison with the study, drift sparklines as inline SVG, and PNGs.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup

from zalando.labels import GROUP_NAMES
from zalando.study import STUDY_BEST
from zalando.ui.links import report_file_path

_LOCAL_FILE = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")


def report_html(markdown: str, report_key: str) -> Markup:
    """The report's Markdown as HTML: raw HTML in it is escaped (never rendered), tables kept, and
    relative image names become the page's ``/files/reports/run_id=…/<name>`` URLs (others are dropped).
    """
    from markdown_it import MarkdownIt
    from markdown_it.common.utils import escapeHtml

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")

    def image(self: Any, tokens: list[Any], idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        if not _LOCAL_FILE.match(src) or ".." in src.split("/"):  # the page loads nothing from elsewhere
            alt = escapeHtml(self.renderInlineAsText(token.children or [], options, env))
            return f'<span class="external-image">[image not shown: {alt}]</span>'
        token.attrSet("src", report_file_path(f"{report_key}/{src}"))
        return self.image(tokens, idx, options, env)

    md.add_render_rule("image", image)
    return Markup(md.render(markdown))


def study_comparison(per_group: pd.DataFrame) -> list[dict[str, Any]]:
    """Per group and experiment (test split): recall, precision, NPV beside the study's best model's."""
    if per_group.empty:
        return []
    pg = per_group[per_group["split"] == "test"] if "split" in per_group.columns else per_group
    rows = []
    for g, name in enumerate(GROUP_NAMES):
        ref = STUDY_BEST[name]
        for rec in pg[pg["group"].astype(int) == g].sort_values("experiment").to_dict("records"):
            row: dict[str, Any] = {"group": name, "experiment": str(rec["experiment"])}
            for metric in ("recall", "precision", "npv"):
                value = _num(rec.get(metric))
                row[metric] = value
                row[f"study_{metric}"] = ref[metric]
                row[f"delta_{metric}"] = None if value is None else value - ref[metric]
            rows.append(row)
    return rows


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def sparkline_svg(
    values: Sequence[float | None],
    alarms: Sequence[bool] = (),
    threshold: float | None = None,
    *,
    width: int = 140,
    height: int = 28,
    title: str = "",
) -> Markup:
    """A small inline SVG line of values (oldest first); alarmed points red, the threshold dashed.

    Only numbers and an escaped title go into the markup.
    """
    from markupsafe import escape

    points = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    pad = 3.0
    lo_hi = [v for _, v in points] + (
        [threshold] if threshold is not None and math.isfinite(threshold) else []
    )
    if not points:
        return Markup(
            f'<svg class="spark" width="{width}" height="{height}" role="img"><title>{escape(title)}: no data</title></svg>'
        )
    lo, hi = min(lo_hi), max(lo_hi)
    span = (hi - lo) or 1.0
    n = max(len(values) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * (i / n if len(values) > 1 else 0.5)
        y = height - pad - (height - 2 * pad) * (v - lo) / span
        return round(x, 1), round(y, 1)

    parts = [
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
    ]
    parts.append(f"<title>{escape(title)}</title>")
    if threshold is not None and math.isfinite(threshold):
        _, ty = xy(0, threshold)
        parts.append(
            f'<line class="spark-threshold" x1="{pad}" x2="{width - pad}" y1="{ty}" y2="{ty}" '
            'stroke="#999" stroke-dasharray="3,2" stroke-width="1"/>'
        )
    coords = " ".join(f"{x},{y}" for x, y in (xy(i, v) for i, v in points))
    parts.append(f'<polyline fill="none" stroke="#2a6fdb" stroke-width="1.5" points="{coords}"/>')
    for i, v in points:
        x, y = xy(i, v)
        alarm = i < len(alarms) and bool(alarms[i])
        parts.append(
            f'<circle cx="{x}" cy="{y}" r="{2.5 if alarm else 1.6}" fill="{"#d22" if alarm else "#2a6fdb"}"/>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def image_png(pixels: np.ndarray) -> bytes:
    """A uint8 (28, 28) image as PNG bytes (the page upscales it with pixelated rendering)."""
    from PIL import Image

    a = np.asarray(pixels, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()
