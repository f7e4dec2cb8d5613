"""Ingest bad-input cases the earlier tests do not cover: a zero-byte file, a text (HTML) file where a
.gz should be, a plain IDX file named .gz, valid gzip holding text, a gzip bomb, a garbage SHA256SUMS.

Each one: a one-line DataError naming the file and the problem, and the lake exactly as it was
(a failed run changes nothing committed). The earlier cases (truncated, magic, dimensions, counts,
checksums, label range, offline, missing files) live in tests/unit/test_idx_and_sources.py,
tests/unit/test_ingest.py and tests/integration/test_cli_data.py.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_ACCESS_KEY, TEST_SECRET_KEY, make_images, write_idx_folder
from tests.faults import RecordProperty, record_case
from zalando.data import idx
from zalando.data.idx import encode_images
from zalando.data.ingest import ingest
from zalando.data.sources import fetch_source
from zalando.data.split import preprocess
from zalando.errors import DataError
from zalando.lake import Lake
from zalando.s3server import S3Server

IMAGES = "train-images-idx3-ubyte.gz"
LABELS = "train-labels-idx1-ubyte.gz"
HTML = b"<html><head><title>404 Not Found</title></head><body>captive portal</body></html>\n"

# case -> (file bytes that replace one of the four files, which file, what the error must say)
CASES = {
    "zero_byte_images": (b"", IMAGES, "not a gzip file (bad header bytes empty)"),
    "zero_byte_labels": (b"", LABELS, "not a gzip file (bad header bytes empty)"),
    "html_instead_of_gz": (HTML, IMAGES, "not a gzip file (bad header bytes 3c68)"),
    "plain_idx_named_gz": (encode_images(make_images(60, 1)[0]), IMAGES, "not a gzip file"),
    "gzip_of_text": (gzip.compress(HTML * 3), IMAGES, "wrong magic number"),
    "gzip_of_nothing": (gzip.compress(b""), LABELS, "too short for an IDX label header (0 bytes)"),
}


def snapshot(lake: Lake) -> dict[str, str]:
    return {k: hashlib.sha256(lake.read_bytes(k)).hexdigest() for k in lake.list_keys()}


@pytest.fixture
def committed_lake(local_lake: Lake, idx_folder) -> Lake:  # noqa: ANN001 - factory fixture
    """A lake that already holds a good ingest and dataset version."""
    src = fetch_source(str(idx_folder("good")), cache_dir=local_lake.root)
    ingest(local_lake, src)
    preprocess(local_lake, seed=1)
    return local_lake


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_is_one_line_and_changes_nothing_committed(
    case: str, committed_lake: Lake, tmp_path: Path, record_property: RecordProperty
) -> None:
    data, name, expected = CASES[case]
    before = snapshot(committed_lake)
    folder = write_idx_folder(
        tmp_path / case, make_images(60, 1), make_images(20, 2), raw_overrides={name: data}
    )
    with pytest.raises(DataError) as e:
        src = fetch_source(str(folder), cache_dir=tmp_path)  # checksums match: SHA256SUMS lists these bytes
        ingest(committed_lake, src, force=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith(name) and expected in message, message
    assert snapshot(committed_lake) == before
    record_case(
        record_property,
        f"ingest: {case.replace('_', ' ')} ({name})",
        f"one-line DataError: {message}",
        lost="nothing: the committed lake is byte-identical",
    )


def test_zero_byte_file_without_sums_fails_the_official_checksum(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    folder = write_idx_folder(
        tmp_path / "nosums", make_images(10, 1), make_images(5, 2), raw_overrides={IMAGES: b""}, sums=False
    )
    with pytest.raises(DataError, match=rf"{IMAGES}: md5 checksum mismatch: expected 8d4f\w+, got d41d8cd9"):
        fetch_source(str(folder), cache_dir=tmp_path)
    record_case(
        record_property,
        "ingest: zero-byte file, no SHA256SUMS",
        "one-line DataError: md5 checksum mismatch naming the file and both sums",
        lost="nothing (fails before parsing)",
    )


def test_garbage_sums_file_falls_back_to_the_official_checksums(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    folder = write_idx_folder(tmp_path / "g", make_images(10, 1), make_images(5, 2))
    (folder / "SHA256SUMS").write_bytes(os.urandom(300))
    with pytest.raises(DataError, match="md5 checksum mismatch"):
        fetch_source(str(folder), cache_dir=tmp_path)
    record_case(
        record_property,
        "ingest: SHA256SUMS full of random bytes",
        "ignored; official md5s checked: one-line checksum mismatch",
        lost="nothing (fails before parsing)",
    )


def test_gzip_bomb_is_refused_before_it_is_inflated(
    committed_lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property: RecordProperty
) -> None:
    import tracemalloc

    monkeypatch.setattr(idx, "MAX_DECOMPRESSED_BYTES", 2 * 2**20)  # the real cap is 256 MiB
    bomb = gzip.compress(b"\0" * (64 * 2**20), compresslevel=9)  # 64 KiB on disk, 64 MiB inflated
    assert len(bomb) < 200_000
    before = snapshot(committed_lake)
    folder = write_idx_folder(
        tmp_path / "bomb", make_images(10, 1), make_images(5, 2), raw_overrides={IMAGES: bomb}
    )
    src = fetch_source(str(folder), cache_dir=tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"{IMAGES}: decompresses to more than 2 MiB") as e:
            ingest(committed_lake, src, force=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(e.value)
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB while refusing a 64 MiB bomb"
    assert snapshot(committed_lake) == before
    record_case(
        record_property,
        "ingest: gzip bomb (64 KiB -> 64 MiB) that passes its own SHA256SUMS",
        f"one-line DataError before inflating; peak Python memory {peak / 2**20:.1f} MiB",
        lost="nothing: the committed lake is byte-identical",
    )


def test_cli_text_file_in_place_of_gz_one_line_nothing_written(
    s3_server: S3Server, tmp_path: Path, record_property: RecordProperty
) -> None:
    folder = write_idx_folder(
        tmp_path / "html", make_images(10, 1), make_images(5, 2), raw_overrides={IMAGES: HTML}
    )
    env = {
        **os.environ,
        "COLUMNS": "200",
        "ZALANDO_LAKE_URI": "s3://zalando-bad/html",
        "ZALANDO_S3_ENDPOINT": s3_server.endpoint,
        "ZALANDO_S3_ACCESS_KEY": TEST_ACCESS_KEY,
        "ZALANDO_S3_SECRET_KEY": TEST_SECRET_KEY,
        "ZALANDO_WORK_DIR": str(tmp_path / "work"),
    }
    r = subprocess.run(
        [sys.executable, "-m", "zalando.cli", "ingest", "--source", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {IMAGES}: not a gzip file (bad header bytes 3c68)"], r.stderr
    assert "Traceback" not in r.stderr
    from tests.conftest import s3_config

    assert Lake.from_uri("s3://zalando-bad/html", s3_config(s3_server)).list_keys() == []
    record_case(
        record_property,
        "zalando ingest: an HTML page where a .gz should be",
        f"exit 2, stderr: {errors[0]}",
        lost="nothing written to the lake",
    )
