"""Where scoring writes in the lake: every name is a pure function of (date, model, batch, shard).

::

    predictions/batch_date=D/model_version=V/batch_id=B/            the batch partition
        part-00000.parquet ...                                      one part file per shard
        _shards/shard-00000.json ...                                shard commit markers (written last)
        _MANIFEST.json                                              batch manifest (written LAST of all)
    predictions_by_group/batch_date=D/group=G/model_version=V/batch_id=B/part-NNNNN.parquet
    needs_review/batch_date=D/model_version=V/batch_id=B/part-NNNNN.parquet   (confidence < threshold)
    embeddings/batch_date=D/model_version=V/batch_id=B/part-NNNNN.parquet     (a sample, for drift)
    quarantine/run_id=score-B/model_version=V/part-NNNNN.parquet              (rejected inputs + reason)
"""

from __future__ import annotations

from datetime import date

from zalando.labels import GROUP_KEYS


def batch_prefix(batch_date: date | str) -> str:
    return f"predictions/batch_date={_d(batch_date)}"


def predictions_key(batch_date: date | str, model_version: str, batch_id: str) -> str:
    return f"predictions/batch_date={_d(batch_date)}/model_version={model_version}/batch_id={batch_id}"


def part_name(shard_id: int) -> str:
    return f"part-{shard_id:05d}.parquet"


EMPTY_PART = "part-empty.parquet"


def shard_marker_key(batch_date: date | str, model_version: str, batch_id: str, shard_id: int) -> str:
    return f"{predictions_key(batch_date, model_version, batch_id)}/_shards/shard-{shard_id:05d}.json"


def group_key(batch_date: date | str, group: int | str, model_version: str, batch_id: str) -> str:
    g = GROUP_KEYS[group] if isinstance(group, int) else group
    return f"predictions_by_group/batch_date={_d(batch_date)}/group={g}/model_version={model_version}/batch_id={batch_id}"


def review_key(batch_date: date | str, model_version: str, batch_id: str) -> str:
    return f"needs_review/batch_date={_d(batch_date)}/model_version={model_version}/batch_id={batch_id}"


def embeddings_key(batch_date: date | str, model_version: str, batch_id: str) -> str:
    return f"embeddings/batch_date={_d(batch_date)}/model_version={model_version}/batch_id={batch_id}"


def quarantine_key(batch_id: str, model_version: str) -> str:
    return f"quarantine/run_id=score-{batch_id}/model_version={model_version}"


def _d(value: date | str) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)
