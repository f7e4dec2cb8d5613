"""Monitoring step: the label-free drift of one scored batch against its model's reference profile.

It reads the batch's embedding sample (plain objects its row in ``batches`` lists), the predictions
of those rows (a scan of the ``predictions`` table) and their images again from the batch's inputs,
and commits the batch's drift rows to the ``monitoring`` table (replacing the batch's earlier rows
for that model). Torch-free.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from zalando.data.arrays import images_from_table
from zalando.errors import DataError
from zalando.images import ImagePrepConfig
from zalando.lake import Lake
from zalando.lake.catalog import LakeCatalog
from zalando.lake.commit import scan
from zalando.lake.tables import PREDICTIONS, PROB_COLUMNS, prediction_partition
from zalando.scoring.batch import Batch
from zalando.scoring.commit import batch_record
from zalando.scoring.run import BatchPlan
from zalando.scoring.shard import SAMPLE_PIXELS

log = logging.getLogger(__name__)


MONITORING_TABLE = "monitoring"


class DriftResult(BaseModel):
    """The drift of one batch: which statistics alarm, and where its rows were committed."""

    alarm: bool = False
    alarms: list[str] = []  # names of the statistics that alarm
    uri: str | None = None  # the monitoring table's location (its rows: batch_id and model_version)
    rows: int = 0  # sampled rows measured
    skipped: bool = False  # the batch was committed (and measured) by an earlier run
    table: list[dict[str, Any]] = []  # the committed drift table's rows (statistic, value, threshold, ...)


def monitor_batch(
    cat: LakeCatalog,
    plan: BatchPlan,
    run_id: str,
    *,
    image_prep: ImagePrepConfig | None = None,
    thresholds: Mapping[str, Any] | None = None,
) -> DriftResult:
    """Label-free drift of the planned batch once scored, against its model's reference profile.

    A plan that found the batch committed already (no inputs described) is skipped: its drift was
    measured when it was scored.
    """
    from zalando.drift import DriftThresholds, any_alarm, drift_report
    from zalando.registry import load_reference

    d, b, v = plan.batch_date, plan.batch_id, plan.model_version
    if plan.batch is None:
        log.info("batch %s already committed: drift was measured when it was scored", b)
        return DriftResult(skipped=True)
    lake = cat.lake
    emb_table = _embedding_sample(cat, b, v)
    ids = emb_table.column("image_id").to_pylist()
    preds = _sampled_predictions(cat, plan)
    preds = preds.filter(pc.is_in(preds.column("image_id"), value_set=pa.array(ids, pa.string())))
    probs_by_id = dict(
        zip(
            preds.column("image_id").to_pylist(),
            np.stack([preds.column(c).to_numpy() for c in PROB_COLUMNS], axis=1),
            strict=True,
        )
    )
    images_by_id = (
        _pixels_of(emb_table)
        if SAMPLE_PIXELS in emb_table.column_names
        else _sample_images(lake, plan.batch, set(ids), image_prep or ImagePrepConfig())
    )
    emb = np.asarray(emb_table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    emb = emb.reshape(emb_table.num_rows, -1)
    keep = [i for i, x in enumerate(ids) if x in probs_by_id and x in images_by_id]
    if len(keep) < 2:
        raise DataError(f"batch {b}: only {len(keep)} sampled rows could be matched for drift monitoring")
    report = drift_report(
        np.stack([images_by_id[ids[i]] for i in keep]),
        np.stack([probs_by_id[ids[i]] for i in keep]),
        emb[keep],
        load_reference(lake, v),
        DriftThresholds(**dict(thresholds or {})),
    )
    for col in ("batch_value", "reference_value"):  # numbers for some statistics, text for others
        report[col] = report[col].map(str)
    uri = _commit_drift(lake, report, d, b, v, run_id, rows=len(keep))
    alarms = report.loc[report["alarm"].astype(bool), "statistic"].astype(str).tolist()
    log.info("drift of batch %s (%d sampled rows): %s", b, len(keep), ", ".join(alarms) or "no alarm")
    return DriftResult(
        alarm=any_alarm(report),
        alarms=alarms,
        uri=uri,
        rows=len(keep),
        table=json.loads(report.to_json(orient="records")),
    )


def _commit_drift(
    lake: Lake, report: Any, batch_date: date, batch_id: str, model_version: str, run_id: str, *, rows: int
) -> str:
    """Replace the batch's drift rows (for this model) in the monitoring table; returns its location."""
    from zalando.lake.commit import replace_partition

    table = pa.Table.from_pandas(report, preserve_index=False)
    n = table.num_rows
    table = (
        table.append_column("batch_date", pa.array([batch_date] * n, pa.date32()))
        .append_column("batch_id", pa.array([batch_id] * n, pa.string()))
        .append_column("model_version", pa.array([model_version] * n, pa.string()))
    )
    cat = lake.catalog()
    props = {"zalando.run-id": run_id, "zalando.sampled-rows": rows}
    # batch_date, the partition, first: the replace's delete then reads only that day's files
    flt = {"batch_date": batch_date, "batch_id": batch_id, "model_version": model_version}
    replace_partition(cat, MONITORING_TABLE, table, flt, properties=props)
    return lake.uri(f"{cat.namespace}/{MONITORING_TABLE}")


def _embedding_sample(cat: LakeCatalog, batch_id: str, model_version: str) -> pa.Table:
    """The batch's embedding sample: the objects its row in ``batches`` lists, concatenated."""
    row = batch_record(cat, batch_id, model_version)
    keys = (row or {}).get("embeddings") or []
    if not keys:
        raise DataError(
            f"batch {batch_id} (model {model_version}): no committed embedding sample; score it first"
        )
    parts = [pq.read_table(io.BytesIO(cat.lake.read_bytes(k))) for k in keys]
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _sampled_predictions(cat: LakeCatalog, plan: BatchPlan) -> pa.Table:
    """The batch's committed predictions (id and group probabilities), read through the table."""
    flt = prediction_partition(plan.batch_date, plan.model_version, plan.batch_id)
    return scan(cat, PREDICTIONS, flt, columns=["image_id", *PROB_COLUMNS])


def _pixels_of(emb_table: pa.Table) -> dict[str, np.ndarray]:
    """The sampled images as the shards kept them (28x28 uint8), by image id."""
    images = images_from_table(emb_table, SAMPLE_PIXELS)
    return dict(zip(emb_table.column("image_id").to_pylist(), images, strict=True))


def _sample_images(
    lake: Lake, batch: Batch, ids: set[str], image_prep: ImagePrepConfig
) -> dict[str, np.ndarray]:
    """The images of the sampled ids, read again from the batch's inputs (one file at a time): for
    an embedding sample a shard wrote before the samples kept their pixels."""
    from zalando.images import decode_image
    from zalando.scoring.batch import ID_COLUMN, IMAGE_COLUMN, image_id_for_file
    from zalando.scoring.inputs import decode_image_column
    from zalando.scoring.locations import open_input

    found: dict[str, np.ndarray] = {}
    for f in batch.inputs:
        if f.error is not None or len(found) == len(ids):
            continue
        fs, path = open_input(f.uri, lake)
        if f.kind == "image":
            image_id = image_id_for_file(f.name)
            if image_id in ids and image_id not in found:
                with fs.open_input_file(path) as fh:
                    found[image_id] = decode_image(fh.read(), image_prep, name=f.name)
            continue
        table = pq.read_table(path, filesystem=fs, columns=[ID_COLUMN, IMAGE_COLUMN])
        mask = pc.is_in(table.column(ID_COLUMN), value_set=pa.array(sorted(ids), pa.string()))
        table = table.filter(mask)
        images, bad = decode_image_column(table.column(IMAGE_COLUMN), image_prep, source=f.name)
        bad_rows = {i for i, _, _ in bad}
        for i, image_id in enumerate(table.column(ID_COLUMN).to_pylist()):
            if i not in bad_rows and image_id not in found:
                found[image_id] = images[i]
    return found
