"""The Prefect UI renders the retrain flow run (logs, task runs, artifacts) of test_deployment.py: headless Chromium (Debian's
`chromium`, installed by .ci/setup-system.sh) loads the flow run page and we read its DOM.

The v2 UI (the server's default) renders logs, task runs and artifacts as DOM text; the task graph
itself is a canvas, so task names are checked on the run's Task Runs tab.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import FlowRunResult, LiveStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--virtual-time-budget=15000",
]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: run .ci/setup-system.sh (apt-get install chromium)"
    return exe


def _render(url: str, profile_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_flow_run_page_renders_run_tasks_and_artifacts(
    deployed: LiveStack, retrain_run: FlowRunResult, tmp_path: Path
) -> None:
    assert retrain_run.state == "COMPLETED", retrain_run.trigger_output
    page = f"{deployed.ui}/v2/runs/flow-run/{retrain_run.id}"

    shot = tmp_path / "flow-run.png"
    logs = _render(page, tmp_path / "p1", "--window-size=1400,1000", f"--screenshot={shot}", "--dump-dom")
    assert logs.returncode == 0, logs.stderr[-2000:]
    text = _text(logs.stdout)
    assert f"Flow Run: {retrain_run.name}" in text  # the page title names the run
    assert "Completed" in text
    assert "Beginning flow run" in text  # the Logs tab shows the run's logs
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    task_runs = deployed.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [retrain_run.id]}}})
    expected = {t["name"] for t in task_runs}
    tab = _render(f"{page}?tab=TaskRuns", tmp_path / "p2", "--dump-dom")
    shown = {name for name in expected if name in tab.stdout}
    # the train tasks run in the `experiment-training` subflow, on that subflow run's own page
    wanted = {n for n in expected if n.startswith(("ingest-", "preprocess-", "evaluate-", "promote-"))}
    assert len(wanted) >= 4 and wanted <= shown, (expected, shown)

    arts = _render(f"{page}?tab=Artifacts", tmp_path / "p4", "--dump-dom")
    assert "champion-decision" in arts.stdout and "run-report" in arts.stdout, _text(arts.stdout)[-3000:]
