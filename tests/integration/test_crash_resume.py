"""Crashes: a training process SIGKILLed in the middle of an epoch resumes from its last epoch
checkpoint and ends where an uninterrupted run with the same seed ends (within tolerance).

(Scoring killed mid-batch and finished exactly once is tested by the scoring engineer:
tests/integration/test_scoring_s3.py::test_killed_mid_batch_rerun_completes_only_missing_shards.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MINI_DIR, REPO
from tests.faults import RecordProperty, record_case

pytestmark = pytest.mark.integration
SEED, EPOCHS = 11, 3
MEAN, STD = 0.286, 0.353

_SETUP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from zalando.data.idx import read_idx_images, read_idx_labels
    from zalando.models import load_catalog
    from zalando.train import train_experiment

    def setup(mini):
        catalog = load_catalog()
        profile = catalog.profile("quick").model_copy(update={"max_epochs": __EPOCHS__})
        x = read_idx_images(str(Path(mini) / "train-images-idx3-ubyte.gz"))
        y = read_idx_labels(str(Path(mini) / "train-labels-idx1-ubyte.gz"))
        data = {"x_train": x[:1500], "y_train": y[:1500], "x_val": x[1500:], "y_val": y[1500:]}
        return catalog.experiment("fashion_cnn"), profile, data
    """
).replace("__EPOCHS__", str(EPOCHS))

_KILLED = _SETUP + textwrap.dedent(
    """
    spec, profile, data = setup(sys.argv[1])
    marker = Path(sys.argv[3])

    def progress(info):
        # epoch 2 has trained its batches but is neither validated nor checkpointed: hold here
        if info["event"] == "batch" and info["epoch"] == 2:
            marker.write_text("in epoch 2")
            time.sleep(300)

    train_experiment(spec, profile, data, __MEAN__, __STD__, seed=__SEED__, threads=1,
                     checkpoint_dir=Path(sys.argv[2]), progress=progress)
    print("finished: the kill did not happen")
    """.replace("__MEAN__", repr(MEAN))
    .replace("__STD__", repr(STD))
    .replace("__SEED__", str(SEED))
)


def test_training_killed_mid_epoch_resumes_from_its_epoch_checkpoint(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    import torch

    ns: dict = {}
    exec(_SETUP, ns)  # noqa: S102 - the same set-up as the child process
    spec, profile, data = ns["setup"](str(MINI_DIR))
    ckdir, marker = tmp_path / "ck", tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED, str(MINI_DIR), str(ckdir), str(marker)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (marker.exists() and (ckdir / "last.pt").exists()):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "training exited early"
            assert time.monotonic() < deadline, "no epoch checkpoint within 180 s"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    ck = torch.load(ckdir / "last.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 0 and len(ck["history"]) == 1  # one finished epoch survived the kill

    from zalando.train import train_experiment

    resumed = train_experiment(spec, profile, data, MEAN, STD, seed=SEED, threads=1, checkpoint_dir=ckdir)
    full = train_experiment(spec, profile, data, MEAN, STD, seed=SEED, threads=1)
    assert resumed.resumed_from_epoch == 0
    assert resumed.epochs_run == full.epochs_run == EPOCHS
    assert [h["val_loss"] for h in resumed.history] == pytest.approx(
        [h["val_loss"] for h in full.history], rel=1e-5
    )
    assert resumed.best_epoch == full.best_epoch
    assert resumed.val_metrics == pytest.approx(full.val_metrics, rel=1e-5)
    for (name, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert np.allclose(a.float().numpy(), b.float().numpy(), atol=1e-5), name
    record_case(
        record_property,
        "training (quick, fashion_cnn) SIGKILLed in the middle of epoch 2",
        f"resumed from the epoch-1 checkpoint; {EPOCHS} epochs; val losses, best epoch and weights "
        "equal an uninterrupted run with the same seed (1e-5)",
        retried="the killed epoch was re-run",
        lost="nothing (epoch 1 kept)",
    )
