"""Shared fixtures: data folders, generated IDX files, and a real SeaweedFS S3 server."""

from __future__ import annotations

import gzip
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zalando.data.idx import encode_images, encode_labels
from zalando.lake import Lake, S3Config
from zalando.s3server import S3Server, free_port_block
from zalando.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MINI_DIR = SHARED_DATA / "fashion-mnist-mini"
FULL_DIR = SHARED_DATA / "fashion-mnist"

TEST_ACCESS_KEY = "zalando-test"
TEST_SECRET_KEY = "zalando-test-secret-3f9a"


@pytest.fixture(scope="session", autouse=True)
def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")


@pytest.fixture(scope="session", autouse=True)
def _batch_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """file:// batches may lie only under ZALANDO_BATCH_ROOTS (default: the work folder and the current
    directory). Tests write their batches to tmp_path, so the session allows its own temporary folder,
    and nothing else: a test of the boundary narrows it further with monkeypatch.setenv. Subprocesses
    (the CLI, workers) inherit it."""
    old = os.environ.get("ZALANDO_BATCH_ROOTS")
    os.environ["ZALANDO_BATCH_ROOTS"] = str(tmp_path_factory.getbasetemp().resolve())
    yield
    if old is None:
        os.environ.pop("ZALANDO_BATCH_ROOTS", None)
    else:
        os.environ["ZALANDO_BATCH_ROOTS"] = old


@pytest.fixture(scope="session")
def mini_dir() -> Path:
    assert (MINI_DIR / "SHA256SUMS").is_file(), f"mini data set missing at {MINI_DIR}"
    return MINI_DIR


@pytest.fixture(scope="session")
def full_dir() -> Path:
    assert (FULL_DIR / "SHA256SUMS").is_file(), f"full data set missing at {FULL_DIR}"
    return FULL_DIR


def make_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n distinct, non-blank 28x28 images and labels cycling 0-9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 10:18, 10:18] = 255  # an article-like bright block: never near-empty or low-contrast
    labels = np.arange(n) % 10
    return images, labels


def write_idx_folder(
    folder: Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    raw_overrides: dict[str, bytes] | None = None,
    sums: bool = True,
) -> Path:
    """Write the four .gz files (plus SHA256SUMS) into folder; raw_overrides replace file bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    payloads = {
        "train-images-idx3-ubyte.gz": gzip.compress(encode_images(train[0]), mtime=0),
        "train-labels-idx1-ubyte.gz": gzip.compress(encode_labels(train[1]), mtime=0),
        "t10k-images-idx3-ubyte.gz": gzip.compress(encode_images(test[0]), mtime=0),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(encode_labels(test[1]), mtime=0),
    }
    payloads.update(raw_overrides or {})
    lines = []
    for name, data in payloads.items():
        (folder / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
    if sums:
        (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def idx_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write a generated IDX source folder (valid unless told otherwise)."""

    def make(name: str = "src", n_train: int = 60, n_test: int = 20, **kw) -> Path:
        return write_idx_folder(tmp_path / name, make_images(n_train, 1), make_images(n_test, 2), **kw)

    return make


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server on free ports, for the whole test session."""
    state = tmp_path_factory.mktemp("seaweedfs")
    server = S3Server(
        state_dir=state, port=free_port_block(), access_key=TEST_ACCESS_KEY, secret_key=TEST_SECRET_KEY
    )
    server.start(timeout=90)
    yield server
    server.stop()


@pytest.fixture
def s3_settings(s3_server: S3Server, tmp_path: Path) -> Settings:
    """Settings for a fresh, empty lake prefix on the test S3 server."""
    return Settings(
        lake_uri=f"s3://zalando-test/{uuid.uuid4().hex[:10]}",
        s3_endpoint=s3_server.endpoint,
        s3_access_key=TEST_ACCESS_KEY,
        s3_secret_key=TEST_SECRET_KEY,
        work_dir=tmp_path / "work",
        profile="quick",
    )


@pytest.fixture
def s3_lake(s3_settings: Settings) -> Lake:
    lake = Lake.from_settings(s3_settings)
    lake.ensure_ready()
    return lake


@pytest.fixture
def local_lake(tmp_path: Path) -> Lake:
    return Lake.local(tmp_path / "lake")


def s3_config(server: S3Server, **kw) -> S3Config:
    return S3Config(endpoint=server.endpoint, access_key=TEST_ACCESS_KEY, secret_key=TEST_SECRET_KEY, **kw)


def load_stack_module(name: str) -> Any:
    """infra/stack.py (a script, not a package module) imported under ``name``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "infra" / "stack.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def mini_split() -> dict[str, np.ndarray]:
    """The mini set's 2,000 training images: the first 1,500 to train on, the rest to validate."""
    from zalando.data.idx import read_idx_images, read_idx_labels

    x = read_idx_images(str(MINI_DIR / "train-images-idx3-ubyte.gz"))
    y = read_idx_labels(str(MINI_DIR / "train-labels-idx1-ubyte.gz"))
    return {"x_train": x[:1500], "y_train": y[:1500], "x_val": x[1500:], "y_val": y[1500:]}
