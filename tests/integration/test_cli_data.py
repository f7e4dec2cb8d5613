"""The `zalando` command on bad input: one line on stderr, non-zero exit, nothing committed."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY, make_images, write_idx_folder
from zalando.data.idx import encode_images
from zalando.lake import Lake
from zalando.s3server import S3Server
from zalando.settings import Settings


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "zalando.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def _env(server: S3Server, tmp_path: Path, prefix: str) -> dict[str, str]:
    return {
        "ZALANDO_LAKE_URI": f"s3://zalando-cli/{prefix}",
        "ZALANDO_S3_ENDPOINT": server.endpoint,
        "ZALANDO_S3_ACCESS_KEY": TEST_ACCESS_KEY,
        "ZALANDO_S3_SECRET_KEY": TEST_SECRET_KEY,
        "ZALANDO_WORK_DIR": str(tmp_path / "work"),
    }


def _bad_sources(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    train, test = make_images(10, 1), make_images(5, 2)
    bad_dims = encode_images(make_images(10, 1)[0])
    bad_dims = bad_dims[:8] + (32).to_bytes(4, "big") + bad_dims[12:]
    gz = gzip.compress(encode_images(train[0]))
    return {
        "truncated": (
            write_idx_folder(
                tmp_path / "t", train, test, raw_overrides={"train-images-idx3-ubyte.gz": gz[: len(gz) // 3]}
            ),
            "truncated gzip",
        ),
        "magic": (
            write_idx_folder(
                tmp_path / "m",
                train,
                test,
                raw_overrides={
                    "train-images-idx3-ubyte.gz": gzip.compress(
                        b"\x00\x00\x08\x01" + encode_images(train[0])[4:]
                    )
                },
            ),
            "wrong magic number",
        ),
        "dims": (
            write_idx_folder(
                tmp_path / "d",
                train,
                test,
                raw_overrides={"train-images-idx3-ubyte.gz": gzip.compress(bad_dims)},
            ),
            "wrong dimensions 32x28",
        ),
        "count": (write_idx_folder(tmp_path / "c", train, (test[0], test[1][:4])), "count mismatch"),
    }


@pytest.mark.parametrize("case", ["truncated", "magic", "dims", "count"])
def test_bad_source_one_line_error_nothing_committed(case: str, s3_server: S3Server, tmp_path: Path) -> None:
    folder, expected = _bad_sources(tmp_path)[case]
    env = _env(s3_server, tmp_path, f"bad-{case}")
    r = run_cli(["ingest", "--source", str(folder)], env)
    assert r.returncode == 2, r.stderr
    error_lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], r.stderr
    assert "Traceback" not in r.stderr
    settings = Settings(**{k[len("ZALANDO_") :].lower(): v for k, v in env.items()})
    assert Lake.from_settings(settings).list_keys() == []


def test_offline_source_and_wrong_credentials(s3_server: S3Server, tmp_path: Path) -> None:
    env = _env(s3_server, tmp_path, "offline")
    r = run_cli(["ingest", "--source", "http://127.0.0.1:9/fashion-mnist/"], env)
    assert r.returncode == 2 and "unreachable" in r.stderr and "ZALANDO_DATA_SOURCE" in r.stderr
    r = run_cli(["ingest", "--source", "/nonexistent"], {**env, "ZALANDO_S3_SECRET_KEY": "wrong-secret-123"})
    assert r.returncode == 2 and "wrong S3 credentials" in r.stderr
    assert "wrong-secret-123" not in r.stderr + r.stdout


def test_ingest_cli_mini_then_eda(s3_server: S3Server, tmp_path: Path, mini_dir: Path) -> None:
    env = _env(s3_server, tmp_path, "ok")
    r = run_cli(["ingest", "--source", str(mini_dir)], env)
    assert r.returncode == 0, r.stderr
    assert "2000" in r.stdout and "dataset version ds-" in r.stdout
    r = run_cli(["eda"], env)
    assert r.returncode == 0, r.stderr
    assert "eda.md" in r.stdout


def test_embedded_server_started_and_stopped_by_the_cli(
    tmp_path: Path, mini_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando.s3server import free_port_block, port_answers

    port = free_port_block()
    env = {
        "ZALANDO_WORK_DIR": str(tmp_path / "work"),
        "ZALANDO_S3_PORT": str(port),
        "ZALANDO_LAKE_URI": "s3://zalando/lake",
    }
    monkeypatch.delenv("ZALANDO_S3_ENDPOINT", raising=False)  # restored after: later tests use the server
    r = run_cli(["ingest", "--source", str(mini_dir)], {**env, "ZALANDO_S3_ENDPOINT": ""})
    assert r.returncode == 0, r.stderr
    assert "embedded S3 started" in r.stderr and not port_answers(port)
    assert (tmp_path / "work" / "s3" / "identities.json").stat().st_mode & 0o077 == 0
    r = run_cli(["stack", "up"], {**env, "ZALANDO_S3_ENDPOINT": ""})
    try:
        assert r.returncode == 0 and port_answers(port)
        r = run_cli(["ingest", "--source", str(mini_dir)], {**env, "ZALANDO_S3_ENDPOINT": ""})
        assert (
            r.returncode == 0 and "already ingested" in r.stderr.replace("\n", " ") or "skipped" in r.stdout
        )
        assert port_answers(port)
    finally:
        assert run_cli(["stack", "down"], {**env, "ZALANDO_S3_ENDPOINT": ""}).returncode == 0
    assert not port_answers(port)
