"""The model bundle: weights + spec + normalisation + label maps + history + ONNX + model card.

Stored in the lake at ``models/<experiment>/<model_version>/`` as one committed partition:
``weights.pt`` (state_dict), ``bundle.json``, ``model.onnx`` (self-contained scoring graph) and
``model_card.json``; a bundle built with :class:`~zalando.admission.RuntimeCheckData` (as training
builds it) also has ``model.int8.onnx`` (the graph quantized to int8) and, in its card, every
runtime's grouped accuracy on validation and whether it is admitted to score.
:class:`ScoringModel` is the scoring graph: raw 0..255 pixels in, group probabilities and the
penultimate embedding out.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import pickle
import subprocess
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import zalando
from zalando.admission import CARD_KEY, RuntimeAdmission, RuntimeCheckData, admit_runtimes
from zalando.errors import ModelError, NotCommittedError
from zalando.labels import GROUP_NAMES, LABEL_NAMES, LABEL_TO_GROUP, NUM_GROUPS, NUM_LABELS
from zalando.lake.keys import bundle_key
from zalando.models.architectures import ClassifierNet, build_model, count_macs, count_parameters
from zalando.models.experiments import ExperimentSpec
from zalando.quantize import INT8_ONNX_FILE, quantize_int8
from zalando.runtime import ONNX_INPUT, ONNX_OUTPUTS

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
FILES = ("weights.pt", "bundle.json", "model.onnx", "model_card.json")  # + INT8_ONNX_FILE when checked
SCREEN_FILE = "screen.pt"  # the screen net's weights, in a bundle that has one
ONNX_ATOL = 1e-4
ONNX_OPSET = 17


class ScoringModel(nn.Module):
    """Raw pixels (N, 1, 28, 28) float 0..255 -> (group_probs (N, 5), embedding (N, D)).

    ``tta='hflip'`` averages the label probabilities of the image and its mirror; with ``flip_below``
    only the rows whose one-view top group probability is below it get the mirror's pass (a gather,
    the net on those rows, a scatter: in the ONNX graph too), and the embedding is the one view's.
    With a ``screen`` (the scoring graph of a cheap net) every row is scored by the screen first and
    only the rows whose screen top group probability is below ``screen_below`` go through this graph's
    net; the others keep the screen's probabilities, and the embedding is the screen's for every row.
    """

    def __init__(
        self,
        net: ClassifierNet,
        mean: float,
        std: float,
        target: str,
        temperature: float = 1.0,
        tta: str = "none",
        group_weights: list[float] | None = None,
        flip_below: float | None = None,
        screen: ScoringModel | None = None,
        screen_below: float | None = None,
    ) -> None:
        super().__init__()
        if (screen is None) != (screen_below is None):
            raise ModelError("a screen needs its threshold, and a threshold its screen")
        self.screen = screen
        self.screen_below = None if screen_below is None else float(screen_below)
        self.net = net
        self.mean = float(mean)
        self.std = float(std)
        self.temperature = float(temperature)
        self.hflip = tta == "hflip"
        # flip only the doubtful rows: those whose one-view top group probability is below this
        self.flip_below = None if flip_below is None or not self.hflip else float(flip_below)
        if target == "labels":
            to_group = torch.zeros(NUM_LABELS, NUM_GROUPS)
            to_group[torch.arange(NUM_LABELS), torch.tensor(np.array(LABEL_TO_GROUP))] = 1.0
        else:
            to_group = torch.eye(NUM_GROUPS)
        self.register_buffer("to_group", to_group, persistent=False)
        # the operating point chosen on validation (None / all ones: plain argmax)
        self.reweight = group_weights is not None and any(float(w) != 1.0 for w in group_weights)
        gw = torch.tensor([float(w) for w in group_weights] if self.reweight else [1.0] * NUM_GROUPS)
        self.register_buffer("group_weights", gw, persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.screen is None or self.screen_below is None:
            return self._score(pixels)
        first, emb = self.screen(pixels)
        doubtful = torch.nonzero(first.amax(1) < self.screen_below).squeeze(1)
        second, _ = self._score(pixels.index_select(0, doubtful))
        return first.scatter(0, doubtful[:, None].expand(-1, first.shape[1]), second), emb

    def _score(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This graph's own net (no screen): group probabilities and embedding."""
        x = (pixels / 255.0 - self.mean) / self.std
        # .float(): under bf16 autocast the net returns bfloat16; the probabilities are made in fp32
        # (a no-op, and no graph node, in fp32 and in the ONNX export)
        logits, emb = self.net.forward_both(x)
        logits, emb = logits.float(), emb.float()
        probs = F.softmax(logits / self.temperature, dim=1)
        if self.flip_below is not None:
            # the flipped view only where one view leaves the group in doubt (chosen on validation so
            # that the predictions' accuracy is the full flip's); the embedding is the one view's
            doubtful = torch.nonzero(self._groups(probs).amax(1) < self.flip_below).squeeze(1)
            logits2, _ = self.net.forward_both(torch.flip(x.index_select(0, doubtful), dims=[3]))
            mean = (probs.index_select(0, doubtful) + F.softmax(logits2.float() / self.temperature, 1)) * 0.5
            probs = probs.scatter(0, doubtful[:, None].expand(-1, probs.shape[1]), mean)
        elif self.hflip:
            logits2, emb2 = self.net.forward_both(torch.flip(x, dims=[3]))
            probs = (probs + F.softmax(logits2.float() / self.temperature, dim=1)) * 0.5
            emb = (emb + emb2.float()) * 0.5
        return self._groups(probs), emb

    def _groups(self, probs: torch.Tensor) -> torch.Tensor:
        """Label probabilities -> group probabilities, through the operating point."""
        # labels -> groups as multiply-and-sum, not a matmul: autocast would run a matmul in bf16
        groups = (probs[:, :, None] * self.to_group[None]).sum(1)
        if self.reweight:  # a change of prior: weight, then renormalise
            groups = groups * self.group_weights
            groups = groups / groups.sum(1, keepdim=True)
        return groups


@dataclass
class Screen:
    """The cheap first net of a bundle's scoring graph, and the threshold that sends a row past it."""

    net: ClassifierNet
    architecture: str
    arch_params: dict[str, float]
    temperature: float
    below: float

    def as_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "arch_params": dict(self.arch_params),
            "temperature": self.temperature,
            "below": self.below,
        }


@dataclass
class ModelBundle:
    """A trained model and everything needed to score with it and to explain where it came from."""

    spec: ExperimentSpec
    model: ClassifierNet
    mean: float
    std: float
    model_version: str
    dataset_version: str
    temperature: float = 1.0
    group_weights: list[float] | None = None  # operating point (None: plain argmax)
    flip_below: float | None = None  # under tta hflip: flip only rows this doubtful (None: every row)
    screen: Screen | None = None  # a cheap first net: only the rows it doubts go through ``model``
    history: list[dict[str, Any]] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""

    @property
    def experiment(self) -> str:
        return self.spec.name

    @property
    def key(self) -> str:
        return bundle_key(self.spec.name, self.model_version)

    def scoring_model(self) -> ScoringModel:
        """The eval-mode scoring graph (shares the nets' weights)."""
        self.model.eval()
        screen = None
        if self.screen is not None:
            self.screen.net.eval()
            screen = ScoringModel(
                self.screen.net, self.mean, self.std, self.spec.target, self.screen.temperature, "none"
            )
        return ScoringModel(
            self.model,
            self.mean,
            self.std,
            self.spec.target,
            self.temperature,
            self.spec.tta,
            self.group_weights,
            self.flip_below,
            screen,
            None if self.screen is None else self.screen.below,
        ).eval()

    def nets(self) -> list[ClassifierNet]:
        """The main net, and the screen's when there is one."""
        return [self.model] + ([self.screen.net] if self.screen is not None else [])


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    version = zalando.__version__
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(zalando.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            version += f"+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def new_model_version(
    spec: ExperimentSpec, dataset_version: str, seed: int, now: datetime | None = None
) -> str:
    """Sortable and unique per spec/data/seed: ``20260101T020000Z-1a2b3c4d``."""
    now = now or datetime.now(UTC)
    h = hashlib.sha256(
        json.dumps([spec.model_dump(mode="json"), dataset_version, seed], sort_keys=True).encode()
    ).hexdigest()[:8]
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{h}"


def build_bundle(
    result: Any,
    *,
    mean: float,
    std: float,
    dataset_version: str,
    model_version: str | None = None,
    temperature: float | None = None,
    extra_card: dict[str, Any] | None = None,
) -> ModelBundle:
    """A bundle from a :class:`zalando.train.TrainResult`, with its model card filled in.

    ``temperature`` defaults to the one the training run fitted on validation.
    """
    spec: ExperimentSpec = result.spec
    if temperature is None:
        temperature = float(getattr(result, "temperature", 1.0))
    op = getattr(result, "operating_point", None)
    group_weights = list(op["weights"]) if op else None
    flip = getattr(result, "flip_choice", None)
    flip_below = flip["below"] if flip else None
    sres = getattr(result, "screen", None)
    screen = None
    if sres is not None:
        screen = Screen(
            net=sres.model, architecture=sres.spec.architecture, arch_params=dict(sres.spec.arch_params),
            temperature=float(sres.temperature), below=float(sres.choice["below"]),
        )  # fmt: skip
    version = model_version or new_model_version(spec, dataset_version, result.seed)
    card = {
        "model": spec.name,
        "model_version": version,
        "architecture": spec.architecture,
        "description": spec.description,
        "profile": spec.profile,
        "target": spec.target,
        "input_size": spec.input_size,
        "tta": spec.tta,
        "tta_flip": flip,
        "screen": None
        if sres is None
        else {
            **screen.as_json(),  # type: ignore[union-attr]
            "validation": sres.choice,
            "params": sres.params,
            "macs_per_image": sres.macs,
            "epochs_run": sres.epochs_run,
            "wall_s": round(sres.wall_s, 2),
        },
        "temperature": float(temperature),
        "operating_point": op,
        "weights": result.weights.to_dict(),
        "params": result.params,
        "macs_per_image": result.macs,
        "mflops_per_image": round(2 * result.macs / 1e6, 3),
        "dataset_version": dataset_version,
        "normalisation": {"mean": mean, "std": std},
        "training": {
            "images": result.n_train,
            "val_images": result.n_val,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "stopped_early": result.stopped_early,
            "wall_s": round(result.wall_s, 2),
            "seed": result.seed,
            "resumed_from_epoch": result.resumed_from_epoch,
            "device": result.device,
            "precision": result.precision,
        },
        "validation": result.val_metrics,
        "tta_validation_group_nll": result.tta_scores,
        "intended_use": "Nightly batch scoring of 28x28 grayscale article images into 5 groups.",
        "limitations": "Trained on Fashion-MNIST; images must look like it (light article on dark background).",
        "created_at": datetime.now(UTC).isoformat(),
        "code_version": code_version(),
    }
    card.update(extra_card or {})
    return ModelBundle(
        spec=spec,
        model=result.model,
        mean=float(mean),
        std=float(std),
        model_version=version,
        dataset_version=dataset_version,
        temperature=float(temperature),
        group_weights=group_weights,
        flip_below=flip_below,
        screen=screen,
        history=list(result.history),
        card=card,
        code_version=card["code_version"],
    )


# ----------------------------------------------------------------------------- ONNX


def export_onnx(bundle: ModelBundle) -> bytes:
    """The scoring graph as one self-contained ONNX blob (dynamic batch)."""
    import onnx

    scoring = bundle.scoring_model()
    for net in bundle.nets():
        net.to(memory_format=torch.contiguous_format)  # a plain NCHW graph; restored below
    dummy = torch.zeros(2, 1, 28, 28)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                scoring,
                (dummy,),
                buf,
                input_names=[ONNX_INPUT],
                output_names=list(ONNX_OUTPUTS),
                dynamic_axes={ONNX_INPUT: {0: "batch"}, **{o: {0: "batch"} for o in ONNX_OUTPUTS}},
                opset_version=ONNX_OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"ONNX export of {bundle.experiment} failed: {exc}".splitlines()[0]) from exc
    finally:
        for net in bundle.nets():
            net.to(memory_format=torch.channels_last)
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name = "zalando"
    onnx.checker.check_model(model)
    return model.SerializeToString()


def check_onnx(bundle: ModelBundle, onnx_bytes: bytes, atol: float = ONNX_ATOL, seed: int = 0) -> float:
    """Max |onnx - torch| over both outputs on random images; ModelError above ``atol``."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(7, 1, 28, 28)).astype(np.float32)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    o_probs, o_emb = sess.run(list(ONNX_OUTPUTS), {ONNX_INPUT: x})
    with torch.no_grad():
        t_probs, t_emb = bundle.scoring_model()(torch.from_numpy(x))
    d_probs = float(np.max(np.abs(o_probs - t_probs.numpy())))
    scale = max(1.0, float(np.max(np.abs(t_emb.numpy()))))
    d_emb = float(np.max(np.abs(o_emb - t_emb.numpy()))) / scale
    diff = max(d_probs, d_emb)
    if not diff <= atol:
        raise ModelError(
            f"ONNX export of {bundle.experiment} disagrees with torch: max diff {diff:.2e} > {atol:.0e}"
        )
    return diff


# ----------------------------------------------------------------------------- lake I/O


def _bundle_json(bundle: ModelBundle) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "experiment": bundle.experiment,
        "model_version": bundle.model_version,
        "dataset_version": bundle.dataset_version,
        "spec": bundle.spec.model_dump(mode="json"),
        "mean": bundle.mean,
        "std": bundle.std,
        "temperature": bundle.temperature,
        "group_weights": bundle.group_weights,
        "flip_below": bundle.flip_below,
        "screen": None if bundle.screen is None else bundle.screen.as_json(),
        "label_names": list(LABEL_NAMES),
        "group_names": list(GROUP_NAMES),
        "label_to_group": [int(g) for g in LABEL_TO_GROUP],
        "onnx": {"input": ONNX_INPUT, "outputs": list(ONNX_OUTPUTS), "opset": ONNX_OPSET},
        "history": bundle.history,
        "code_version": bundle.code_version,
    }


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode("utf-8")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def bundle_files(bundle: ModelBundle, runtime_checks: RuntimeCheckData | None = None) -> dict[str, bytes]:
    """The files of a bundle (ONNX exported and checked against torch).

    With ``runtime_checks`` also ``model.int8.onnx`` (quantized here, calibrated on its training
    images) and the card's runtime verdicts on its validation split (:func:`check_runtimes`).
    """
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, buf)
    onnx_bytes = export_onnx(bundle)
    diff = check_onnx(bundle, onnx_bytes)
    card = dict(bundle.card)
    card.setdefault("params", count_parameters(bundle.model))
    card.setdefault("macs_per_image", count_macs(bundle.model))
    card["onnx_max_abs_diff_vs_torch"] = diff
    card["size_mb"] = {"torch": round(buf.tell() / 1e6, 3), "onnx": round(len(onnx_bytes) / 1e6, 3)}
    files = {"weights.pt": buf.getvalue(), "model.onnx": onnx_bytes}
    if bundle.screen is not None:
        sbuf = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in bundle.screen.net.state_dict().items()}, sbuf)
        files[SCREEN_FILE] = sbuf.getvalue()
    if runtime_checks is not None:
        int8_bytes, admission = check_runtimes(bundle, onnx_bytes, runtime_checks)
        files[INT8_ONNX_FILE] = int8_bytes
        card["size_mb"]["onnx_int8"] = round(len(int8_bytes) / 1e6, 3)
        card[CARD_KEY] = admission.model_dump(mode="json")
    bundle.card = card
    files["bundle.json"] = _json_bytes(_bundle_json(bundle))
    files["model_card.json"] = _json_bytes(card)
    return files


def check_runtimes(
    bundle: ModelBundle, onnx_bytes: bytes, data: RuntimeCheckData
) -> tuple[bytes, RuntimeAdmission]:
    """The int8 graph of ``onnx_bytes``, and every runtime of this machine judged on the validation split."""
    from zalando.models import predictor  # it imports this module

    int8_bytes = quantize_int8(onnx_bytes, data.x_calibration)
    predictors = predictor.runtime_predictors(bundle, onnx_bytes, int8_bytes)
    return int8_bytes, admit_runtimes(predictors, data.x_val, data.y_val)


def save_bundle(
    lake: Any,
    bundle: ModelBundle,
    *,
    run_id: str | None = None,
    runtime_checks: RuntimeCheckData | None = None,
) -> str:
    """Commit the bundle to ``models/<experiment>/<model_version>/``; returns the key.

    ``runtime_checks`` (training passes them): also quantize to int8 and judge every runtime on
    validation (see :func:`bundle_files`); without them the bundle has no reduced-precision verdicts.
    """
    files = bundle_files(bundle, runtime_checks)
    key = bundle.key
    lake.commit_files(
        key,
        files,
        run_id or bundle.model_version,
        extra={
            "experiment": bundle.experiment,
            "model_version": bundle.model_version,
            "dataset_version": bundle.dataset_version,
            "architecture": bundle.spec.architecture,
        },
    )
    log.info("saved model bundle %s", lake.uri(key))
    return key


def _read(lake: Any, key: str, name: str) -> bytes:
    try:
        return lake.read_file(key, name)
    except NotCommittedError:
        raise ModelError(f"no committed model bundle at {lake.uri(key)}") from None


def load_bundle(lake: Any, experiment: str, model_version: str) -> ModelBundle:
    """Rebuild a bundle by architecture name; weights loaded with ``weights_only=True``."""
    key = bundle_key(experiment, model_version)
    meta = json.loads(_read(lake, key, "bundle.json"))
    if meta.get("format") != BUNDLE_FORMAT:
        raise ModelError(f"model bundle {key} has format {meta.get('format')!r}, expected {BUNDLE_FORMAT}")
    if meta.get("label_to_group") != [int(g) for g in LABEL_TO_GROUP]:
        raise ModelError(f"model bundle {key} was trained with another label->group map")
    spec = ExperimentSpec.model_validate(meta["spec"])
    model = _load_net(
        lake, key, "weights.pt", spec.architecture, spec.num_outputs, spec.input_size, spec.arch_params
    )
    screen = _load_screen(lake, key, meta.get("screen"), spec)
    card = json.loads(_read(lake, key, "model_card.json"))
    return ModelBundle(
        spec=spec,
        model=model,
        mean=float(meta["mean"]),
        std=float(meta["std"]),
        model_version=meta["model_version"],
        dataset_version=meta["dataset_version"],
        temperature=float(meta.get("temperature", 1.0)),
        group_weights=_group_weights(meta.get("group_weights"), key),
        flip_below=_flip_below(meta.get("flip_below"), key),
        screen=screen,
        history=list(meta.get("history", [])),
        card=card,
        code_version=meta.get("code_version", ""),
    )


def _group_weights(value: Any, key: str) -> list[float] | None:
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == NUM_GROUPS
    ok = ok and all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in value)
    if not ok:
        raise ModelError(
            f"{key}/bundle.json: group_weights must be {NUM_GROUPS} positive numbers, got {value!r}"
        )
    return [float(v) for v in value]


def _load_net(
    lake: Any, key: str, name: str, architecture: str, outputs: int, size: int, params: dict[str, float]
) -> ClassifierNet:
    """A net built by architecture name, its weights from the bundle's ``name`` (plain tensors only)."""
    net = build_model(architecture, outputs, size, params)
    try:
        state = torch.load(io.BytesIO(_read(lake, key, name)), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        # a pickle that is not plain tensors (it could run code) or a torn file: refused, one line
        raise ModelError(
            f"{name} of {key} refused: not a plain tensor state dict ({type(exc).__name__})"
        ) from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{name} of {key} does not fit {architecture}: {exc}".splitlines()[0]) from None
    return net.eval()


def _load_screen(lake: Any, key: str, value: Any, spec: ExperimentSpec) -> Screen | None:
    if value is None:
        return None
    try:
        arch, params = str(value["architecture"]), {str(k): float(v) for k, v in value["arch_params"].items()}
        temperature, below = float(value["temperature"]), float(value["below"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ModelError(
            f"{key}/bundle.json: screen must have architecture, arch_params, temperature and below"
        ) from None
    if not (0 <= below <= 1 and math.isfinite(temperature) and temperature > 0):
        raise ModelError(
            f"{key}/bundle.json: screen threshold {below} or temperature {temperature} out of range"
        )
    net = _load_net(lake, key, SCREEN_FILE, arch, spec.num_outputs, spec.input_size, params)
    return Screen(net=net, architecture=arch, arch_params=params, temperature=temperature, below=below)


def _flip_below(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1):
        raise ModelError(f"{key}/bundle.json: flip_below must be a probability in [0, 1], got {value!r}")
    return float(value)


def load_onnx_bytes(lake: Any, experiment: str, model_version: str) -> bytes:
    """The bundle's ``model.onnx`` (checksum-verified)."""
    return _read(lake, bundle_key(experiment, model_version), "model.onnx")


def load_int8_onnx_bytes(lake: Any, experiment: str, model_version: str) -> bytes:
    """The bundle's ``model.int8.onnx`` (checksum-verified); ModelError for a bundle built without it."""
    key = bundle_key(experiment, model_version)
    if INT8_ONNX_FILE not in _manifest_files(lake, key):
        raise ModelError(
            f"model bundle {lake.uri(key)} has no {INT8_ONNX_FILE} (built without runtime checks)"
        )
    return _read(lake, key, INT8_ONNX_FILE)


def _manifest_files(lake: Any, key: str) -> dict[str, Any]:
    try:
        return dict(lake.read_manifest(key).get("files", {}))
    except NotCommittedError:
        raise ModelError(f"no committed model bundle at {lake.uri(key)}") from None
