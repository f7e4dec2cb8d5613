"""Strict reading of IDX files (the Fashion-MNIST / MNIST container), gzip or plain."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from zalando.errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
IMAGE_SIDE = 28
NUM_CLASSES = 10
MAX_DECOMPRESSED_BYTES = 256 * 2**20  # the full training images are 47 MB: 5x headroom


def decompress(name: str, data: bytes) -> bytes:
    """Gunzip data if it is gzip; a truncated or corrupt stream is a DataError naming the file."""
    if data[:2] != b"\x1f\x8b":
        if name.endswith(".gz"):
            raise DataError(f"{name}: not a gzip file (bad header bytes {data[:2].hex() or 'empty'})")
        return data
    try:
        return _gunzip_capped(name, data, MAX_DECOMPRESSED_BYTES)
    except EOFError:
        raise DataError(
            f"{name}: truncated gzip stream (file ends before the end-of-stream marker)"
        ) from None
    except (OSError, zlib.error) as e:
        raise DataError(f"{name}: corrupt gzip stream ({e})") from None


def _gunzip_capped(name: str, data: bytes, limit: int) -> bytes:
    """gunzip (every member) but never more than limit bytes: a gzip bomb cannot fill the memory."""
    out = bytearray()
    rest = data
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out += d.decompress(rest, limit + 1 - len(out))
        if len(out) > limit:
            raise DataError(
                f"{name}: decompresses to more than {limit / 2**20:g} MiB "
                "(Fashion-MNIST's largest file is 45 MiB): refused before reading the rest"
            )
        if not d.eof:
            raise EOFError
        rest = d.unused_data
        if not rest.strip(b"\x00"):  # gzip allows zero padding after the last member
            break
    return bytes(out)


def parse_images(name: str, raw: bytes) -> np.ndarray:
    """IDX3 images -> uint8 array (N, 28, 28). Checks magic number, dimensions and payload size."""
    if len(raw) < 16:
        raise DataError(f"{name}: too short for an IDX image header ({len(raw)} bytes)")
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != IMAGES_MAGIC:
        raise DataError(
            f"{name}: wrong magic number {magic:#010x}, expected {IMAGES_MAGIC:#010x} (IDX images)"
        )
    if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{name}: wrong dimensions {rows}x{cols}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    expected = 16 + n * rows * cols
    if len(raw) != expected:
        raise DataError(f"{name}: payload is {len(raw)} bytes, header says {n} images ({expected} bytes)")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def parse_labels(name: str, raw: bytes) -> np.ndarray:
    """IDX1 labels -> uint8 array (N,). Checks magic number, payload size and the 0-9 range."""
    if len(raw) < 8:
        raise DataError(f"{name}: too short for an IDX label header ({len(raw)} bytes)")
    magic, n = struct.unpack(">II", raw[:8])
    if magic != LABELS_MAGIC:
        raise DataError(
            f"{name}: wrong magic number {magic:#010x}, expected {LABELS_MAGIC:#010x} (IDX labels)"
        )
    if len(raw) != 8 + n:
        raise DataError(f"{name}: payload is {len(raw)} bytes, header says {n} labels ({8 + n} bytes)")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if n and labels.max() >= NUM_CLASSES:
        bad = int(np.flatnonzero(labels >= NUM_CLASSES)[0])
        raise DataError(f"{name}: label {labels[bad]} at index {bad} is out of range 0-{NUM_CLASSES - 1}")
    return labels


def read_split(
    images_name: str, images_gz: bytes, labels_name: str, labels_gz: bytes
) -> tuple[np.ndarray, np.ndarray]:
    """Parse one split's image and label files and check their counts agree."""
    images = parse_images(images_name, decompress(images_name, images_gz))
    labels = parse_labels(labels_name, decompress(labels_name, labels_gz))
    if len(images) != len(labels):
        raise DataError(
            f"{images_name}/{labels_name}: image/label count mismatch ({len(images)} images, {len(labels)} labels)"
        )
    return images, labels


def encode_images(images: np.ndarray) -> bytes:
    """uint8 (N, 28, 28) -> IDX3 bytes (uncompressed); the inverse of parse_images."""
    n, r, c = images.shape
    return (
        struct.pack(">IIII", IMAGES_MAGIC, n, r, c) + np.ascontiguousarray(images, dtype=np.uint8).tobytes()
    )


def encode_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", LABELS_MAGIC, len(labels)) + np.asarray(labels, dtype=np.uint8).tobytes()


def read_idx_images(path: str) -> np.ndarray:
    """Convenience for scripts: read an IDX image file (.gz or plain) from a local path."""
    with open(path, "rb") as f:
        return parse_images(path, decompress(path, f.read())).copy()


def read_idx_labels(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return parse_labels(path, decompress(path, f.read())).astype(np.int64)
