"""`zalando score FOLDER` with the stack up: the command hands the folder to the stack's warm scorer,
the flow runs there on the stack's Prefect server, and the batch lands in the lake as an in-process
run would leave it. ``ZALANDO_SCORER=off`` scores in the command's own process. The champion is the
one the `retrain` run promoted (see conftest.py).

The quick champion may raise a drift alarm on these images: its event runs the `retrain` deployment
once more, as test_drift_alarm_event_schedules_a_retrain_run does on purpose; `down` ends it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import MINI_DIR, REPO
from tests.e2e.conftest import FlowRunResult, LiveStack
from zalando.data.idx import read_idx_images
from zalando.lake import Lake
from zalando.lake import commit as lc

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
N_IMAGES = 40


@pytest.fixture(scope="module")
def png_folder(deployed: LiveStack, retrain_run: FlowRunResult) -> Path:
    """PNG files under the stack's work folder (a default batch root), with a champion in the lake."""
    assert retrain_run.state == "COMPLETED", retrain_run.trigger_output
    folder = deployed.work_dir / "inbox-warm"
    folder.mkdir()
    for i, image in enumerate(read_idx_images(str(MINI_DIR / "t10k-images-idx3-ubyte.gz"))[:N_IMAGES]):
        Image.fromarray(image).save(folder / f"warm-{i:03d}.png")
    return folder


def _score(stack: LiveStack, location: str, day: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zalando.cli", "score", location, "--date", day],
        env=dict(stack.env, PYTHONPATH=str(REPO), COLUMNS="200", **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _said(res: subprocess.CompletedProcess[str]) -> str:
    return " ".join((res.stdout + res.stderr).split())  # rich wraps log lines


def _batch_id(said: str) -> str:
    found = re.search(r"batch (\S+) with model \S+ \(scored\)", said)  # the summary's heading
    assert found, said
    return found.group(1)


def _predictions(stack: LiveStack, batch_id: str) -> int:
    lake = Lake.from_settings(stack.settings())
    return lc.scan(lake.catalog(), "predictions", {"batch_id": batch_id}, columns=["image_id"]).num_rows


def test_the_stack_lists_its_scorer(live_stack: LiveStack) -> None:
    res = live_stack.stack("status")
    assert "scorer:         running" in res.stdout, res.stdout


def test_score_hands_the_folder_to_the_warm_scorer(deployed: LiveStack, png_folder: Path) -> None:
    res = _score(deployed, png_folder.as_uri(), "2026-07-01")
    said = _said(res)
    assert res.returncode == 0, said
    assert f"Prefect API: {deployed.api} (the local stack's server, through its warm scorer" in said
    batch_id = _batch_id(said)
    assert batch_id.startswith("2026-07-01-") and batch_id.endswith("inbox-warm")
    assert f"batch {batch_id}: {N_IMAGES} scored" in said  # the flow's own last line, from the scorer
    assert f"batch_id = '{batch_id}'" in said  # the summary the command prints
    assert _predictions(deployed, batch_id) == N_IMAGES
    runs = deployed.post("/flow_runs/filter", {"flow_runs": {"name": {"any_": ["batch-scoring-2026-07-01"]}}})
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"]  # on the stack's server, in its UI


def test_bad_input_through_the_scorer_is_one_line_and_exit_2(deployed: LiveStack, png_folder: Path) -> None:
    res = _score(deployed, "file:///etc", "2026-07-03")
    assert res.returncode == 2, _said(res)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/etc" in errors[0], res.stderr


def test_with_the_scorer_off_the_command_scores_in_its_own_process(
    deployed: LiveStack, png_folder: Path
) -> None:
    res = _score(deployed, png_folder.as_uri(), "2026-07-02", ZALANDO_SCORER="off")
    said = _said(res)
    assert res.returncode == 0, said
    assert f"Prefect API: {deployed.api} (the local stack's server)" in said
    assert "warm scorer" not in said
    assert _predictions(deployed, _batch_id(said)) == N_IMAGES
