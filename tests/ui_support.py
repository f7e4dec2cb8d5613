"""Helpers for the review desk's tests: a scored batch (fake predictor, no training), a run's metrics
and report, and a drift table, all written into a real lake (local folder or SeaweedFS)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from tests.scoring_support import FakePredictor, mnist_like, raw_parquet
from zalando.lake import Lake

VERSION = "20260101T000000Z-fake0001"
RUN_ID = "20260102T030405Z-abc123"
SCRIPT_ID = "<script>alert('x')</script>"


def scored_batch(
    lake: Lake,
    n: int = 40,
    *,
    source: str = "shop",
    batch_date: str = "2026-03-01",
    ids: list[str] | None = None,
    threshold: float = 0.999,
    shard_size: int = 1000,
) -> str:
    """A batch of ``n`` generated images in the lake (``incoming/<source>``), scored by the fake
    predictor with a confidence threshold that sends (nearly) every row to needs-review; its id."""
    from zalando.scoring import ScoringOptions, score_batch

    ids = ids or [f"img-{i:05d}" for i in range(n)]
    images = mnist_like(len(ids), seed=len(ids))
    lake.commit_files(f"incoming/{source}", {"part-0.parquet": raw_parquet(ids, images)}, f"put-{source}")
    result = score_batch(
        lake.catalog(),
        f"incoming/{source}",
        predictor=FakePredictor(),
        model_version=VERSION,
        batch_date=batch_date,
        source=source,
        shard_size=shard_size,
        options=ScoringOptions(confidence_threshold=threshold),
    )
    assert result.scored == len(ids), result
    return result.batch_id


def tiny_png(value: int = 128, size: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_run(
    lake: Lake, run_id: str = RUN_ID, *, title_extra: str = SCRIPT_ID, real_figures: bool = False
) -> None:
    """A run's metric tables (one experiment) and a report with two figures and some raw HTML;
    ``real_figures``: the report as zalando.report.build_run_report draws it (matplotlib)."""
    from zalando.evaluate import metric_arrow_tables, metric_tables
    from zalando.lake.keys import report_key
    from zalando.steps.training import commit_metric_tables

    y_true = np.array([0, 1, 2, 3, 4] * 20)
    y_pred = y_true.copy()
    y_pred[:7] = 2  # a few mistakes, some into One piece
    frames = metric_tables(run_id, "tiny_cnn", VERSION, y_true, y_pred)
    commit_metric_tables(lake, run_id, "tiny_cnn", metric_arrow_tables(frames))
    if real_figures:
        from zalando.report import build_run_report

        files = build_run_report(
            run_id,
            frames["per_group"],
            summary=frames["summary"],
            confusion=frames["confusion"],
            worst_one_piece=[(mnist_like(1)[0], 3, np.array([0.1, 0.1, 0.5, 0.2, 0.1]))],
        )
        files["report.md"] = files["report.md"].replace(b"\n", f"\n\nExperiment {title_extra}.\n".encode(), 1)
        lake.commit_files(report_key(run_id), files, run_id, extra={"champion": VERSION})
        return
    md = (
        f"# Run report `{run_id}`\n\nExperiment {title_extra} and <b>bold</b>.\n\n"
        "| Group | Recall |\n| --- | ---: |\n| One piece | 0.910 |\n\n"
        "![Confusion matrix](confusion_tiny_cnn.png)\n\n![PR](pr_tiny_cnn.png)\n\n"
        "![elsewhere](https://example.com/x.png)\n"
    )
    files = {
        "report.md": md.encode(),
        "confusion_tiny_cnn.png": tiny_png(60),
        "pr_tiny_cnn.png": tiny_png(200),
    }
    lake.commit_files(report_key(run_id), files, run_id, extra={"champion": VERSION, "flow_run_id": "fr-123"})


def write_drift(lake: Lake, batch_id: str, *, alarm: bool = False, value: float = 0.05) -> None:
    """A batch's drift rows in the monitoring table, shaped like zalando.drift.drift_report's."""
    from zalando.lake.commit import replace_partition
    from zalando.scoring.query import batch_date_of
    from zalando.steps.monitoring import MONITORING_TABLE

    table = pa.table(
        {
            "batch_id": [batch_id] * 2,
            "model_version": [VERSION] * 2,
            "statistic": ["confidence_psi", "pixel_mean"],
            "value": [value, 0.3],
            "threshold": [0.2, 0.5],
            "p_value": [float("nan")] * 2,
            "alarm": [alarm, False],
            "trusted": [True, True],
            "min_n": pa.array([50, 50], pa.int64()),
            "batch_value": ["0.9", "0.3"],
            "reference_value": ["0.95", "0.28"],
            "detail": ["", ""],
        }
    )
    d = batch_date_of(batch_id)
    table = table.append_column("batch_date", pa.array([d] * table.num_rows, pa.date32()))
    flt = {"batch_date": d, "batch_id": batch_id, "model_version": VERSION}
    replace_partition(
        lake.catalog(), MONITORING_TABLE, table, flt, properties={"zalando.run-id": "monitor-test"}
    )
