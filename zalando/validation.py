"""What the validation split decides: eval-mode logits, the validation metrics, and the choices after training.

:func:`predict_logits` and :func:`val_metrics` serve both the epoch loop (:func:`zalando.train.evaluate`
after every epoch) and the choices made once training has ended: :func:`choose_on_validation` decides
the test-time flip (lower group NLL wins), then fits the temperature and, under
``decision_rule='recall_floors'``, the operating point on the group probabilities exactly as the
scoring graph makes them; under the flip, the one-view confidence below which a row is flipped
(the rows above keep one view: about 4% of the rows get the second pass for the full flip's accuracy). Everything here reads the VALIDATION split; the test split never comes here.

The label-to-group helpers (:func:`group_log_probs`, ``LABEL_TO_GROUP_T``) live here too, for the
training loss of :mod:`zalando.train` and for the metrics alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from zalando.labels import GROUP_LABELS, LABEL_TO_GROUP
from zalando.models.architectures import ClassifierNet
from zalando.models.experiments import ExperimentSpec
from zalando.models.hardware import to_device

if TYPE_CHECKING:
    from zalando.objective import TrainingLoss
    from zalando.train import TrainData, TrainResult

log = logging.getLogger(__name__)

EVAL_BATCH = 512


def normalise(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Pixels in 0..1 -> ``(x - mean) / std``, channels_last (the layout the CNNs run fastest in)."""
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


_GROUP_INDEX = [list(g) for g in GROUP_LABELS]
LABEL_TO_GROUP_T = torch.tensor(np.array(LABEL_TO_GROUP), dtype=torch.long)


def group_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(N, 10) label logits -> (N, 5) log of summed group probabilities."""
    logp = F.log_softmax(logits, dim=1)
    return torch.stack([torch.logsumexp(logp[:, idx], dim=1) for idx in _GROUP_INDEX], dim=1)


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
    xt = to_device(xt, device)  # uint8 over the bus, once; cast and normalised on the device
    out = []
    for i in range(0, len(xt), batch_size):
        xb = normalise(xt[i : i + batch_size].float().div_(255.0), mean, std)
        logits = model(xb)
        if hflip:
            p = (F.softmax(logits, 1) + F.softmax(model(xb.flip(-1)), 1)) / 2
            logits = torch.log(p.clamp_min(1e-12))
        out.append(logits.float())
    return torch.cat(out).cpu() if out else torch.empty(0, 0)


def val_metrics(
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


# ----------------------------------------------------------------------------- after training


@dataclass(frozen=True)
class ValidationChoices:
    """What the validation split decides after training: test-time flip, temperature, operating point."""

    spec: ExperimentSpec  # with ``tta`` decided
    val_metrics: dict[str, float]  # with the chosen TTA
    tta_scores: dict[str, float]
    temperature: float
    operating_point: dict[str, Any] | None
    flip_choice: dict[str, Any] | None = None  # under hflip: which rows get the flipped view


def choose_on_validation(
    model: ClassifierNet, spec: ExperimentSpec, loss_fn: TrainingLoss, data: TrainData
) -> ValidationChoices:
    """TTA, then the temperature and the operating point, all on VALIDATION (``model`` in eval mode, any device)."""
    plain_logits = predict_logits(model, data.x_val, data.mean, data.std)  # once, for TTA and temperature
    tta, tta_scores, vm = _choose_tta(model, spec, data, loss_fn, plain_logits)
    spec = spec.model_copy(update={"tta": tta})
    temperature, operating_point = _calibrate(model, spec, data, plain_logits)
    flip = _choose_flip_below(model, spec, data, temperature, operating_point)
    return ValidationChoices(spec, vm, tta_scores, temperature, operating_point, flip)


def _calibrate(
    model: ClassifierNet, spec: ExperimentSpec, data: TrainData, plain_logits: torch.Tensor
) -> tuple[float, dict[str, Any] | None]:
    """Temperature scaling, then (``decision_rule='recall_floors'``) the operating point, both on VALIDATION.

    The operating point is fitted on the group probabilities exactly as the scoring graph makes them
    (TTA and temperature included), against the study's per-group recall as floors.
    """
    from zalando.calibration import fit_group_weights, fit_temperature, recall_floors
    from zalando.labels import GROUP_NAMES
    from zalando.models.bundle import ScoringModel
    from zalando.study import STUDY_BEST

    x_va, y_va = data.x_val, data.y_val
    if len(y_va) == 0:
        return 1.0, None
    y_grp = np.asarray(LABEL_TO_GROUP)[y_va]
    temperature = fit_temperature(plain_logits.numpy(), y_va if spec.target == "labels" else y_grp)
    if spec.decision_rule == "argmax":
        return temperature, None
    scoring = ScoringModel(model, data.mean, data.std, spec.target, temperature, spec.tta)
    probs = _scoring_probs(scoring, model, x_va)
    floors = recall_floors([STUDY_BEST[g]["recall"] for g in GROUP_NAMES])
    op = fit_group_weights(probs, y_grp, floors)
    log.info(
        "%s: operating point %s on validation (%s): accuracy %.4f -> %.4f, recall %s -> %s",
        spec.name, op.weights, op.reason, op.acc_before, op.acc_after,
        [round(r, 4) for r in op.recall_before], [round(r, 4) for r in op.recall_after],
    )  # fmt: skip
    return temperature, op.as_dict()


def _scoring_probs(scoring: torch.nn.Module, model: ClassifierNet, x_u8: np.ndarray) -> np.ndarray:
    """The scoring graph's group probabilities of uint8 images, on the model's device."""
    device = next(model.parameters()).device
    scoring = scoring.to(device).eval()
    x_dev = to_device(torch.as_tensor(x_u8)[:, None], device)
    with torch.no_grad():
        parts = [scoring(x_dev[i : i + EVAL_BATCH].float())[0] for i in range(0, len(x_u8), EVAL_BATCH)]
    return torch.cat(parts).cpu().numpy()


def _choose_flip_below(
    model: ClassifierNet,
    spec: ExperimentSpec,
    data: TrainData,
    temperature: float,
    operating_point: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Under hflip, the one-view confidence below which a row gets the flipped view too (VALIDATION).

    The lowest threshold whose decisions lose nothing against flipping every row
    (:func:`zalando.calibration.choose_doubt_threshold`); None (every row flipped) when none does.
    """
    from zalando.calibration import choose_doubt_threshold, recall_floors
    from zalando.labels import GROUP_NAMES
    from zalando.models.bundle import ScoringModel
    from zalando.study import STUDY_BEST

    if spec.tta != "hflip" or len(data.y_val) == 0:
        return None
    weights = list(operating_point["weights"]) if operating_point else None
    args = (model, data.mean, data.std, spec.target, temperature)
    one = _scoring_probs(ScoringModel(*args, "none", weights), model, data.x_val)
    both = _scoring_probs(ScoringModel(*args, "hflip", weights), model, data.x_val)
    y_grp = np.asarray(LABEL_TO_GROUP)[data.y_val]
    floors = recall_floors([STUDY_BEST[g]["recall"] for g in GROUP_NAMES])
    choice = choose_doubt_threshold(one, both, y_grp, floors)
    if choice is None:
        log.info("%s: every row keeps the flipped view (no threshold loses nothing on validation)", spec.name)
    else:
        log.info(
            "%s: the flipped view only below %.3f one-view confidence (%.1f%% of validation rows), "
            "grouped accuracy %.4f (every row flipped %.4f, one view %.4f)",
            spec.name, choice["below"], 100 * choice["share"], choice["val_group_acc"],
            choice["val_group_acc_second"], choice["val_group_acc_first"],
        )  # fmt: skip
    return choice


def choose_screen_below(
    main: TrainResult, screen: ClassifierNet, screen_temperature: float, data: TrainData
) -> dict[str, Any] | None:
    """The screen's top group probability below which a row goes through the main scoring graph (VALIDATION).

    The main graph as it scores (TTA, flip threshold, temperature, operating point) against the screen
    alone (one view, its temperature, plain argmax): the lowest threshold whose decisions lose nothing
    against the main graph on every row (:func:`zalando.calibration.choose_doubt_threshold`), or None.
    """
    from zalando.calibration import choose_doubt_threshold, recall_floors
    from zalando.labels import GROUP_NAMES
    from zalando.models.bundle import ScoringModel
    from zalando.study import STUDY_BEST

    if len(data.y_val) == 0:
        return None
    op, flip = main.operating_point, main.flip_choice
    full = ScoringModel(
        main.model, data.mean, data.std, main.spec.target, main.temperature, main.spec.tta,
        list(op["weights"]) if op else None, flip["below"] if flip else None,
    )  # fmt: skip
    alone = ScoringModel(screen, data.mean, data.std, main.spec.target, screen_temperature, "none")
    second = _scoring_probs(full, main.model, data.x_val)
    first = _scoring_probs(alone, screen, data.x_val)
    floors = recall_floors([STUDY_BEST[g]["recall"] for g in GROUP_NAMES])
    return choose_doubt_threshold(first, second, np.asarray(LABEL_TO_GROUP)[data.y_val], floors)


def _choose_tta(
    model: ClassifierNet,
    spec: ExperimentSpec,
    data: TrainData,
    loss_fn: TrainingLoss,
    plain_logits: torch.Tensor,
) -> tuple[str, dict[str, float], dict[str, float]]:
    """Decide test-time flip on VALIDATION data only (lower group NLL wins when spec.tta == 'auto')."""
    plain = val_metrics(plain_logits, data.y_val, spec.target, loss_fn)
    if spec.tta == "none":
        return "none", {}, plain
    flipped_logits = predict_logits(model, data.x_val, data.mean, data.std, hflip=True)
    flipped = val_metrics(flipped_logits, data.y_val, spec.target, loss_fn)
    scores = {"none": plain["val_group_nll"], "hflip": flipped["val_group_nll"]}
    if spec.tta == "hflip" or scores["hflip"] < scores["none"]:
        return "hflip", scores, flipped
    return "none", scores, plain
