"""A run's epoch checkpoint: what the epoch loop carries between epochs, saved after each, so a killed
run resumes where it stopped with the same numbers.

The file holds the model, optimiser, scheduler, early stopper, gradient scaler and weight average,
the history and the best epoch's weights; it is written atomically (a temporary file, then a rename)
and read with ``weights_only=True``. Its fingerprint (spec, seed, data sizes, statistics) keeps a run
from resuming another's checkpoint; a torn or foreign file is ignored, and the run starts again.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zalando.models.experiments import ExperimentSpec

if TYPE_CHECKING:
    from zalando.train import TrainSetup

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def spec_fingerprint(
    spec: ExperimentSpec, seed: int, n_train: int, n_val: int, mean: float, std: float
) -> str:
    """What a checkpoint must have been written for: the spec, seed, data sizes and statistics."""
    return json.dumps(
        {"spec": spec.model_dump(mode="json"), "seed": seed, "n": [n_train, n_val], "norm": [mean, std]},
        sort_keys=True,
    )


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: start again
        log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return None
    if ck.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s is for another spec/seed/data: starting from scratch", path)
        return None
    return ck


@dataclass
class RunState:
    """What the epoch loop carries from one epoch to the next, and the epoch checkpoint saves."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_val_loss: float = math.inf
    best_epoch: int = -1  # 1-based, -1 before the first epoch
    next_epoch: int = 0  # 0-based: where the loop starts
    stopped_early: bool = False
    resumed_from: int | None = None  # the 0-based epoch a resumed checkpoint ended with


@dataclass(frozen=True)
class EpochCheckpoint:
    """A run's epoch checkpoint (none kept when ``path`` is None).

    The fingerprint (spec, seed, data sizes, statistics) keeps a run from resuming another's checkpoint.
    """

    path: Path | None
    fingerprint: str

    def resume(self, setup: TrainSetup, experiment: str) -> RunState:
        """Load the checkpoint into setup's model, optimiser, scheduler and stopper; a fresh state if none."""
        ck = _load_checkpoint(self.path, self.fingerprint) if self.path is not None else None
        if ck is None:
            return RunState()
        setup.model.load_state_dict(ck["model"])
        setup.optimizer.load_state_dict(ck["optimizer"])
        if setup.scheduler is not None:
            setup.scheduler.load_state_dict(ck["scheduler"])
        setup.stopper.load_state_dict(ck["stopper"])
        if setup.scaler is not None and ck.get("scaler"):
            setup.scaler.load_state_dict(ck["scaler"])
        if setup.ema is not None:
            setup.ema.load_state_dict(ck["ema"])
        epoch = int(ck["epoch"])
        log.info("%s: resuming after epoch %d from %s", experiment, epoch + 1, self.path)
        return RunState(
            history=list(ck["history"]),
            best_state=ck["best_state"],
            best_val_loss=float(ck["best_val_loss"]),
            best_epoch=int(ck["best_epoch"]),
            next_epoch=epoch + 1,
            stopped_early=bool(ck["stopped_early"]),
            resumed_from=epoch,
        )

    def save(self, setup: TrainSetup, state: RunState, epoch: int) -> None:
        """Write the state after ``epoch`` (0-based), atomically."""
        if self.path is None:
            return
        _save_checkpoint(
            self.path,
            {
                "fingerprint": self.fingerprint,
                "epoch": epoch,
                "model": setup.model.state_dict(),
                "optimizer": setup.optimizer.state_dict(),
                "scheduler": setup.scheduler.state_dict() if setup.scheduler is not None else {},
                "stopper": setup.stopper.state_dict(),
                "scaler": setup.scaler.state_dict() if setup.scaler is not None else {},
                "ema": setup.ema.state_dict() if setup.ema is not None else {},
                "history": state.history,
                "best_state": state.best_state,
                "best_val_loss": state.best_val_loss,
                "best_epoch": state.best_epoch,
                "stopped_early": state.stopped_early,
            },
        )
