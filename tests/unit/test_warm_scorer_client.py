"""`zalando score` hands a batch to the local stack's warm scorer (infra/scorer.py) when `up` started
one for its work folder, and scores in its own process otherwise.

The scorer here is a stand-in: a small http.server, run as ``.../scorer.py`` (the command line the
stack's PID check asks for), that answers /health, records each /score request, and gives the answer
the test chose. The real scorer is started in tests/integration/test_warm_scorer.py and scores
real batches through the real stack in tests/e2e/test_warm_scorer.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from zalando import cli, cli_score, local_stack
from zalando.errors import ZalandoError
from zalando.local_stack import SCORER, ScorerUnavailable, settings_fingerprint
from zalando.s3server import free_port_block
from zalando.settings import Settings

STAND_IN = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

state = json.load(open(sys.argv[sys.argv.index("--state") + 1]))
answer_file, requests_file = sys.argv[sys.argv.index("--answer") + 1], sys.argv[sys.argv.index("--log") + 1]


class Scorer(BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"ready": True} if self.path == "/health" else {"completed": 2, "total": 3, "rate": 4.0}
        self.send_response(200 if self.path in ("/health", "/progress") else 404)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(requests_file, "a") as f:
            f.write(json.dumps({"auth": self.headers.get("Authorization"), "body": body}) + "\n")
        status, answer = json.load(open(answer_file))
        time.sleep(answer.pop("delay_s", 0))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(answer).encode())

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", state["port"]), Scorer).serve_forever()
"""

SUMMARY = {
    "batch_id": "2026-07-01-inbox",
    "model_version": "v-warm",
    "records": 3,
    "scored": 3,
    "quarantined": 0,
    "low_confidence": 1,
    "seconds": 0.5,
    "group_counts": {"upper_part": 3},
    "predictions_table": "zalando.predictions",
    "snapshot_id": 42,
}
LOGS = [
    {
        "name": "zalando.cli_score",
        "level": logging.INFO,
        "message": "Prefect API: X (through its warm scorer)",
    }
]


@dataclass
class StandIn:
    work_dir: Path
    token: str
    proc: subprocess.Popen[bytes]
    answer_file: Path
    requests_file: Path

    def answer(self, status: int, body: dict[str, Any]) -> None:
        self.answer_file.write_text(json.dumps([status, body]))

    def requests(self) -> list[dict[str, Any]]:
        if not self.requests_file.exists():
            return []
        return [json.loads(line) for line in self.requests_file.read_text().splitlines()]


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    """A scorer `up` started (stack.json, scorer.pid, scorer.json), answering on a free port."""
    work = tmp_path / "work"
    local_stack.state_dir(work).mkdir(parents=True)
    state = local_stack.scorer_file(work)
    state.write_text(json.dumps({"port": free_port_block(1), "token": "t0ken"}))
    script = tmp_path / "scorer.py"
    script.write_text(STAND_IN)
    answer, requests = tmp_path / "answer.json", tmp_path / "requests.jsonl"
    answer.write_text(json.dumps([200, {"ok": True, "summary": SUMMARY, "logs": LOGS}]))
    cmd = [
        sys.executable,
        str(script),
        "--state",
        str(state),
        "--answer",
        str(answer),
        "--log",
        str(requests),
    ]
    proc = subprocess.Popen(cmd)
    local_stack.pid_file(work, SCORER).write_text(json.dumps({"pid": proc.pid, "cmd": cmd}))
    local_stack.stack_file(work).write_text(json.dumps({"started": [SCORER]}))
    for name in ("PREFECT_API_URL", "ZALANDO_SCORER", "ZALANDO_BATCH_ROOTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ZALANDO_WORK_DIR", str(work))
    monkeypatch.setenv("ZALANDO_LAKE_URI", (tmp_path / "lake").as_uri())
    monkeypatch.setattr(cli_score, "setup_logging", lambda verbose: None)  # keep pytest's log handlers
    try:
        deadline = time.monotonic() + 20
        while local_stack.running_scorer(work) is None:
            assert time.monotonic() < deadline, "the stand-in scorer did not come up"
            time.sleep(0.1)
        yield StandIn(work, "t0ken", proc, answer, requests)
    finally:
        proc.kill()
        proc.wait()


def _in_process(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """score_one (the in-process path) replaced by one that records its call and stops there."""
    called: list[str] = []

    def score_one(lake: Any, settings: Any, location: str, **kw: Any) -> dict[str, Any]:
        called.append(location)
        raise ZalandoError("scored in this process")

    monkeypatch.setattr(cli_score, "score_one", score_one)
    monkeypatch.setattr(cli_score, "flow_env", lambda settings: "a test")
    return called


def test_score_hands_the_batch_to_the_warm_scorer_and_prints_its_answer(
    stand_in: StandIn, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    called = _in_process(monkeypatch)
    here = stand_in.work_dir.parent / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with caplog.at_level(logging.INFO):
        r = CliRunner().invoke(cli.app, ["score", "file:///data/inbox", "--date", "2026-07-01", "--force"])
    assert r.exit_code == 0, r.output
    assert "batch 2026-07-01-inbox with model v-warm (scored)" in r.output
    assert "predictions: zalando.predictions where batch_id = '2026-07-01-inbox'" in r.output
    assert "Prefect API: X (through its warm scorer)" in caplog.text  # the run's log, written here
    assert called == []  # nothing ran in this process
    [req] = stand_in.requests()
    assert req["auth"] == "Bearer t0ken"
    body = req["body"]
    assert (body["location"], body["batch_date"], body["force"], body["runner"]) == (
        "file:///data/inbox",
        "2026-07-01",
        True,
        "local",
    )
    settings = Settings()
    assert body["batch_roots"] == [str(p) for p in settings.batch_root_paths()]
    assert str(here.resolve()) in body["batch_roots"]  # this command's directory, not the scorer's
    assert body["settings"] == settings_fingerprint(settings)


def test_an_error_the_scorer_answers_is_one_line_and_its_exit_code(stand_in: StandIn) -> None:
    stand_in.answer(
        200, {"ok": False, "error": "file:///x is outside the batch roots", "exit_code": 2, "logs": []}
    )
    r = CliRunner().invoke(cli.app, ["score", "file:///x"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: file:///x is outside the batch roots"


def test_a_scorer_on_other_settings_leaves_the_batch_to_this_process(
    stand_in: StandIn, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    called = _in_process(monkeypatch)
    stand_in.answer(409, {"detail": "the scorer runs other settings (lake_uri)"})
    with caplog.at_level(logging.INFO):
        r = CliRunner().invoke(cli.app, ["score", "file:///data/inbox"])
    assert r.exit_code == 2 and "scored in this process" in r.output, r.output
    assert called == ["file:///data/inbox"]
    assert "cannot take this batch" in caplog.text and "lake_uri" in caplog.text


def test_zalando_scorer_off_and_another_prefect_api_score_in_this_process(
    stand_in: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    called = _in_process(monkeypatch)
    monkeypatch.setenv("ZALANDO_SCORER", "off")
    assert CliRunner().invoke(cli.app, ["score", "file:///a"]).exit_code == 2
    monkeypatch.delenv("ZALANDO_SCORER")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")  # not this stack's server
    assert CliRunner().invoke(cli.app, ["score", "file:///b"]).exit_code == 2
    assert called == ["file:///a", "file:///b"]
    assert stand_in.requests() == []


def test_a_scorer_that_died_or_was_not_started_by_up_is_not_used(stand_in: StandIn) -> None:
    assert local_stack.running_scorer(stand_in.work_dir) is not None
    local_stack.stack_file(stand_in.work_dir).write_text(json.dumps({"started": ["s3"]}))
    assert local_stack.running_scorer(stand_in.work_dir) is None
    local_stack.stack_file(stand_in.work_dir).write_text(json.dumps({"started": [SCORER]}))
    stand_in.proc.kill()
    stand_in.proc.wait()
    assert local_stack.running_scorer(stand_in.work_dir) is None


def test_request_score_tells_a_refusal_from_a_lost_answer(stand_in: StandIn) -> None:
    scorer = local_stack.running_scorer(stand_in.work_dir)
    assert scorer is not None
    stand_in.answer(409, {"detail": "other settings"})
    with pytest.raises(ScorerUnavailable, match="other settings"):
        local_stack.request_score(scorer, {})
    stand_in.answer(500, {"detail": "boom"})
    with pytest.raises(OSError, match="HTTP 500"):
        local_stack.request_score(scorer, {})
    stand_in.proc.kill()
    stand_in.proc.wait()
    with pytest.raises(ScorerUnavailable, match="refused"):
        local_stack.request_score(scorer, {})


def test_settings_fingerprint_sees_secrets_and_paths_but_not_batch_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    base = Settings(work_dir=Path("work"), s3_secret_key="a" * 16)
    same = Settings(work_dir=tmp_path / "work", s3_secret_key="a" * 16, batch_roots=[tmp_path])
    assert settings_fingerprint(base) == settings_fingerprint(same)  # relative = absolute; roots per request
    other = settings_fingerprint(Settings(work_dir=tmp_path / "work", s3_secret_key="b" * 16))
    differ = [k for k, v in settings_fingerprint(base).items() if other[k] != v]
    assert differ == ["s3_secret_key"]
    assert "a" * 16 not in json.dumps(settings_fingerprint(base))  # never sent in clear
    # `make up` gives the stack ZALANDO_DATA_SOURCE; scoring never reads it (nor the training seed)
    ingest_only = Settings(work_dir=Path("work"), s3_secret_key="a" * 16, data_source="/elsewhere", seed=7)
    assert settings_fingerprint(ingest_only) == settings_fingerprint(base)
    assert set(local_stack.NOT_READ_BY_SCORING) <= set(Settings.model_fields)  # no stale names


def test_a_batch_that_takes_a_while_shows_the_scorers_progress(stand_in: StandIn) -> None:
    stand_in.answer(200, {"ok": True, "summary": SUMMARY, "logs": [], "delay_s": 2.5})
    r = CliRunner().invoke(cli.app, ["score", "file:///data/inbox"])
    assert r.exit_code == 0, r.output
    assert "scoring" in r.output and "2/3" in r.output  # the bar, fed by /progress
    assert "batch 2026-07-01-inbox with model v-warm (scored)" in r.output


def test_a_quick_batch_shows_no_bar(stand_in: StandIn) -> None:
    r = CliRunner().invoke(cli.app, ["score", "file:///data/inbox"])
    assert r.exit_code == 0 and "2/3" not in r.output, r.output
