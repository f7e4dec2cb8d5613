"""The screen net: a cheap first net the scoring graph runs on every row (``ExperimentSpec.screen``).

:func:`zalando.train.train_experiment` calls :func:`train_screen` after the main net: the screen trains
on the same split and recipe under :func:`screen_spec` (its own architecture parameters and epochs,
one view, plain argmax), and is kept when validation says the cascade (the screen's decision where it
is sure, the full scoring graph's below its threshold) loses nothing against the full graph
(:func:`zalando.validation.choose_screen_below`) and costs fewer MACs. The bundle carries it as
:class:`zalando.models.bundle.Screen`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zalando.errors import ConfigError
from zalando.models.architectures import ClassifierNet
from zalando.models.experiments import ExperimentSpec, ProfileParams
from zalando.train import ProgressFn, TrainData, TrainResult, train_experiment
from zalando.validation import choose_screen_below

log = logging.getLogger(__name__)


@dataclass
class ScreenResult:
    """The screen net the scoring graph runs first (spec.screen), and the threshold chosen for it."""

    spec: ExperimentSpec  # derived from the main spec: its architecture parameters and epochs
    model: ClassifierNet
    temperature: float
    choice: dict[str, Any]  # choose_doubt_threshold's: below, share, validation accuracies
    params: int
    macs: int
    epochs_run: int
    wall_s: float


def screen_spec(spec: ExperimentSpec, profile: ProfileParams) -> ExperimentSpec:
    """The spec the screen of ``spec`` (resolved for ``profile``) trains under: the same recipe, its own
    architecture parameters and epochs (capped by the profile), one view, plain argmax, no screen."""
    if spec.screen is None:
        raise ConfigError(f"experiment {spec.name!r} has no screen")
    epochs = min(spec.screen.epochs, profile.max_epochs or spec.screen.epochs)
    return spec.model_copy(
        update={
            "name": f"{spec.name}-screen",
            "description": f"the screen net of {spec.name}",
            "architecture": spec.screen.architecture,
            "arch_params": dict(spec.screen.arch_params),
            "epochs": epochs,
            "early_stopping_patience": epochs,
            "tta": "none",
            "decision_rule": "argmax",
            "ema_decay": 0.0,
            "screen": None,
        }
    )


def train_screen(
    main: TrainResult,
    profile: ProfileParams,
    data: dict[str, np.ndarray],
    mean: float,
    std: float,
    train_data: TrainData,
    *,
    seed: int,
    threads: int | None,
    checkpoint_dir: Path | None,
    progress: ProgressFn | None,
    device: str,
) -> ScreenResult | None:
    """Train the main spec's screen on the same split; keep it when validation says the cascade loses
    nothing (:func:`zalando.validation.choose_screen_below`) and costs less than the full graph alone."""
    sspec = screen_spec(main.spec, profile)
    res = train_experiment(
        sspec, profile, data, mean, std, seed=seed, threads=threads, checkpoint_dir=checkpoint_dir,
        progress=progress, device=device,
    )  # fmt: skip
    choice = choose_screen_below(main, res.model, res.temperature, train_data)
    if choice is None:
        log.info("%s: the screen is dropped: no threshold loses nothing on validation", main.spec.name)
        return None
    views = 1.0 if main.spec.tta != "hflip" else 1.0 + (main.flip_choice or {"share": 1.0})["share"]
    full_cost = main.macs * views
    cascade_cost = res.macs + choice["share"] * full_cost
    log.info(
        "%s: screen %s below %.3f: %.1f%% of validation rows to the full graph, grouped accuracy %.4f "
        "(full graph %.4f, screen alone %.4f); %.1f instead of %.1f MMAC an image",
        main.spec.name, sspec.arch_params, choice["below"], 100 * choice["share"], choice["val_group_acc"],
        choice["val_group_acc_second"], choice["val_group_acc_first"], cascade_cost / 1e6, full_cost / 1e6,
    )  # fmt: skip
    if cascade_cost >= full_cost:
        log.info("%s: the screen is dropped: it would not save work", main.spec.name)
        return None
    return ScreenResult(
        spec=res.spec, model=res.model, temperature=res.temperature, choice=choice, params=res.params,
        macs=res.macs, epochs_run=res.epochs_run, wall_s=res.wall_s,
    )  # fmt: skip
