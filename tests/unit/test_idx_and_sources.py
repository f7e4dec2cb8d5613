"""Strict parsing and source checks on generated IDX files: every bad case is a one-line DataError."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_images, write_idx_folder
from zalando.data.idx import decompress, encode_images, encode_labels, parse_images, parse_labels, read_split
from zalando.data.sources import fetch_source
from zalando.errors import DataError, SourceError


def test_roundtrip_generated_files(tmp_path: Path) -> None:
    images, labels = make_images(12)
    got_i = parse_images("x", decompress("x.gz", gzip.compress(encode_images(images))))
    got_l = parse_labels("y", encode_labels(labels))
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)


def test_wrong_magic_number() -> None:
    images, _ = make_images(3)
    raw = bytearray(encode_images(images))
    raw[:4] = struct.pack(">I", 2049)
    with pytest.raises(DataError, match=r"imgs: wrong magic number 0x00000801, expected 0x00000803"):
        parse_images("imgs", bytes(raw))
    with pytest.raises(DataError, match="wrong magic number"):
        parse_labels("labs", encode_images(images)[:8] + b"\x00" * 3)


def test_wrong_dimensions() -> None:
    raw = struct.pack(">IIII", 2051, 2, 32, 32) + bytes(2 * 32 * 32)
    with pytest.raises(DataError, match=r"wrong dimensions 32x32, expected 28x28"):
        parse_images("imgs", raw)


def test_truncated_payload_and_gzip() -> None:
    images, _ = make_images(4)
    raw = encode_images(images)
    with pytest.raises(DataError, match="header says 4 images"):
        parse_images("imgs", raw[:-10])
    gz = gzip.compress(raw)
    with pytest.raises(DataError, match=r"t.gz: truncated gzip stream"):
        decompress("t.gz", gz[: len(gz) // 2])
    with pytest.raises(DataError, match=r"c.gz: corrupt gzip stream"):
        decompress("c.gz", gz[:10] + b"\xff" * 40 + gz[50:])
    with pytest.raises(DataError, match="not a gzip file"):
        decompress("n.gz", b"hello")


def test_count_mismatch_and_label_range() -> None:
    images, labels = make_images(5)
    with pytest.raises(DataError, match=r"image/label count mismatch \(5 images, 4 labels\)"):
        read_split(
            "i.gz", gzip.compress(encode_images(images)), "l.gz", gzip.compress(encode_labels(labels[:4]))
        )
    bad = labels.copy()
    bad[3] = 12
    with pytest.raises(DataError, match=r"label 12 at index 3 is out of range 0-9"):
        parse_labels("l", encode_labels(bad))


def test_checksum_mismatch_names_file_and_both_sums(tmp_path: Path) -> None:
    folder = write_idx_folder(tmp_path / "s", make_images(10), make_images(5, 3))
    # tamper with a file after its checksum was recorded
    p = folder / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(encode_labels(np.zeros(5, dtype=np.uint8)), mtime=0))
    with pytest.raises(DataError) as e:
        fetch_source(str(folder), cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert msg.startswith("t10k-labels-idx1-ubyte.gz: sha256 checksum mismatch: expected ")
    assert len([w for w in msg.split() if len(w.strip(",")) == 64]) == 2


def test_official_md5_used_without_sums_file(tmp_path: Path) -> None:
    folder = write_idx_folder(tmp_path / "s", make_images(10), make_images(5, 3), sums=False)
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte.gz: md5 checksum mismatch: expected 8d4fb7e6c68d591d4c3dfef9ec88bf0d, got [0-9a-f]{32}",
    ):
        fetch_source(str(folder), cache_dir=tmp_path / "c")


def test_real_mini_files_verify(mini_dir: Path, tmp_path: Path) -> None:
    src = fetch_source(str(mini_dir), cache_dir=tmp_path)
    assert {c["algorithm"] for c in src.checksums.values()} == {"sha256"}
    assert len(src.digest) == 16


def test_unreachable_url_fails_fast_with_advice(tmp_path: Path) -> None:
    import time

    t0 = time.monotonic()
    with pytest.raises(SourceError) as e:
        fetch_source("http://127.0.0.1:9/fashion/", cache_dir=tmp_path, timeout=3)
    assert time.monotonic() - t0 < 10
    assert "unreachable" in str(e.value) and "ZALANDO_DATA_SOURCE" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="folder does not exist"):
        fetch_source(str(tmp_path / "nope"), cache_dir=tmp_path)
    folder = write_idx_folder(tmp_path / "s", make_images(10), make_images(5, 3))
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceError, match="file train-labels-idx1-ubyte.gz is missing"):
        fetch_source(str(folder), cache_dir=tmp_path)
