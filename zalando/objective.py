"""What training minimises and how it steps: the class-balanced, group-aware loss, the optimiser, the
learning-rate schedule and early stopping on validation loss.

:class:`TrainingLoss` is cross-entropy over the spec's target (10 labels or 5 groups) plus, for a
labels target, a group-level term on the summed group probabilities; :class:`SampleWeights` gives
feedback images their weight and masks the label term of those whose fine label is unknown.
:func:`make_scheduler` says when its scheduler steps (per batch, per epoch, on validation loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zalando.errors import ConfigError
from zalando.models.experiments import ExperimentSpec
from zalando.models.hardware import to_device
from zalando.validation import LABEL_TO_GROUP_T, group_log_probs


def balanced_class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """n / (C * count_c): every class contributes equally to the loss (absent classes get 0)."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(targets) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


@dataclass(frozen=True)
class SampleWeights:
    """Per-image loss weights, and whose fine label is known (a feedback image knows only its group)."""

    weight: torch.Tensor  # float32 (N,)
    label_known: torch.Tensor  # bool (N,)

    def to(self, device: torch.device) -> SampleWeights:
        """On ``device`` (through pinned memory on a GPU; on the CPU the same tensors)."""
        return SampleWeights(to_device(self.weight, device), to_device(self.label_known, device))

    def take(self, idx: torch.Tensor) -> SampleWeights:
        """The rows ``idx`` (on the weights' device)."""
        return SampleWeights(self.weight[idx], self.label_known[idx])


class TrainingLoss(nn.Module):
    """Class-weighted cross-entropy (+ label smoothing) and an optional group-level term.

    The weights are buffers: ``.to(device)`` puts them where the logits are, so a training step never
    copies them from the CPU (a blocking copy that would make every GPU step wait for the one before).
    With :class:`SampleWeights` every image's terms are weighted, and an image whose fine label is
    unknown has its label term replaced by the group-level NLL (balanced by the group weights); the
    weighted means are normalised like PyTorch's weighted means (by the summed weights).
    """

    def __init__(
        self,
        target: str,
        class_weights: torch.Tensor | None,
        group_weights: torch.Tensor | None,
        label_smoothing: float,
        group_loss_weight: float,
    ) -> None:
        super().__init__()
        self.target = target
        self.register_buffer("class_weights", class_weights)
        self.register_buffer("group_weights", group_weights)
        self.register_buffer("label_to_group", LABEL_TO_GROUP_T.clone())
        self.label_smoothing = label_smoothing
        self.group_loss_weight = group_loss_weight if target == "labels" else 0.0

    def forward(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        smoothing: bool = True,
        sample_weights: SampleWeights | None = None,
    ) -> torch.Tensor:
        ls = self.label_smoothing if smoothing else 0.0
        logits = logits.float()  # bf16 autocast output: the loss is computed in fp32
        cw = None if self.class_weights is None else self.class_weights.to(logits.device)
        if sample_weights is not None:
            return self._weighted(logits, y, cw, ls, sample_weights)
        loss = F.cross_entropy(logits, y, weight=cw, label_smoothing=ls)
        if self.group_loss_weight > 0:
            g = self.label_to_group.to(y.device)[y]
            gw = None if self.group_weights is None else self.group_weights.to(logits.device)
            loss = loss + self.group_loss_weight * F.nll_loss(group_log_probs(logits), g, weight=gw)
        return loss

    def _weighted(
        self, logits: torch.Tensor, y: torch.Tensor, cw: torch.Tensor | None, ls: float, sw: SampleWeights
    ) -> torch.Tensor:
        """The loss with per-image weights; label terms of images without a known fine label masked."""
        w = sw.weight.to(logits.device, torch.float32)
        ones = torch.ones_like(w)
        ce = F.cross_entropy(logits, y, weight=cw, label_smoothing=ls, reduction="none")
        ce_norm = ones if cw is None else cw[y]
        if self.target != "labels":  # the group is the target: every image's target is known
            return (w * ce).sum() / (w * ce_norm).sum()
        g = LABEL_TO_GROUP_T.to(y.device)[y]  # an unknown fine label stands for its group (any of its labels)
        gw = None if self.group_weights is None else self.group_weights.to(logits.device)
        gnll = F.nll_loss(group_log_probs(logits), g, weight=gw, reduction="none")
        g_norm = ones if gw is None else gw[g]
        known = sw.label_known.to(logits.device)
        first = torch.where(known, ce, gnll)
        loss = (w * first).sum() / (w * torch.where(known, ce_norm, g_norm)).sum()
        if self.group_loss_weight > 0:
            loss = loss + self.group_loss_weight * (w * gnll).sum() / (w * g_norm).sum()
        return loss


def make_optimizer(
    spec: ExperimentSpec, params: list[nn.Parameter], *, fused: bool = False
) -> torch.optim.Optimizer:
    """The spec's optimiser; ``fused``: one kernel for all parameters (on a GPU: fewer launches per step)."""
    if not params:
        raise ConfigError(f"experiment {spec.name!r} has no trainable parameters (check freeze)")
    kw: dict[str, Any] = {"fused": True} if fused else {}  # absent on the CPU: its default kernels
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, **kw)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, **kw)
    return torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=True, **kw
    )


def make_scheduler(
    spec: ExperimentSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[Any | None, str]:
    """(scheduler, when) where ``when`` is 'epoch' (stepped with val loss), 'step' or 'none'."""
    if spec.scheduler == "plateau":
        sch = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=spec.plateau_factor, patience=spec.plateau_patience
        )
        return sch, "epoch"
    total = max(1, spec.epochs * steps_per_epoch)
    if spec.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), "step"
    if spec.scheduler == "onecycle":
        # OneCycleLR divides by zero when the warm-up is exactly one step (pct_start * total == 1, e.g.
        # 0.2 of 5 steps, as feedback images can make it): then warm up for no step, as below one step
        pct = spec.warmup_frac * (0.999 if math.isclose(spec.warmup_frac * total, 1.0) else 1.0)
        sch = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=spec.lr, total_steps=total, pct_start=pct, div_factor=20.0
        )
        return sch, "step"
    return None, "none"


class EarlyStopping:
    """Stop after ``patience`` epochs without a val-loss improvement larger than ``min_delta``."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_epochs = 0

    def step(self, value: float) -> bool:
        """Record one epoch's value; True when training should stop."""
        if value < self.best - self.min_delta:
            self.best = value
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
