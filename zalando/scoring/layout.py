"""Where scoring writes: its Iceberg tables, and the few plain objects beside them.

Tables (:mod:`zalando.lake.tables`), one row per input record, committed once per batch:

* ``predictions`` (partitioned by batch date and model version): one data file per shard, under the
  table's ``data/`` folder (:func:`zalando.lake.commit.data_file_key`, path segments
  :func:`prediction_partition` plus the plan's ``run_id=<write id>``). The per-group view is the
  filter ``pred_group = g``, the review queue ``needs_review`` (confidence below the threshold);
* ``quarantine``: the batch's rejected inputs (the rows whose ``batch_id`` is set);
* ``batches``: one row per committed (batch, model version), what a batch manifest used to say;
* ``shadow_predictions`` and ``shadow_agreement``: a challenger's rows of a batch, partitioned like
  ``predictions`` (the challenger's version in ``model_version``), and their agreement per group.

Plain objects, per batch (every name a pure function of date, model, batch, plan and shard)::

    scoring/batch_date=D/model_version=V/batch_id=B/
        _shards/shard-00000.json ...                     shard markers: each shard's commit point
        embeddings/run_id=W/part-00000.parquet ...       the embedding sample for drift (its batch row lists them)
"""

from __future__ import annotations

from datetime import date
from typing import Any

PREDICTIONS = "predictions"
QUARANTINE = "quarantine"
BATCHES = "batches"
SHADOW_PREDICTIONS = "shadow_predictions"  # a challenger's rows (zalando.scoring.shadow), never the batch's
SHADOW_AGREEMENT = "shadow_agreement"


def prediction_partition(batch_date: date | str, model_version: str, batch_id: str) -> dict[str, Any]:
    """The batch's rows in ``predictions``: the replace filter of its commit and the path segments
    of its data files (batch_date and model_version prune partitions, batch_id picks the files)."""
    return {"batch_date": _as_date(batch_date), "model_version": model_version, "batch_id": batch_id}


def quarantine_partition(batch_id: str, model_version: str) -> dict[str, Any]:
    """The batch's rows in ``quarantine`` (ingest's rows have no batch_id: never touched)."""
    return {"batch_id": batch_id, "model_version": model_version}


def batch_row(batch_id: str, model_version: str) -> dict[str, Any]:
    """The batch's one row in ``batches``."""
    return {"batch_id": batch_id, "model_version": model_version}


def shadow_agreement_rows(batch_id: str, challenger_version: str) -> dict[str, Any]:
    """The batch's rows in ``shadow_agreement`` for one challenger (the replace filter of their commit)."""
    return {"batch_id": batch_id, "challenger_version": challenger_version}


def batch_key(batch_date: date | str, model_version: str, batch_id: str) -> str:
    """The prefix of a batch's plain objects."""
    return f"scoring/batch_date={_d(batch_date)}/model_version={model_version}/batch_id={batch_id}"


def shard_markers_prefix(batch_date: date | str, model_version: str, batch_id: str) -> str:
    return f"{batch_key(batch_date, model_version, batch_id)}/_shards"


def shard_marker_key(batch_date: date | str, model_version: str, batch_id: str, shard_id: int) -> str:
    return f"{shard_markers_prefix(batch_date, model_version, batch_id)}/shard-{shard_id:05d}.json"


def embeddings_key(
    batch_date: date | str, model_version: str, batch_id: str, write_id: str, shard_id: int
) -> str:
    return f"{batch_key(batch_date, model_version, batch_id)}/embeddings/run_id={write_id}/part-{shard_id:05d}.parquet"


def _d(value: date | str) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


def _as_date(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))
