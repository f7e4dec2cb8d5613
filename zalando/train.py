"""The training engine: one loop for every experiment, from uint8 arrays held in memory.

The caller passes the arrays (it owns the lake); this module normalises them with the dataset
version's statistics, augments on the fly, trains with a class-balanced loss, steps the
scheduler, stops early on validation loss, keeps the best checkpoint by validation loss, and
writes an epoch checkpoint so a killed run resumes where it stopped. The test split never
comes here.

Feedback images (``x_feedback``/``g_feedback``/``w_feedback``, see
:mod:`zalando.data.feedback_data`) join the training images with their own loss weight. Reviewers
give a group, not a fine label: a labels-target model learns them through the group-level term only
(:class:`~zalando.objective.SampleWeights` masks their label term), a groups-target model learns
them as any other image. Without feedback the loss is computed exactly as before.

Laid out as pytorch/vision's ``references/classification/train.py``: :func:`select_training_data`
and :func:`setup_training` (setup; the loss, optimiser, schedule and early stopping are
:mod:`zalando.objective`'s), :class:`~zalando.checkpoint.EpochCheckpoint` (resume, in
:mod:`zalando.checkpoint`), :func:`train_one_epoch` and :func:`evaluate` (one epoch), :func:`fit`
(the epoch loop), :func:`~zalando.validation.choose_on_validation` (TTA, temperature and operating
point after training, in :mod:`zalando.validation`), and :func:`train_experiment`, which runs them
and then trains the spec's screen net, if it has one (:mod:`zalando.screen`).

One code path for every device: the uint8 images go to the device as they are and are cast,
augmented and normalised there (the network resizes them there too); on a CUDA GPU the copies are
pinned and non-blocking, the weights channels_last, the arithmetic mixed precision where the spec's
precision resolves to it (``zalando.models.hardware``), and nothing waits for the GPU within an
epoch. On the CPU a seeded run gives the same numbers, bit for bit, as before the GPU path existed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from zalando.augment import apply_augment, draw_augment
from zalando.checkpoint import CHECKPOINT_FILE, EpochCheckpoint, RunState, spec_fingerprint
from zalando.errors import ConfigError, DataError
from zalando.labels import GROUP_LABELS, LABEL_TO_GROUP, NUM_GROUPS, NUM_LABELS
from zalando.models.architectures import ClassifierNet, build_model, count_macs, count_parameters
from zalando.models.experiments import AugmentPolicy, ExperimentSpec, ProfileParams, resolve_spec
from zalando.models.hardware import (
    amp_dtype,
    configure_backend,
    make_grad_scaler,
    resolve_device,
    resolve_precision,
    to_device,
)
from zalando.models.weights import WeightsInfo, init_weights
from zalando.objective import (
    EarlyStopping,
    SampleWeights,
    TrainingLoss,
    balanced_class_weights,
    make_optimizer,
    make_scheduler,
)
from zalando.validation import choose_on_validation, normalise, predict_logits, val_metrics

if TYPE_CHECKING:
    from zalando.screen import ScreenResult

log = logging.getLogger(__name__)

LOG_EVERY_S = 15.0  # seconds between progress lines within an epoch
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What one training run produced: the best model (eval mode) and how it got there."""

    spec: ExperimentSpec  # resolved for the profile, with ``tta`` decided
    model: ClassifierNet
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    wall_s: float
    weights: WeightsInfo
    val_metrics: dict[str, float]
    n_train: int
    n_val: int
    params: int
    macs: int
    seed: int
    resumed_from_epoch: int | None = None
    tta_scores: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0  # fitted on validation (label or group logits, without TTA)
    operating_point: dict[str, Any] | None = None  # per-group weights chosen on validation (decision_rule)
    flip_choice: dict[str, Any] | None = None  # under hflip: the doubtful rows that get the flip
    screen: ScreenResult | None = None  # the cheap first net, when the spec has one and validation keeps it
    device: str = "cpu"  # where it trained
    precision: str = "fp32"  # the arithmetic it trained in (bf16 = bfloat16 autocast)


# ----------------------------------------------------------------------------- data helpers


def _check_arrays(data: dict[str, np.ndarray]) -> None:
    for key in ("x_train", "y_train", "x_val", "y_val"):
        if key not in data:
            raise DataError(f"training data is missing {key!r} (need x_train, y_train, x_val, y_val)")
    for split in ("train", "val"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"x_{split} must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"y_{split} must be 1-D with one label per image, got {y.shape} for {len(x)} images"
            )
        if len(y) == 0:
            raise DataError(f"x_{split} is empty")
        if y.min() < 0 or y.max() >= NUM_LABELS:
            raise DataError(f"y_{split} labels must be in 0..{NUM_LABELS - 1}, got {y.min()}..{y.max()}")
    if "x_feedback" in data:
        _check_feedback_arrays(data)


def _check_feedback_arrays(data: dict[str, np.ndarray]) -> None:
    """Feedback images: uint8 (N, 28, 28), a group (0..4) and a positive finite weight each."""
    x, g, w = data["x_feedback"], data.get("g_feedback"), data.get("w_feedback")
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"x_feedback must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
    if g is None or w is None or np.shape(g) != (len(x),) or np.shape(w) != (len(x),):
        raise DataError(
            f"g_feedback and w_feedback must hold one group and one weight per feedback image ({len(x)})"
        )
    if len(g) and (g.min() < 0 or g.max() >= NUM_GROUPS):
        raise DataError(f"g_feedback groups must be in 0..{NUM_GROUPS - 1}, got {g.min()}..{g.max()}")
    if len(w) and not (np.isfinite(w).all() and (w > 0).all()):
        raise DataError("w_feedback weights must be finite and > 0")


def stratified_subset(y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of about ``n`` items keeping the class mix (all indices, shuffled, when n is None)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    if n is None or n >= len(y):
        return np.sort(perm)
    ys = y[perm]
    rank = np.empty(len(y), dtype=np.float64)
    for c in np.unique(ys):
        pos = np.flatnonzero(ys == c)
        rank[pos] = (np.arange(len(pos)) + rng.random()) / len(pos)
    return np.sort(perm[np.argsort(rank, kind="stable")[:n]])


def _set_frozen(model: ClassifierNet, freeze: str) -> None:
    if freeze == "backbone":
        for p in model.backbone_parameters():
            p.requires_grad_(False)


def _frozen_bn_eval(model: nn.Module) -> None:
    """Batch-norm layers whose parameters are frozen run in inference mode (as in Keras)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()


# ----------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class TrainData:
    """One run's images: the profile's training subset as tensors, its validation subset as arrays.

    ``mean``/``std`` are the dataset version's pixel/255 statistics that normalise both.
    """

    x_train: torch.Tensor  # uint8 (N, 1, 28, 28)
    y_train: torch.Tensor  # int64 (N,): labels or groups, as the spec's target says
    y_train_groups: np.ndarray  # int64 (N,): the training images' groups (the group term's weights)
    x_val: np.ndarray  # uint8 (M, 28, 28)
    y_val: np.ndarray  # int64 (M,): labels
    mean: float
    std: float
    sample_weights: SampleWeights | None = None  # with feedback images only: weights and known labels

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_val(self) -> int:
        return len(self.y_val)


def select_training_data(
    data: dict[str, np.ndarray], profile: ProfileParams, target: str, mean: float, std: float, seed: int
) -> TrainData:
    """The profile's class-stratified subsets of ``data`` (``seed`` for training, ``seed + 1`` for validation).

    Feedback images, when ``data`` has any, are all appended to the training subset after it, with
    their weights; the profile's image limit applies to the split's images only.
    """
    tr_idx = stratified_subset(data["y_train"], profile.max_train_images, seed)
    va_idx = stratified_subset(data["y_val"], profile.max_val_images, seed + 1)
    x_tr = np.ascontiguousarray(data["x_train"][tr_idx])
    y_tr_lab = np.asarray(data["y_train"][tr_idx], dtype=np.int64)
    y_tr_grp = np.asarray(LABEL_TO_GROUP)[y_tr_lab]
    y_tr = y_tr_lab if target == "labels" else y_tr_grp
    sample_weights = None
    n_fb = len(data["x_feedback"]) if "x_feedback" in data else 0
    if n_fb:
        g_fb = np.asarray(data["g_feedback"], dtype=np.int64)
        # a labels target has no fine label for them: any label of the group, masked in the loss
        y_fb = np.asarray([GROUP_LABELS[g][0] for g in g_fb], dtype=np.int64) if target == "labels" else g_fb
        x_tr = np.ascontiguousarray(np.concatenate([x_tr, np.asarray(data["x_feedback"])]))
        y_tr, y_tr_grp = np.concatenate([y_tr, y_fb]), np.concatenate([y_tr_grp, g_fb])
        weight = np.concatenate([np.ones(len(tr_idx)), np.asarray(data["w_feedback"], dtype=np.float64)])
        known = np.concatenate([np.ones(len(tr_idx), bool), np.full(n_fb, target != "labels")])
        sample_weights = SampleWeights(torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(known))
    return TrainData(
        x_train=torch.from_numpy(x_tr)[:, None],
        y_train=torch.from_numpy(y_tr),
        y_train_groups=y_tr_grp,
        x_val=np.ascontiguousarray(data["x_val"][va_idx]),
        y_val=np.asarray(data["y_val"][va_idx], dtype=np.int64),
        mean=float(mean),
        std=float(std),
        sample_weights=sample_weights,
    )


@dataclass(frozen=True)
class TrainSetup:
    """What setup built for one run: the model on its device and what trains it."""

    model: ClassifierNet
    weights: WeightsInfo
    params: int
    macs: int
    device: torch.device
    precision: str  # 'fp32', 'bf16' or 'fp16' (autocast; the weights stay fp32)
    loss_fn: TrainingLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    sched_when: str  # 'epoch' (stepped with the val loss), 'step' or 'none'
    stopper: EarlyStopping
    batch_size: int
    steps_per_epoch: int
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    train_forward: nn.Module | None = None  # the compiled model (``compile_model``); None: ``model`` itself
    ema: torch.optim.swa_utils.AveragedModel | None = None  # spec.ema_decay > 0: the averaged weights

    @property
    def kept(self) -> nn.Module:
        """The weights validated, kept as the best epoch's and scored: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return amp_dtype(self.precision)


def setup_training(
    spec: ExperimentSpec,
    profile: ProfileParams,
    data: TrainData,
    *,
    seed: int,
    device: torch.device,
    lake: Any | None,
    allow_download: bool,
    compile_model: bool = False,
) -> TrainSetup:
    """The seeded model (weights as spec and profile allow), its loss, optimiser, scheduler and stopper.

    On a GPU: channels_last weights, mixed precision as the spec's precision resolves there (a gradient
    scaler for fp16), fused optimiser kernels and cuDNN autotuning. ``compile_model`` compiles the
    training forward with ``torch.compile`` (off by default: see :func:`train_experiment`).
    """
    torch.manual_seed(seed)
    model = build_model(spec.architecture, spec.num_outputs, spec.input_size, spec.arch_params)
    weights = init_weights(
        model, spec, pretrained_allowed=profile.pretrained, allow_download=allow_download, lake=lake
    )
    _set_frozen(model, spec.freeze)
    params, macs = count_parameters(model), count_macs(model)
    model = model.to(device=device, memory_format=torch.channels_last)
    precision = resolve_precision(spec.precision, device)
    configure_backend(device)

    balanced = spec.class_weighting == "balanced"
    known = data.y_train.numpy()
    if data.sample_weights is not None:  # class weights count the images whose target is known
        known = known[data.sample_weights.label_known.numpy()]
    cw = balanced_class_weights(known, spec.num_outputs) if balanced else None
    gw = balanced_class_weights(data.y_train_groups, NUM_GROUPS) if balanced else None
    bs = min(spec.batch_size, data.n_train)
    steps_per_epoch = max(1, data.n_train // bs)  # the ragged tail is dropped (BatchNorm needs > 1 image)
    optimizer = make_optimizer(
        spec, [p for p in model.parameters() if p.requires_grad], fused=device.type == "cuda"
    )
    scheduler, sched_when = make_scheduler(spec, optimizer, steps_per_epoch)
    return TrainSetup(
        model=model,
        weights=weights,
        params=params,
        macs=macs,
        device=device,
        precision=precision,
        loss_fn=TrainingLoss(spec.target, cw, gw, spec.label_smoothing, spec.group_loss_weight).to(device),
        optimizer=optimizer,
        scheduler=scheduler,
        sched_when=sched_when,
        stopper=EarlyStopping(spec.early_stopping_patience, spec.min_delta),
        batch_size=bs,
        steps_per_epoch=steps_per_epoch,
        scaler=make_grad_scaler(precision, device),
        train_forward=torch.compile(model) if compile_model else None,
        ema=_averaged(model, spec.ema_decay),
    )


def _averaged(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of model's weights and buffers (torch.optim.swa_utils), or None."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


# ----------------------------------------------------------------------------- one epoch


@dataclass(frozen=True)
class EpochLoader:
    """One epoch's training batches: shuffled and augmented by one seeded generator, normalised, on the device.

    The uint8 28x28 images stay uint8 until they are on the device (``fit`` puts the whole training set
    there once: 48,000 images are 38 MB); each batch is cast, augmented and normalised there, and the
    network resizes it to its input size there too, so a GPU at 224x224 never waits for the CPU. The
    shuffle and the augmentation are drawn on the CPU from one generator, so a seed gives the same
    batches on every device. The ragged tail is dropped (BatchNorm needs more than one image).
    """

    x: torch.Tensor  # uint8 (N, 1, 28, 28), on any device
    y: torch.Tensor  # int64 (N,), on the same device
    batch_size: int
    augmentation: AugmentPolicy
    mean: float
    std: float
    device: torch.device
    seed: int
    sample_weights: SampleWeights | None = None

    def __len__(self) -> int:
        return max(1, len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, SampleWeights | None]]:
        gen = torch.Generator().manual_seed(self.seed)
        perm = to_device(torch.randperm(len(self.y), generator=gen), self.device)
        x, y = to_device(self.x, self.device), to_device(self.y, self.device)  # no copy once staged
        weights = None if self.sample_weights is None else self.sample_weights.to(self.device)
        _, _, h, w = x.shape
        bs = self.batch_size
        for step in range(len(self)):
            idx = perm[step * bs : (step + 1) * bs]
            xb = x[idx].float().div_(255.0)
            if self.augmentation.active:
                xb = apply_augment(xb, draw_augment(len(idx), h, w, self.augmentation, gen).to(self.device))
            yield normalise(xb, self.mean, self.std), y[idx], None if weights is None else weights.take(idx)


class EpochReporter:
    """Logs an epoch's running training loss, images/s and ETA every 15 s and at its last step.

    The same numbers go to ``progress`` as a 'batch' event. ``t0`` is when the epoch started.
    """

    def __init__(
        self,
        spec: ExperimentSpec,
        epoch: int,
        steps: int,
        batch_size: int,
        n_val: int,
        progress: ProgressFn | None,
    ) -> None:
        self.experiment, self.epoch, self.epochs = spec.name, epoch, spec.epochs
        self.steps, self.epoch_images, self.n_val = steps, steps * batch_size, n_val
        self.progress = progress
        self.t0 = self.last = time.perf_counter()

    def __call__(self, step: int, running_loss: Callable[[], float], seen: int) -> None:
        now = time.perf_counter()
        if not (now - self.last > LOG_EVERY_S or step == self.steps - 1):
            return
        self.last = now
        train_loss = running_loss()  # the only read of the loss: on a GPU it waits for the queued steps
        ips = seen / max(now - self.t0, 1e-9)
        left = (self.epoch_images - seen) + (self.epochs - self.epoch - 1) * (
            self.epoch_images + self.n_val / 4
        )
        info = {
            "event": "batch", "experiment": self.experiment, "epoch": self.epoch + 1, "epochs": self.epochs,
            "step": step + 1, "steps": self.steps, "train_loss": train_loss,
            "images_per_s": ips, "eta_s": left / max(ips, 1e-9),
        }  # fmt: skip
        log.info(
            "%s epoch %d/%d step %d/%d loss %.4f %.0f img/s ETA %.0f s (max epochs)",
            self.experiment, self.epoch + 1, self.epochs, step + 1, self.steps, train_loss, ips, info["eta_s"],
        )  # fmt: skip
        if self.progress:
            self.progress(info)


@dataclass(frozen=True)
class EpochStats:
    """One epoch's training numbers, over the images it saw (in training mode, augmented)."""

    train_loss: float
    train_acc: float
    images: int


def train_one_epoch(
    model: nn.Module,
    loss_fn: TrainingLoss,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, SampleWeights | None]],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    step_scheduler: Any | None = None,
    on_batch: Callable[[int, Callable[[], float], int], None] | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> EpochStats:
    """One pass over ``loader``: forward (autocast to ``amp_dtype`` when given), loss, backward, step.

    ``scaler`` (fp16) scales the loss and skips steps with inf/NaN gradients. ``step_scheduler`` is
    stepped after every batch; ``on_batch(step, running train loss (a function), images seen)`` after
    every batch too, and so is ``ema`` (the average takes the step's weights). The running sums stay
    on the device (in float64: the same numbers as summing Python floats), so nothing waits for the
    GPU until someone reads them. Batch-norm layers with frozen parameters stay in inference mode.
    """
    model.train()
    _frozen_bn_eval(model)
    run_loss = torch.zeros((), dtype=torch.float64, device=device)
    run_correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for step, (xb, yb, sw) in enumerate(loader):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(xb)
        loss = loss_fn(logits, yb, sample_weights=sw)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if step_scheduler is not None:
            step_scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n = len(yb)
        run_loss.add_(loss.detach().double() * n)
        run_correct.add_((logits.detach().argmax(1) == yb).sum())
        seen += n
        if on_batch is not None:
            on_batch(step, lambda total=run_loss, seen=seen: float(total) / seen, seen)
    images = max(seen, 1)
    return EpochStats(train_loss=float(run_loss) / images, train_acc=int(run_correct) / images, images=seen)


def evaluate(
    model: ClassifierNet,
    loss_fn: TrainingLoss,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    target: str,
    mean: float,
    std: float,
) -> dict[str, float]:
    """Validation loss (no label smoothing), accuracy, group accuracy and group NLL, without TTA."""
    return val_metrics(predict_logits(model, x_val, mean, std), y_val, target, loss_fn)


# ----------------------------------------------------------------------------- the epoch loop


def fit(
    spec: ExperimentSpec,
    setup: TrainSetup,
    data: TrainData,
    state: RunState,
    checkpoint: EpochCheckpoint,
    *,
    seed: int,
    progress: ProgressFn | None = None,
) -> None:
    """Epochs from ``state.next_epoch``: train, validate, step the plateau scheduler, checkpoint.

    ``state`` is updated in place: the history, the best weights by validation loss, early stopping.
    Every epoch draws from its own seeds (shuffling and augmentation; dropout), so a resumed run
    repeats the epochs it missed exactly.
    """
    model, loss_fn, optimizer = setup.model, setup.loss_fn, setup.optimizer
    step_scheduler = setup.scheduler if setup.sched_when == "step" else None
    # the training set goes to the device once, as uint8 (on the CPU: no copy)
    x_train, y_train = to_device(data.x_train, setup.device), to_device(data.y_train, setup.device)
    for epoch in range(state.next_epoch, spec.epochs):
        if state.stopped_early:
            break
        report = EpochReporter(spec, epoch, setup.steps_per_epoch, setup.batch_size, data.n_val, progress)
        loader = EpochLoader(
            x_train, y_train, setup.batch_size, spec.augmentation, data.mean, data.std,
            setup.device, seed=seed * 1_000_003 + epoch, sample_weights=data.sample_weights,
        )  # fmt: skip
        torch.manual_seed(seed * 7_919 + epoch)  # dropout (every device's generator)
        stats = train_one_epoch(
            setup.train_forward or model, loss_fn, optimizer, loader, setup.device,
            amp_dtype=setup.amp_dtype, scaler=setup.scaler, step_scheduler=step_scheduler, on_batch=report,
            ema=setup.ema,
        )  # fmt: skip
        train_s = time.perf_counter() - report.t0
        vm = evaluate(
            setup.kept, loss_fn, data.x_val, data.y_val, target=spec.target, mean=data.mean, std=data.std
        )
        if setup.sched_when == "epoch":
            setup.scheduler.step(vm["val_loss"])
        row = {
            "epoch": epoch + 1,
            "train_loss": stats.train_loss,
            "train_acc": stats.train_acc,
            **vm,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_s": train_s,
            "epoch_s": time.perf_counter() - report.t0,
            "images_per_s": stats.images / max(train_s, 1e-9),
        }
        _record_epoch(spec, setup, state, row)
        if progress:
            progress({"event": "epoch", "experiment": spec.name, **row, "epochs": spec.epochs})
        checkpoint.save(setup, state, epoch)


def _record_epoch(spec: ExperimentSpec, setup: TrainSetup, state: RunState, row: dict[str, Any]) -> None:
    """Append the epoch's row, keep the weights when its val loss is the best yet, decide early stopping."""
    state.history.append(row)
    epoch, val_loss = row["epoch"], row["val_loss"]
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_epoch = val_loss, epoch
        state.best_state = copy.deepcopy(setup.kept.state_dict())
    state.stopped_early = setup.stopper.step(val_loss) and epoch < spec.epochs
    log.info(
        "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f group acc %.4f | lr %.2e | %.0f img/s, %.1f s%s",
        spec.name, epoch, spec.epochs, row["train_loss"], row["train_acc"], val_loss, row["val_acc"],
        row["val_group_acc"], row["lr"], row["images_per_s"], row["epoch_s"],
        " (early stop)" if state.stopped_early else "",
    )  # fmt: skip


# ----------------------------------------------------------------------------- after training


def _finish(
    spec: ExperimentSpec, setup: TrainSetup, data: TrainData, state: RunState, *, seed: int, t_start: float
) -> TrainResult:
    """The best epoch's weights; the choices on validation (on the training device); the result on the CPU."""
    model = setup.model
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    model.eval()
    chosen = choose_on_validation(model, spec, setup.loss_fn, data)
    model = model.to("cpu")
    wall = time.perf_counter() - t_start
    resumed = state.resumed_from
    prior = sum(h["epoch_s"] for h in state.history[: (resumed + 1) if resumed is not None else 0])
    log.info(
        "%s: best epoch %d val loss %.4f group acc %.4f (tta %s), %d epochs in %.1f s",
        spec.name, state.best_epoch, state.best_val_loss, chosen.val_metrics["val_group_acc"], chosen.spec.tta,
        len(state.history), wall + prior,
    )  # fmt: skip
    return TrainResult(
        spec=chosen.spec,
        model=model,
        history=state.history,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_val_loss,
        epochs_run=len(state.history),
        stopped_early=state.stopped_early,
        wall_s=wall + prior,
        weights=setup.weights,
        val_metrics=chosen.val_metrics,
        n_train=data.n_train,
        n_val=data.n_val,
        params=setup.params,
        macs=setup.macs,
        seed=seed,
        resumed_from_epoch=resumed,
        tta_scores=chosen.tta_scores,
        temperature=chosen.temperature,
        operating_point=chosen.operating_point,
        flip_choice=chosen.flip_choice,
        device=setup.device.type,
        precision=setup.precision,
    )


# ----------------------------------------------------------------------------- the entry point


def train_experiment(
    spec: ExperimentSpec,
    profile: ProfileParams,
    data: dict[str, np.ndarray],
    mean: float,
    std: float,
    *,
    seed: int,
    threads: int | None = None,
    checkpoint_dir: Path | None = None,
    progress: ProgressFn | None = None,
    lake: Any | None = None,
    allow_download: bool = True,
    device: str = "auto",
    compile_model: bool = False,
) -> TrainResult:
    """Train ``spec`` as ``profile`` says on ``data`` (x_train, y_train, x_val, y_val: uint8 / int labels).

    ``mean``/``std`` are the dataset version's pixel/255 statistics. With ``checkpoint_dir``, an
    epoch checkpoint is written after each epoch and a run with the same spec, seed and data
    resumes from it. ``lake`` is only needed when the spec starts from weights in the lake.
    ``device`` is 'auto' (a CUDA GPU when there is one), 'cpu' or 'cuda'; the returned model is
    always on the CPU. ``compile_model`` trains through ``torch.compile``; it is off by default because
    its first steps compile for tens of seconds per model (a large share of a short run; again for
    every new batch shape), it needs a C compiler (and Triton on a GPU) on every worker, and on the
    CPU its fused kernels round differently, so a seeded run would no longer repeat the eager numbers.
    """
    if spec.profile is None:
        spec = resolve_spec(spec, profile)
    elif spec.profile != profile.name:
        raise ConfigError(
            f"spec {spec.name!r} was resolved for profile {spec.profile!r}, not {profile.name!r}"
        )
    if not (std > 0 and math.isfinite(mean) and math.isfinite(std)):
        raise DataError(f"normalisation statistics must be finite with std > 0, got mean={mean}, std={std}")
    _check_arrays(data)
    dev = resolve_device(device)
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        train_data = select_training_data(data, profile, spec.target, mean, std, seed)
        setup = setup_training(
            spec, profile, train_data, seed=seed, device=dev, lake=lake, allow_download=allow_download,
            compile_model=compile_model,
        )  # fmt: skip
        fingerprint = spec_fingerprint(
            spec, seed, train_data.n_train, train_data.n_val, train_data.mean, train_data.std
        )
        checkpoint = EpochCheckpoint(
            Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None, fingerprint
        )
        state = checkpoint.resume(setup, spec.name)
        log.info(
            "%s: training %s (%d params, %.1f MMAC/img) on %d images, validating on %d, up to %d epochs, "
            "batch %d, %s %s, %d threads",
            spec.name, spec.architecture, setup.params, setup.macs / 1e6, train_data.n_train, train_data.n_val,
            spec.epochs, setup.batch_size, dev.type, setup.precision, torch.get_num_threads(),
        )  # fmt: skip
        fit(spec, setup, train_data, state, checkpoint, seed=seed, progress=progress)
        result = _finish(spec, setup, train_data, state, seed=seed, t_start=t_start)
    finally:
        torch.set_num_threads(old_threads)
    if spec.screen is not None:
        from zalando.screen import train_screen  # it trains through this function

        result.screen = train_screen(
            result, profile, data, mean, std, train_data, seed=seed, threads=threads,
            checkpoint_dir=Path(checkpoint_dir) / "screen" if checkpoint_dir else None, progress=progress,
            device=device,
        )  # fmt: skip
    return result
