"""Fixtures for flow tests: ONE Prefect test harness for the whole session (it costs 13-15 s to
start), and the environment the flows read their settings from, pointing at the session's real
SeaweedFS server (``s3_server`` in tests/conftest.py) and the mini data set."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MINI_DIR, TEST_ACCESS_KEY, TEST_SECRET_KEY
from zalando.s3server import S3Server


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server and database for every flow test of the session.

    Results and cache records go to a temporary folder, so caches never leak between sessions.
    """
    from prefect.settings import (
        PREFECT_CLIENT_MAX_RETRIES,
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_DATABASE_TIMEOUT,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    settings = {
        PREFECT_HOME: home,
        PREFECT_LOCAL_STORAGE_PATH: home / "storage",
        # test_load's ten flow runs at once share one SQLite file with the rest of the suite: on a
        # slow 2-core CPU (AVX2 AMD EPYC, 2026-12-02) one call still got the server's "retryable"
        # 503 after the client's 5 retries (about a minute). A busy host gets a longer database
        # timeout (default 10 s) and more retries
        PREFECT_SERVER_DATABASE_TIMEOUT: 30.0,
        PREFECT_CLIENT_MAX_RETRIES: 8,
    }
    with temporary_settings(settings):
        with prefect_test_harness(server_startup_timeout=180):
            yield


@pytest.fixture(scope="session")
def flow_env(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """ZALANDO_* settings for flows: the test S3 server, a fresh lake prefix, mini data, `quick` profile."""
    work: Path = tmp_path_factory.mktemp("flow-work")
    env = {
        "ZALANDO_LAKE_URI": f"s3://zalando-flows/{uuid.uuid4().hex[:10]}",
        "ZALANDO_S3_ENDPOINT": s3_server.endpoint,
        "ZALANDO_S3_ACCESS_KEY": TEST_ACCESS_KEY,
        "ZALANDO_S3_SECRET_KEY": TEST_SECRET_KEY,
        "ZALANDO_DATA_SOURCE": str(MINI_DIR),
        "ZALANDO_WORK_DIR": str(work),
        "ZALANDO_PROFILE": "quick",
        "ZALANDO_TORCH_THREADS": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
