"""The real warm scorer (infra/scorer.py), started and stopped by the stack's own code: its token, its
settings check, and bad input answered as the CLI would say it. No Prefect server is needed for
these answers (they come before the flow); tests/e2e/test_warm_scorer.py scores real batches."""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import load_stack_module
from zalando import local_stack
from zalando.local_stack import SCORER, StackScorer, settings_fingerprint
from zalando.s3server import free_port_block, pid_alive
from zalando.settings import Settings


def _stack(tmp: Path) -> Any:
    """The stack of a work folder in ``tmp`` with a file:// lake (no S3 server, no Prefect server)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "ZALANDO_WORK_DIR": str(tmp / "work"),
        "ZALANDO_LAKE_URI": (tmp / "lake").as_uri(),
        "ZALANDO_PREFECT_PORT": str(free_port_block(1)),
        "ZALANDO_TORCH_THREADS": "1",
    }
    return load_stack_module("zalando_stack_scorer").Stack.from_env(env)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, StackScorer, Settings]]:
    """The stack's scorer on a file:// lake without a champion, as `up` starts it."""
    stack = _stack(tmp_path_factory.mktemp("warm"))
    assert stack.start_scorer()
    stack._save_started([SCORER])  # what `up` records
    try:
        found = local_stack.running_scorer(stack.work_dir)
        assert found is not None, stack._log_tail(SCORER)
        yield stack, found, stack.settings()  # the settings the scorer runs
    finally:
        stack.stop_scorer()


def _post(found: StackScorer, body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{found.url}/score", json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _request(settings: Settings, location: str, **kw: Any) -> dict[str, Any]:
    return dict(
        location=location,
        batch_roots=[str(p) for p in settings.batch_root_paths()],
        settings=settings_fingerprint(settings),
        **kw,
    )


def test_the_scorer_binds_localhost_and_its_token_is_the_users_alone(scorer: Any) -> None:
    stack, found, _ = scorer
    assert found.url.startswith("http://127.0.0.1:")
    listening = {
        c.laddr.ip for c in psutil.Process(found.pid).net_connections("inet") if c.status == "LISTEN"
    }
    assert listening == {"127.0.0.1"}
    mode = stat.S_IMODE(local_stack.scorer_file(stack.work_dir).stat().st_mode)
    assert mode == 0o600
    assert pid_alive(found.pid)


def test_a_request_without_the_token_is_refused(scorer: Any) -> None:
    _, found, settings = scorer
    status, _ = _post(found, _request(settings, "file:///etc"), token=None)
    assert status == 401
    status, _ = _post(found, _request(settings, "file:///etc"), token="guess")
    assert status == 401


def test_a_caller_on_other_settings_is_sent_back_to_score_itself(scorer: Any) -> None:
    _, found, settings = scorer
    other = settings.model_copy(update={"lake_uri": "file:///elsewhere"})
    body = dict(_request(settings, "file:///etc"), settings=settings_fingerprint(other))
    status, answer = _post(found, body, found.token)
    assert status == 409 and "lake_uri" in answer["detail"]


def test_bad_input_is_one_line_and_exit_2_as_in_the_cli(scorer: Any, tmp_path: Path) -> None:
    _, found, settings = scorer
    # no champion in this lake: the CLI's own message, before any flow starts
    status, answer = _post(found, _request(settings, (tmp_path / "inbox").as_uri()), found.token)
    assert status == 200 and answer["ok"] is False and answer["exit_code"] == 2
    assert "champion" in answer["error"] and "\n" not in answer["error"]
    # a location outside the caller's batch roots is refused before anything is read
    status, answer = _post(
        found, _request(settings, "file:///etc", model_version="v1", batch_date="2026-07-01"), found.token
    )
    assert answer["ok"] is False and answer["exit_code"] == 2, answer
    assert "/etc" in answer["error"], answer["error"]


def test_stop_removes_the_process_and_its_token(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    assert stack.start_scorer()
    pid = stack._running(SCORER)
    assert pid is not None and not stack.start_scorer()  # running: not started twice
    assert stack.stop_scorer()
    assert not pid_alive(pid)
    assert not local_stack.scorer_file(stack.work_dir).exists()


def test_progress_needs_the_token_and_is_empty_between_batches(scorer: Any) -> None:
    _, found, _ = scorer
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{found.url}/progress", timeout=10)
    assert refused.value.code == 401
    assert local_stack.scorer_progress(found) is None  # {}: no batch now
    req = urllib.request.Request(f"{found.url}/progress", headers={"Authorization": f"Bearer {found.token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read()) == {}
