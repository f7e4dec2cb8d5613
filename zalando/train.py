"""The training engine: one loop for every experiment, from uint8 arrays held in memory.

The caller passes the arrays (it owns the lake); this module normalises them with the dataset
version's statistics, augments on the fly, trains with a class-balanced loss, steps the
scheduler, stops early on validation loss, keeps the best checkpoint by validation loss, and
writes an epoch checkpoint so a killed run resumes where it stopped. The test split never
comes here.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zalando.errors import ConfigError, DataError
from zalando.labels import GROUP_LABELS, LABEL_TO_GROUP, NUM_GROUPS, NUM_LABELS
from zalando.models.architectures import ClassifierNet, build_model, count_macs, count_parameters
from zalando.models.experiments import AugmentPolicy, ExperimentSpec, ProfileParams, resolve_spec
from zalando.models.hardware import resolve_device, resolve_precision
from zalando.models.weights import WeightsInfo, init_weights

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"
EVAL_BATCH = 512
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


def balanced_class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """n / (C * count_c): every class contributes equally to the loss (absent classes get 0)."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(targets) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def augment_batch(x: torch.Tensor, policy: AugmentPolicy, gen: torch.Generator) -> torch.Tensor:
    """Random flip / affine (shift, rotate, zoom) / erase of a (N, 1, H, W) batch in [0, 1]."""
    n, _, h, w = x.shape
    if policy.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if policy.shift > 0 or policy.rotate > 0 or policy.scale > 0:
        ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(policy.rotate)
        s = 1 + (torch.rand(n, generator=gen) * 2 - 1) * policy.scale
        max_px = round(policy.shift * w)
        tx = torch.randint(-max_px, max_px + 1, (n,), generator=gen).float() * 2 / w
        ty = torch.randint(-max_px, max_px + 1, (n,), generator=gen).float() * 2 / h
        cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if policy.erase > 0:
        do = torch.rand(n, generator=gen) < policy.erase
        eh = (torch.rand(n, generator=gen) * 0.3 + 0.1) * h
        ew = (torch.rand(n, generator=gen) * 0.3 + 0.1) * w
        y0 = torch.rand(n, generator=gen) * (h - eh)
        x0 = torch.rand(n, generator=gen) * (w - ew)
        rows = torch.arange(h).float()[None, :, None]
        cols = torch.arange(w).float()[None, None, :]
        box = (
            (rows >= y0[:, None, None])
            & (rows < (y0 + eh)[:, None, None])
            & (cols >= x0[:, None, None])
            & (cols < (x0 + ew)[:, None, None])
            & do[:, None, None]
        )
        x = x.masked_fill(box[:, None], 0.0)
    return x


def _normalise(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


_GROUP_INDEX = [list(g) for g in GROUP_LABELS]


def group_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(N, 10) label logits -> (N, 5) log of summed group probabilities."""
    logp = F.log_softmax(logits, dim=1)
    return torch.stack([torch.logsumexp(logp[:, idx], dim=1) for idx in _GROUP_INDEX], dim=1)


class TrainingLoss(nn.Module):
    """Class-weighted cross-entropy (+ label smoothing) and an optional group-level term."""

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
        self.class_weights = class_weights
        self.group_weights = group_weights
        self.label_smoothing = label_smoothing
        self.group_loss_weight = group_loss_weight if target == "labels" else 0.0

    def forward(self, logits: torch.Tensor, y: torch.Tensor, smoothing: bool = True) -> torch.Tensor:
        ls = self.label_smoothing if smoothing else 0.0
        logits = logits.float()  # bf16 autocast output: the loss is computed in fp32
        cw = None if self.class_weights is None else self.class_weights.to(logits.device)
        loss = F.cross_entropy(logits, y, weight=cw, label_smoothing=ls)
        if self.group_loss_weight > 0:
            g = LABEL_TO_GROUP_T.to(y.device)[y]
            gw = None if self.group_weights is None else self.group_weights.to(logits.device)
            loss = loss + self.group_loss_weight * F.nll_loss(group_log_probs(logits), g, weight=gw)
        return loss


LABEL_TO_GROUP_T = torch.tensor(np.array(LABEL_TO_GROUP), dtype=torch.long)


def make_optimizer(spec: ExperimentSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise ConfigError(f"experiment {spec.name!r} has no trainable parameters (check freeze)")
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=True
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
        sch = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=spec.lr, total_steps=total, pct_start=spec.warmup_frac, div_factor=20.0
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


@torch.no_grad()
def predict_logits(
    model: ClassifierNet,
    x_u8: np.ndarray | torch.Tensor,
    mean: float,
    std: float,
    *,
    hflip: bool = False,
    batch_size: int = EVAL_BATCH,
) -> torch.Tensor:
    """Eval-mode logits for uint8 (N, 28, 28) images (or the mean probs' log when ``hflip``)."""
    model.eval()
    device = next(model.parameters()).device
    xt = torch.as_tensor(x_u8)
    if xt.ndim == 3:
        xt = xt[:, None]
    out = []
    for i in range(0, len(xt), batch_size):
        xb = _normalise(xt[i : i + batch_size].to(device).float().div_(255.0), mean, std)
        logits = model(xb)
        if hflip:
            p = (F.softmax(logits, 1) + F.softmax(model(xb.flip(-1)), 1)) / 2
            logits = torch.log(p.clamp_min(1e-12))
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def _val_metrics(
    logits: torch.Tensor, y_labels: np.ndarray, target: str, loss_fn: TrainingLoss
) -> dict[str, float]:
    y_lab = torch.as_tensor(y_labels, dtype=torch.long)
    y_grp = LABEL_TO_GROUP_T[y_lab]
    y_t = y_lab if target == "labels" else y_grp
    loss = float(loss_fn(logits, y_t, smoothing=False))
    pred = logits.argmax(1)
    if target == "labels":
        acc = float((pred == y_lab).float().mean())
        glogp = group_log_probs(logits)
    else:
        acc = float((pred == y_grp).float().mean())
        glogp = F.log_softmax(logits, 1)
    gacc = float((glogp.argmax(1) == y_grp).float().mean())
    gnll = float(F.nll_loss(glogp, y_grp))
    return {"val_loss": loss, "val_acc": acc, "val_group_acc": gacc, "val_group_nll": gnll}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _spec_fingerprint(
    spec: ExperimentSpec, seed: int, n_train: int, n_val: int, mean: float, std: float
) -> str:
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
) -> TrainResult:
    """Train ``spec`` as ``profile`` says on ``data`` (x_train, y_train, x_val, y_val: uint8 / int labels).

    ``mean``/``std`` are the dataset version's pixel/255 statistics. With ``checkpoint_dir``, an
    epoch checkpoint is written after each epoch and a run with the same spec, seed and data
    resumes from it. ``lake`` is only needed when the spec starts from weights in the lake.
    ``device`` is 'auto' (a CUDA GPU when there is one), 'cpu' or 'cuda'; the returned model is
    always on the CPU.
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
        return _train(
            spec,
            profile,
            data,
            float(mean),
            float(std),
            seed,
            checkpoint_dir,
            progress,
            lake,
            allow_download,
            t_start,
            dev,
        )
    finally:
        torch.set_num_threads(old_threads)


def _train(
    spec: ExperimentSpec,
    profile: ProfileParams,
    data: dict[str, np.ndarray],
    mean: float,
    std: float,
    seed: int,
    checkpoint_dir: Path | None,
    progress: ProgressFn | None,
    lake: Any | None,
    allow_download: bool,
    t_start: float,
    device: torch.device,
) -> TrainResult:
    tr_idx = stratified_subset(data["y_train"], profile.max_train_images, seed)
    va_idx = stratified_subset(data["y_val"], profile.max_val_images, seed + 1)
    x_tr = torch.from_numpy(np.ascontiguousarray(data["x_train"][tr_idx]))[:, None]
    y_tr_lab = np.asarray(data["y_train"][tr_idx], dtype=np.int64)
    x_va = np.ascontiguousarray(data["x_val"][va_idx])
    y_va_lab = np.asarray(data["y_val"][va_idx], dtype=np.int64)
    y_tr_grp = np.asarray(LABEL_TO_GROUP)[y_tr_lab]
    y_tr = torch.from_numpy(y_tr_lab if spec.target == "labels" else y_tr_grp)
    n_train, n_val = len(tr_idx), len(va_idx)

    torch.manual_seed(seed)
    model = build_model(spec.architecture, spec.num_outputs, spec.input_size, spec.arch_params)
    weights = init_weights(
        model, spec, pretrained_allowed=profile.pretrained, allow_download=allow_download, lake=lake
    )
    _set_frozen(model, spec.freeze)
    params, macs = count_parameters(model), count_macs(model)
    model = model.to(device=device, memory_format=torch.channels_last)
    precision = resolve_precision(spec.precision, device)
    amp_dtype = torch.bfloat16 if precision == "bf16" else None

    balanced = spec.class_weighting == "balanced"
    cw = balanced_class_weights(y_tr.numpy(), spec.num_outputs) if balanced else None
    gw = balanced_class_weights(y_tr_grp, NUM_GROUPS) if balanced else None
    loss_fn = TrainingLoss(spec.target, cw, gw, spec.label_smoothing, spec.group_loss_weight)

    bs = min(spec.batch_size, n_train)
    steps_per_epoch = max(1, n_train // bs)  # the ragged tail is dropped (BatchNorm needs > 1 image)
    optimizer = make_optimizer(spec, [p for p in model.parameters() if p.requires_grad])
    scheduler, sched_when = make_scheduler(spec, optimizer, steps_per_epoch)
    stopper = EarlyStopping(spec.early_stopping_patience, spec.min_delta)

    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_val_loss, best_epoch, start_epoch, stopped_early = math.inf, -1, 0, False
    resumed_from: int | None = None
    ck_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    fingerprint = _spec_fingerprint(spec, seed, n_train, n_val, mean, std)
    if ck_path is not None:
        ck = _load_checkpoint(ck_path, fingerprint)
        if ck is not None:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ck["scheduler"])
            stopper.load_state_dict(ck["stopper"])
            history = list(ck["history"])
            best_state, best_val_loss, best_epoch = (
                ck["best_state"],
                float(ck["best_val_loss"]),
                int(ck["best_epoch"]),
            )
            start_epoch, stopped_early = int(ck["epoch"]) + 1, bool(ck["stopped_early"])
            resumed_from = int(ck["epoch"])
            log.info("%s: resuming after epoch %d from %s", spec.name, resumed_from + 1, ck_path)

    log.info(
        "%s: training %s (%d params, %.1f MMAC/img) on %d images, validating on %d, up to %d epochs, batch %d, "
        "%s %s, %d threads",
        spec.name, spec.architecture, params, macs / 1e6, n_train, n_val, spec.epochs, bs, device.type, precision,
        torch.get_num_threads(),
    )  # fmt: skip
    epoch_images = steps_per_epoch * bs
    for epoch in range(start_epoch, spec.epochs):
        if stopped_early:
            break
        t_epoch = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        torch.manual_seed(seed * 7_919 + epoch)  # dropout
        perm = torch.randperm(n_train, generator=gen)
        model.train()
        _frozen_bn_eval(model)
        run_loss, run_correct, seen, last_log = 0.0, 0, 0, time.perf_counter()
        for step in range(steps_per_epoch):
            idx = perm[step * bs : (step + 1) * bs]
            xb = x_tr[idx].float().div_(255.0)
            if spec.augmentation.active:
                xb = augment_batch(xb, spec.augmentation, gen)
            xb = _normalise(xb.to(device, non_blocking=True), mean, std)
            yb = y_tr[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(xb)
            loss = loss_fn(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if sched_when == "step":
                scheduler.step()
            run_loss += float(loss.detach()) * len(idx)
            run_correct += int((logits.detach().argmax(1) == yb).sum())
            seen += len(idx)
            now = time.perf_counter()
            if now - last_log > 15 or step == steps_per_epoch - 1:
                last_log = now
                ips = seen / max(now - t_epoch, 1e-9)
                left = (epoch_images - seen) + (spec.epochs - epoch - 1) * (epoch_images + n_val / 4)
                info = {
                    "event": "batch", "experiment": spec.name, "epoch": epoch + 1, "epochs": spec.epochs,
                    "step": step + 1, "steps": steps_per_epoch, "train_loss": run_loss / seen,
                    "images_per_s": ips, "eta_s": left / max(ips, 1e-9),
                }  # fmt: skip
                log.info(
                    "%s epoch %d/%d step %d/%d loss %.4f %.0f img/s ETA %.0f s (max epochs)",
                    spec.name, epoch + 1, spec.epochs, step + 1, steps_per_epoch, info["train_loss"], ips, info["eta_s"],
                )  # fmt: skip
                if progress:
                    progress(info)
        train_s = time.perf_counter() - t_epoch
        vm = _val_metrics(predict_logits(model, x_va, mean, std), y_va_lab, spec.target, loss_fn)
        if sched_when == "epoch":
            scheduler.step(vm["val_loss"])
        row = {
            "epoch": epoch + 1,
            "train_loss": run_loss / max(seen, 1),
            "train_acc": run_correct / max(seen, 1),
            **vm,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_s": train_s,
            "epoch_s": time.perf_counter() - t_epoch,
            "images_per_s": seen / max(train_s, 1e-9),
        }
        history.append(row)
        if vm["val_loss"] < best_val_loss:
            best_val_loss, best_epoch = vm["val_loss"], epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        stopped_early = stopper.step(vm["val_loss"]) and epoch + 1 < spec.epochs
        log.info(
            "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f group acc %.4f | lr %.2e | %.0f img/s, %.1f s%s",
            spec.name, epoch + 1, spec.epochs, row["train_loss"], row["train_acc"], vm["val_loss"], vm["val_acc"],
            vm["val_group_acc"], row["lr"], row["images_per_s"], row["epoch_s"], " (early stop)" if stopped_early else "",
        )  # fmt: skip
        if progress:
            progress({"event": "epoch", "experiment": spec.name, **row, "epochs": spec.epochs})
        if ck_path is not None:
            _save_checkpoint(
                ck_path,
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "stopper": stopper.state_dict(),
                    "history": history,
                    "best_state": best_state,
                    "best_val_loss": best_val_loss,
                    "best_epoch": best_epoch,
                    "stopped_early": stopped_early,
                },
            )

    if best_state is not None:
        model.load_state_dict(best_state)
    model = model.to("cpu")
    model.eval()
    plain_logits = predict_logits(model, x_va, mean, std)  # validation, once, for TTA and temperature
    tta, tta_scores, vm = _choose_tta(model, spec, x_va, y_va_lab, mean, std, loss_fn, plain_logits)
    spec = spec.model_copy(update={"tta": tta})
    temperature, operating_point = _calibrate(model, spec, x_va, y_va_lab, mean, std, plain_logits)
    wall = time.perf_counter() - t_start
    prior = sum(h["epoch_s"] for h in history[: (resumed_from + 1) if resumed_from is not None else 0])
    log.info(
        "%s: best epoch %d val loss %.4f group acc %.4f (tta %s), %d epochs in %.1f s",
        spec.name, best_epoch, best_val_loss, vm["val_group_acc"], tta, len(history), wall + prior,
    )  # fmt: skip
    return TrainResult(
        spec=spec,
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_val_loss,
        epochs_run=len(history),
        stopped_early=stopped_early,
        wall_s=wall + prior,
        weights=weights,
        val_metrics=vm,
        n_train=n_train,
        n_val=n_val,
        params=params,
        macs=macs,
        seed=seed,
        resumed_from_epoch=resumed_from,
        tta_scores=tta_scores,
        temperature=temperature,
        operating_point=operating_point,
        device=device.type,
        precision=precision,
    )


def _calibrate(
    model: ClassifierNet,
    spec: ExperimentSpec,
    x_va: np.ndarray,
    y_va: np.ndarray,
    mean: float,
    std: float,
    plain_logits: torch.Tensor,
) -> tuple[float, dict[str, Any] | None]:
    """Temperature scaling, then (``decision_rule='recall_floors'``) the operating point, both on VALIDATION.

    The operating point is fitted on the group probabilities exactly as the scoring graph makes them
    (TTA and temperature included), against the study's per-group recall as floors.
    """
    from zalando.calibration import fit_group_weights, fit_temperature, recall_floors
    from zalando.labels import GROUP_NAMES
    from zalando.models.bundle import ScoringModel
    from zalando.study import STUDY_BEST

    if len(y_va) == 0:
        return 1.0, None
    y_grp = np.asarray(LABEL_TO_GROUP)[y_va]
    temperature = fit_temperature(plain_logits.numpy(), y_va if spec.target == "labels" else y_grp)
    if spec.decision_rule == "argmax":
        return temperature, None
    scoring = ScoringModel(model, mean, std, spec.target, temperature, spec.tta)
    with torch.no_grad():
        probs = torch.cat(
            [
                scoring(torch.as_tensor(x_va[i : i + EVAL_BATCH])[:, None].float())[0]
                for i in range(0, len(x_va), EVAL_BATCH)
            ]
        ).numpy()
    floors = recall_floors([STUDY_BEST[g]["recall"] for g in GROUP_NAMES])
    op = fit_group_weights(probs, y_grp, floors)
    log.info(
        "%s: operating point %s on validation (%s): accuracy %.4f -> %.4f, recall %s -> %s",
        spec.name, op.weights, op.reason, op.acc_before, op.acc_after,
        [round(r, 4) for r in op.recall_before], [round(r, 4) for r in op.recall_after],
    )  # fmt: skip
    return temperature, op.as_dict()


def _choose_tta(
    model: ClassifierNet,
    spec: ExperimentSpec,
    x_va: np.ndarray,
    y_va: np.ndarray,
    mean: float,
    std: float,
    loss_fn: TrainingLoss,
    plain_logits: torch.Tensor,
) -> tuple[str, dict[str, float], dict[str, float]]:
    """Decide test-time flip on VALIDATION data only (lower group NLL wins when spec.tta == 'auto')."""
    plain = _val_metrics(plain_logits, y_va, spec.target, loss_fn)
    if spec.tta == "none":
        return "none", {}, plain
    flipped = _val_metrics(predict_logits(model, x_va, mean, std, hflip=True), y_va, spec.target, loss_fn)
    scores = {"none": plain["val_group_nll"], "hflip": flipped["val_group_nll"]}
    if spec.tta == "hflip" or scores["hflip"] < scores["none"]:
        return "hflip", scores, flipped
    return "none", scores, plain
