"""Initial weights for an experiment: ImageNet (torchvision), none, or a model bundle in the lake.

``imagenet`` uses the torch hub cache when the file is there, else tries a download; offline it
fails fast with the file name and the folder to put it in, unless the spec allows a fallback to
``none`` (recorded in :class:`WeightsInfo` and from there in the model card).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zalando.errors import ConfigError, ModelError
from zalando.models.architectures import ClassifierNet, get_architecture

if TYPE_CHECKING:
    from zalando.models.experiments import ExperimentSpec

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WeightsInfo:
    """What was asked for and what was actually used (goes into the model card)."""

    requested: str
    used: str
    source: str
    note: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def imagenet_weights_file(architecture: str) -> tuple[str, str]:
    """(url, file name) of torchvision's ImageNet weights for a registry architecture."""
    from torchvision.models import get_model_weights

    arch = get_architecture(architecture)
    if arch.torchvision_name is None:
        raise ConfigError(f"architecture {architecture!r} has no ImageNet weights; use weights: none")
    enum = get_model_weights(arch.torchvision_name)
    url = enum.DEFAULT.url
    return url, os.path.basename(url)


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _fetch_imagenet_state(architecture: str, allow_download: bool) -> tuple[dict[str, Any], str]:
    url, fname = imagenet_weights_file(architecture)
    folder = hub_checkpoint_dir()
    path = folder / fname
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    if not allow_download:
        raise ModelError(
            f"ImageNet weights for {architecture} are not in the torch cache and downloads are off: "
            f"put {fname} (from {url}) into {folder}, or use weights: none / weights_fallback: none"
        )
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:  # noqa: S310 - fixed https URL
            data = resp.read()
    except Exception as exc:  # noqa: BLE001 - offline shows up as many different errors
        raise ModelError(
            f"ImageNet weights for {architecture} could not be downloaded ({type(exc).__name__}): "
            f"put {fname} (from {url}) into {folder}, or use weights: none / weights_fallback: none"
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), url


def _load_matching(model: ClassifierNet, tv_state: dict[str, Any], architecture: str) -> int:
    """Copy torchvision weights into our wrapper by position-independent name mapping."""
    own = model.state_dict()
    mapping: dict[str, str] = {}
    if architecture == "mobilenet_v2" or architecture == "squeezenet1_1":
        mapping = {k: "body." + k.removeprefix("features.") for k in tv_state if k.startswith("features.")}
    elif architecture == "resnet18":
        order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        for k in tv_state:
            top = k.split(".", 1)[0]
            if top in order:
                mapping[k] = f"body.{order.index(top)}.{k.split('.', 1)[1]}"
    loaded = {}
    for src, dst in mapping.items():
        if dst in own and own[dst].shape == tv_state[src].shape:
            loaded[dst] = tv_state[src]
    if not loaded:
        raise ModelError(f"no ImageNet tensors matched the {architecture} wrapper")
    model.load_state_dict(loaded, strict=False)
    return len(loaded)


def load_lake_state(lake: Any, ref: str) -> dict[str, torch.Tensor]:
    """weights.pt of the bundle at ``models/<experiment>/<model_version>`` in ``lake``."""
    key = ref.removeprefix("lake://").strip("/")
    try:
        raw = lake.read_bytes(f"{key}/weights.pt")
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot read weights of {key!r} from the lake: {exc}".splitlines()[0]) from None
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ModelError(
            f"weights of {key!r} refused: not a plain tensor state dict ({type(exc).__name__})"
        ) from None


def init_weights(
    model: ClassifierNet,
    spec: ExperimentSpec,
    *,
    pretrained_allowed: bool = True,
    allow_download: bool = True,
    lake: Any | None = None,
) -> WeightsInfo:
    """Load the spec's initial weights into ``model`` in place and say what was used."""
    requested = spec.weights
    if requested == "none":
        return WeightsInfo(requested, "none", "random init")
    if requested == "imagenet":
        if not pretrained_allowed:
            note = f"profile {spec.profile!r} trains from scratch: imagenet replaced by none"
            log.info("%s: %s", spec.name, note)
            return WeightsInfo(requested, "none", "random init", note)
        try:
            state, src = _fetch_imagenet_state(spec.architecture, allow_download)
        except ModelError as exc:
            if spec.weights_fallback == "none":
                note = f"fallback to none: {exc}"
                log.warning("%s: %s", spec.name, note)
                return WeightsInfo(requested, "none", "random init", note)
            raise
        n = _load_matching(model, state, spec.architecture)
        return WeightsInfo(requested, "imagenet", src, f"{n} tensors loaded")
    # a model in the lake
    if lake is None:
        raise ConfigError(
            f"experiment {spec.name!r} starts from lake weights {requested!r} but no lake was given"
        )
    state = load_lake_state(lake, requested)
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ModelError(f"weights {requested!r} do not fit architecture {spec.architecture!r}")
    model.load_state_dict(matching, strict=False)
    return WeightsInfo(requested, "lake", requested, f"{len(matching)}/{len(own)} tensors loaded")
