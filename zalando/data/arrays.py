"""Conversions between raw lake tables and numpy arrays."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from zalando.errors import DataError
from zalando.labels import GROUP_NAMES, LABEL_NAMES, LABEL_TO_GROUP

IMAGE_BYTES = 28 * 28

RAW_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary(IMAGE_BYTES)),
        ("label", pa.int8()),
        ("label_name", pa.string()),
        ("group", pa.int8()),
        ("group_name", pa.string()),
    ]
)


def check_image_array(images: np.ndarray, who: str) -> np.ndarray:
    """``images`` as a uint8 (N, 28, 28) array; DataError naming ``who`` otherwise."""
    x = np.asarray(images)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{who}: expected an (N, 28, 28) image array, got shape {x.shape}")
    if x.dtype != np.uint8:
        raise DataError(f"{who}: expected uint8 pixels 0..255, got dtype {x.dtype}")
    return x


def images_to_arrow(images: np.ndarray) -> pa.FixedSizeBinaryArray:
    """uint8 (N, 28, 28) -> fixed_size_binary(784) without a Python loop."""
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1)
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(IMAGE_BYTES), len(images), [None, pa.py_buffer(flat)]
    )


def raw_table(image_ids: list[str] | np.ndarray, images: np.ndarray, labels: np.ndarray) -> pa.Table:
    labels = np.asarray(labels, dtype=np.int64)
    groups = LABEL_TO_GROUP[labels]
    return pa.table(
        {
            "image_id": pa.array(list(image_ids), pa.string()),
            "image": images_to_arrow(images),
            "label": pa.array(labels.astype(np.int8)),
            "label_name": pa.array(np.asarray(LABEL_NAMES, dtype=object)[labels], pa.string()),
            "group": pa.array(groups.astype(np.int8)),
            "group_name": pa.array(np.asarray(GROUP_NAMES, dtype=object)[groups], pa.string()),
        },
        schema=RAW_SCHEMA,
    )


def images_from_table(table: pa.Table, column: str = "image") -> np.ndarray:
    """The image column (fixed_size_binary(784) or binary of 784 bytes) -> uint8 (N, 28, 28)."""
    col = table.column(column).combine_chunks() if isinstance(table, pa.Table) else table
    if pa.types.is_fixed_size_binary(col.type) and col.type.byte_width == IMAGE_BYTES and col.null_count == 0:
        buf = col.buffers()[1]
        arr = np.frombuffer(buf, dtype=np.uint8, count=(col.offset + len(col)) * IMAGE_BYTES)
        return arr[col.offset * IMAGE_BYTES :].reshape(len(col), 28, 28)
    values = col.to_pylist()
    if any(v is None or len(v) != IMAGE_BYTES for v in values):
        raise ValueError(f"column {column!r}: every value must be {IMAGE_BYTES} bytes")
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), 28, 28)


def labels_from_table(table: pa.Table) -> np.ndarray:
    return table.column("label").to_numpy().astype(np.int64)
