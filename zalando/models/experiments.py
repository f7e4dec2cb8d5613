"""Experiments as data: specs, profiles, the built-in catalogue and extra specs from a YAML/JSON file.

An :class:`ExperimentSpec` carries the study's (``paper``) hyper-parameters; a :class:`ProfileParams`
only changes numbers (input size cap, epochs cap, batch size, image counts, numeric overrides) and
which experiments it trains. :func:`resolve_spec` applies a profile to a spec.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zalando.errors import ConfigError
from zalando.gates import GateConfig
from zalando.models.architectures import ARCHITECTURES, MAX_INPUT_SIZE, MIN_INPUT_SIZE
from zalando.settings import Profile

log = logging.getLogger(__name__)

# the built-in profiles, in order (settings.Profile is the one definition)
PROFILE_NAMES: tuple[str, ...] = get_args(Profile)


class AugmentPolicy(BaseModel):
    """Random per-image augmentation applied on the fly to training batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hflip: bool = False
    shift: float = Field(0.0, ge=0, le=0.5, description="max translation, fraction of the image side")
    rotate: float = Field(0.0, ge=0, le=180, description="max rotation in degrees")
    scale: float = Field(0.0, ge=0, le=0.5, description="max zoom in/out, fraction")
    erase: float = Field(0.0, ge=0, le=1, description="probability of erasing one random rectangle")

    @property
    def active(self) -> bool:
        return self.hflip or self.shift > 0 or self.rotate > 0 or self.scale > 0 or self.erase > 0


AUGMENT_PRESETS: dict[str, AugmentPolicy] = {
    "none": AugmentPolicy(),
    "flip": AugmentPolicy(hflip=True),
    "light": AugmentPolicy(hflip=True, shift=0.08),
    "standard": AugmentPolicy(hflip=True, shift=0.1, rotate=10.0, scale=0.1),
    "strong": AugmentPolicy(hflip=True, shift=0.1, rotate=10.0, scale=0.1, erase=0.5),
}


def _known_architecture(v: str) -> str:
    if v not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {v!r}; valid choices: {', '.join(sorted(ARCHITECTURES))}")
    return v


class ScreenSpec(BaseModel):
    """A cheap first net for the scoring graph: it scores every row, and only the rows it leaves in
    doubt (its top group probability below a threshold chosen on validation) go through the full net.

    Trained after the main net on the same split and recipe, from scratch, with its own architecture
    parameters and epochs (capped by the profile's ``max_epochs``); kept only when validation says the
    cascade loses nothing against the full net on every row, and when it costs less.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str = "fashion_cnn"
    arch_params: dict[str, float] = Field(default_factory=dict)
    epochs: int = Field(30, ge=1, le=1000)

    @field_validator("architecture")
    @classmethod
    def _check_arch(cls, v: str) -> str:
        return _known_architecture(v)


WeightsSource = str  # "imagenet" | "none" | "models/<experiment>/<model_version>" (optionally "lake://...")


class ExperimentSpec(BaseModel):
    """One experiment: architecture, weights, freezing, augmentation, sizes, optimiser and schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$")
    architecture: str
    arch_params: dict[str, float] = Field(default_factory=dict)
    description: str = ""
    weights: WeightsSource = "none"
    weights_fallback: Literal["none"] | None = None
    freeze: Literal["none", "backbone"] = "none"
    augmentation: AugmentPolicy = AugmentPolicy()
    target: Literal["labels", "groups"] = "labels"
    input_size: int = Field(224, ge=MIN_INPUT_SIZE, le=MAX_INPUT_SIZE)
    batch_size: int = Field(16, ge=1, le=4096)
    epochs: int = Field(15, ge=1, le=1000)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(5e-5, gt=0, le=10)
    weight_decay: float = Field(0.01, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["plateau", "cosine", "onecycle", "none"] = "plateau"
    plateau_patience: int = Field(3, ge=0)
    plateau_factor: float = Field(0.3, gt=0, lt=1)
    warmup_frac: float = Field(0.25, gt=0, lt=1, description="onecycle: fraction of steps warming up")
    early_stopping_patience: int = Field(3, ge=1)
    min_delta: float = Field(1e-4, ge=0)
    class_weighting: Literal["balanced", "none"] = "balanced"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    group_loss_weight: float = Field(0.0, ge=0, description="extra CE on summed group probabilities")
    tta: Literal["none", "hflip", "auto"] = "none"
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="> 0: validate, keep and score an exponential moving average of the weights "
        "(and of batch-norm statistics), updated after every step with this decay; 0: the weights as trained",
    )
    decision_rule: Literal["argmax", "recall_floors"] = Field(
        "argmax",
        description="'recall_floors': per-group weights on the scored probabilities, chosen on validation "
        "so every group's recall reaches the study's (the quality gate's floors); 'argmax': none",
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="training arithmetic: 'auto' = bfloat16 autocast where the hardware has it "
        "(AMX / AVX512-BF16 CPUs, bf16 GPUs), else fp32; weights and inference stay fp32",
    )
    screen: ScreenSpec | None = Field(
        None, description="a cheap first net; only the rows it leaves in doubt get the full net (ScreenSpec)"
    )
    profile: str | None = Field(None, description="set by resolve_spec: the profile applied")

    @field_validator("architecture")
    @classmethod
    def _check_arch(cls, v: str) -> str:
        return _known_architecture(v)

    @field_validator("augmentation", mode="before")
    @classmethod
    def _augment_preset(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in AUGMENT_PRESETS:
                raise ValueError(
                    f"unknown augmentation preset {v!r}; valid choices: {', '.join(AUGMENT_PRESETS)}"
                )
            return AUGMENT_PRESETS[v]
        return v

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, v: str) -> str:
        if v in ("imagenet", "none"):
            return v
        ref = v.removeprefix("lake://")
        parts = ref.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "models" and all(parts) and ".." not in parts:
            return v
        raise ValueError(
            f"weights must be 'imagenet', 'none' or a lake model 'models/<experiment>/<model_version>', got {v!r}"
        )

    @property
    def num_outputs(self) -> int:
        return 10 if self.target == "labels" else 5


# numbers a profile may override per experiment
NUMERIC_FIELDS = tuple(
    n for n, f in ExperimentSpec.model_fields.items() if f.annotation in (int, float) and n != "name"
)


class ProfileParams(BaseModel):
    """A profile: the same experiments, other numbers (and which experiments it trains)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    experiments: tuple[str, ...]
    max_input_size: int | None = Field(None, ge=MIN_INPUT_SIZE, le=MAX_INPUT_SIZE)
    max_epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    max_train_images: int | None = Field(None, ge=10)
    max_val_images: int | None = Field(None, ge=10)
    pretrained: bool = Field(True, description="False: 'imagenet' weights are replaced by 'none' (recorded)")
    overrides: dict[str, dict[str, float]] = Field(default_factory=dict)
    gates: dict[str, Any] = Field(
        default_factory=dict,
        description="quality gate settings this profile changes (zalando.gates.GateConfig fields); "
        "the rest keep GateConfig's defaults: every gate, the study's floors",
    )

    @field_validator("gates")
    @classmethod
    def _check_gates(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            GateConfig.from_mapping(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for exp, fields in v.items():
            bad = sorted(set(fields) - set(NUMERIC_FIELDS))
            if bad:
                raise ValueError(
                    f"profile override for {exp!r} names non-numeric or unknown fields {bad}; "
                    f"valid choices: {', '.join(NUMERIC_FIELDS)}"
                )
        return v


def resolve_spec(spec: ExperimentSpec, profile: ProfileParams) -> ExperimentSpec:
    """The spec as ``profile`` trains it: per-experiment overrides, then caps."""
    upd: dict[str, Any] = dict(profile.overrides.get(spec.name, {}))
    for k, v in list(upd.items()):
        if ExperimentSpec.model_fields[k].annotation is int:
            upd[k] = int(v)
    merged = spec.model_dump()
    merged.update(upd)
    if profile.max_input_size is not None:
        merged["input_size"] = min(merged["input_size"], profile.max_input_size)
    if profile.max_epochs is not None:
        merged["epochs"] = min(merged["epochs"], profile.max_epochs)
    if profile.batch_size is not None and "batch_size" not in upd:
        merged["batch_size"] = profile.batch_size
    merged["profile"] = profile.name
    try:
        return ExperimentSpec.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(
            f"profile {profile.name!r} makes experiment {spec.name!r} invalid: {_short(exc)}"
        ) from None


# ----------------------------------------------------------------------------- built-in catalogue

_PAPER = dict(
    input_size=224,
    batch_size=16,
    epochs=15,
    optimizer="adam",
    lr=5e-5,
    weight_decay=0.01,
    scheduler="plateau",
    plateau_patience=3,
    plateau_factor=0.3,
    early_stopping_patience=3,
    min_delta=1e-4,
    class_weighting="balanced",
    weights="imagenet",
)

# the custom CNNs: trained from scratch at 28x28, tuned for a 2-core CPU
_CNN = dict(
    input_size=28,
    batch_size=128,
    epochs=15,
    optimizer="adamw",
    lr=3e-3,
    weight_decay=5e-4,
    scheduler="onecycle",
    warmup_frac=0.2,
    early_stopping_patience=15,
    min_delta=1e-4,
    class_weighting="balanced",
    label_smoothing=0.05,
    weights="none",
    augmentation="light",
)


# the custom CNNs' recipe: bf16 where the CPU has it, shifts + flips + random erasing, and the
# operating point that meets the study's per-group recall on validation
_LONG = dict(
    precision="auto",
    augmentation=AugmentPolicy(hflip=True, shift=0.08, erase=0.5),
    decision_rule="recall_floors",
)


def _builtin_specs() -> list[ExperimentSpec]:
    return [
        ExperimentSpec(
            name="mobilenet_v2_frozen",
            architecture="mobilenet_v2",
            freeze="backbone",
            description="Study: MobileNetV2, ImageNet weights, backbone frozen, head trained",
            **_PAPER,
        ),
        ExperimentSpec(
            name="mobilenet_v2_frozen_aug",
            architecture="mobilenet_v2",
            freeze="backbone",
            augmentation="standard",
            description="Study: as mobilenet_v2_frozen, with image augmentation",
            **_PAPER,
        ),
        ExperimentSpec(
            name="mobilenet_v2_full",
            architecture="mobilenet_v2",
            description="Study: MobileNetV2, ImageNet weights, fully fine-tuned",
            **_PAPER,
        ),
        ExperimentSpec(
            name="squeezenet1_1_full",
            architecture="squeezenet1_1",
            description="Study: SqueezeNet 1.1, ImageNet weights, fully fine-tuned",
            **_PAPER,
        ),
        ExperimentSpec(
            name="resnet18_full",
            architecture="resnet18",
            weights_fallback="none",
            description="Study's future line: ResNet18 fully fine-tuned (falls back to random init offline)",
            **_PAPER,
        ),
        ExperimentSpec(
            name="fashion_cnn",
            architecture="fashion_cnn",
            arch_params=dict(c1=16, c2=48, c3=96, n1=1, n2=2, n3=2, pool_to=3, embed_dim=128),
            group_loss_weight=1.0,
            tta="auto",
            description="Custom CNN for 28x28x1 (~12 MMAC): 10 labels summed into groups, group-aware loss, "
            "60 epochs with random erasing, operating point chosen on validation; a ~1 MMAC screen net "
            "passes on only the rows it leaves in doubt",
            # the screen: one conv per stage (8/24/48). On validation (AMD EPYC, 2026-12-02) it passed
            # 8.5% of rows on at the full graph's accuracy and scored 10,000 images (int8, with those
            # rows' second pass) in 0.149 s; two convs per stage passed 18.4% in 0.215 s
            screen=ScreenSpec(
                arch_params=dict(c1=8, c2=24, c3=48, n1=1, n2=1, n3=1, pool_to=3, embed_dim=64), epochs=30
            ),
            **{**_CNN, **_LONG, "epochs": 60, "early_stopping_patience": 60},
        ),
        ExperimentSpec(
            name="fashion_cnn_small",
            architecture="fashion_cnn",
            arch_params=dict(c1=16, c2=32, c3=64, n1=1, n2=2, n3=2, pool_to=3, embed_dim=128),
            group_loss_weight=1.0,
            tta="auto",
            description="Custom CNN, half the cost (~6 MMAC); flip TTA when validation prefers it",
            **{**_CNN, **_LONG, "epochs": 30, "early_stopping_patience": 30},
        ),
    ]


def _builtin_profiles() -> list[ProfileParams]:
    study = ("mobilenet_v2_frozen", "mobilenet_v2_frozen_aug", "mobilenet_v2_full", "squeezenet1_1_full")
    all_names = tuple(s.name for s in _builtin_specs())
    return [
        ProfileParams(
            name="paper",
            description="The study's set-up for a GPU: 224x224, ImageNet weights, paper hyper-parameters",
            experiments=(*study, "resnet18_full", "fashion_cnn", "fashion_cnn_small"),
        ),
        ProfileParams(
            name="cpu",
            # fashion_cnn's 60 epochs take about 23 of the 25 minutes; fashion_cnn_small (about 6 more)
            # is one `zalando train --experiment fashion_cnn_small` or an `add_experiments` away
            description="Nightly default on 2 CPU cores (<= 25 min): from scratch, small inputs",
            experiments=("fashion_cnn",),
            max_input_size=32,
            pretrained=False,
            overrides={
                # torchvision nets from scratch at 32x32 need a larger learning rate and batch
                n: {"lr": 1e-3, "batch_size": 128, "weight_decay": 1e-4, "epochs": 10}
                for n in (*study, "resnet18_full")
            },
        ),
        ProfileParams(
            name="quick",
            description="Tests and demos: a few hundred images, one epoch, tiny inputs",
            experiments=all_names,
            max_input_size=32,
            max_epochs=1,
            batch_size=64,
            max_train_images=256,
            max_val_images=128,
            pretrained=False,
            # one epoch on a few hundred images never reaches the study's floors, and timings on a busy
            # machine are noise: a quick model only has to beat the champion (on F1 and the same data)
            gates={
                "floors": {},
                "canary_floor": None,
                "max_canary_drop": None,
                "max_latency_ms_per_1000": None,
                "max_size_mb": None,
            },
        ),
    ]


# ----------------------------------------------------------------------------- catalogue with extras


@dataclass
class Catalog:
    """Built-in experiments and profiles, plus any from an experiments file."""

    experiments: dict[str, ExperimentSpec] = field(default_factory=dict)
    profiles: dict[str, ProfileParams] = field(default_factory=dict)
    source: str = "built-in"

    def experiment(self, name: str) -> ExperimentSpec:
        try:
            return self.experiments[name]
        except KeyError:
            raise ConfigError(
                f"unknown experiment {name!r}; valid choices: {', '.join(sorted(self.experiments))}"
            ) from None

    def profile(self, name: str) -> ProfileParams:
        try:
            return self.profiles[name]
        except KeyError:
            raise ConfigError(
                f"unknown profile {name!r}; valid choices: {', '.join(self.profiles)}"
            ) from None

    def resolved(self, experiment: str, profile: str) -> ExperimentSpec:
        """``experiment`` as ``profile`` trains it."""
        return resolve_spec(self.experiment(experiment), self.profile(profile))

    def experiments_for(self, profile: str) -> list[ExperimentSpec]:
        """Every experiment ``profile`` trains, resolved."""
        prof = self.profile(profile)
        return [resolve_spec(self.experiment(n), prof) for n in prof.experiments]


def _short(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "spec"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"experiments file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the same user problem
        raise ConfigError(f"experiments file {path} cannot be parsed: {exc}".splitlines()[0]) from None
    if data is None:
        data = {}
    if isinstance(data, list):
        data = {"experiments": data}
    if not isinstance(data, dict) or set(data) - {"experiments", "profiles"}:
        raise ConfigError(
            f"experiments file {path} must be a list of experiments or a mapping with keys "
            f"'experiments' and/or 'profiles'"
        )
    return data


def load_catalog(experiments_file: Path | str | None = None) -> Catalog:
    """Built-in catalogue, extended by ``experiments_file`` (YAML or JSON).

    File format::

        experiments:
          - name: my_cnn
            extends: fashion_cnn      # optional: start from another experiment
            lr: 0.001
        profiles:
          cpu:
            add_experiments: [my_cnn] # train it nightly too
            max_epochs: 12            # any numeric profile field
            gates:                    # GateConfig fields, each replacing the profile's own
              min_f1_margin: 0.0
    """
    cat = Catalog(
        experiments={s.name: s for s in _builtin_specs()},
        profiles={p.name: p for p in _builtin_profiles()},
    )
    if experiments_file is None:
        return cat
    path = Path(experiments_file)
    data = _read_file(path)
    cat.source = f"built-in + {path}"
    for i, raw in enumerate(data.get("experiments") or []):
        if not isinstance(raw, dict) or "name" not in raw:
            raise ConfigError(f"experiments file {path}: entry {i} must be a mapping with a 'name'")
        raw = dict(raw)
        base_name = raw.pop("extends", None)
        base = cat.experiment(base_name).model_dump(exclude={"name"}) if base_name else {}
        try:
            spec = ExperimentSpec.model_validate({**base, **raw})
        except ValidationError as exc:
            raise ConfigError(f"experiments file {path}: experiment {raw['name']!r}: {_short(exc)}") from None
        cat.experiments[spec.name] = spec
    for pname, raw in (data.get("profiles") or {}).items():
        if not isinstance(raw, dict):
            raise ConfigError(f"experiments file {path}: profile {pname!r} must be a mapping")
        raw = dict(raw)
        add = list(raw.pop("add_experiments", []) or [])
        base = (
            cat.profiles[pname].model_dump() if pname in cat.profiles else {"name": pname, "experiments": ()}
        )
        gates = raw.get("gates")
        if gates is None or isinstance(gates, dict):  # gate settings change the profile's one by one
            raw["gates"] = {**base.get("gates", {}), **(gates or {})}
        merged = {**base, **raw, "name": pname}
        merged["experiments"] = tuple(dict.fromkeys([*merged["experiments"], *add]))
        try:
            prof = ProfileParams.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(f"experiments file {path}: profile {pname!r}: {_short(exc)}") from None
        cat.profiles[pname] = prof
    for prof in cat.profiles.values():
        for n in prof.experiments:
            cat.experiment(n)  # every profile names known experiments
    return cat


def get_experiment(name: str, experiments_file: Path | str | None = None) -> ExperimentSpec:
    """The (unresolved) spec called ``name``; ConfigError listing valid names otherwise."""
    return load_catalog(experiments_file).experiment(name)


def get_profile(name: str, experiments_file: Path | str | None = None) -> ProfileParams:
    return load_catalog(experiments_file).profile(name)


def list_experiments(experiments_file: Path | str | None = None) -> list[str]:
    return sorted(load_catalog(experiments_file).experiments)
