"""The shape of what scoring writes: prediction rows, quarantine rows, the confidence histogram.

Shared by the shard writer (:mod:`zalando.scoring.shard`), the batch commit
(:mod:`zalando.scoring.commit`) and the readers (monitoring, the review queue).
"""

from __future__ import annotations

import pyarrow as pa

from zalando.labels import GROUP_KEYS

PROB_COLUMNS = tuple(f"prob_{k}" for k in GROUP_KEYS)
PREDICTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("pred_group", pa.int8()),
        ("pred_group_name", pa.string()),
        *[(c, pa.float32()) for c in PROB_COLUMNS],
        ("confidence", pa.float32()),
        ("model_version", pa.string()),
        ("batch_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("image", pa.binary()),
        ("batch_id", pa.string()),
        ("shard_id", pa.int32()),
    ]
)
CONFIDENCE_BINS = 20  # bins of the confidence histogram in shard markers and the batch manifest
