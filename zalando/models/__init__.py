"""Model library: architecture registry, experiment specs and profiles, weights, bundles, predictors.

Importing this package is cheap: torch is imported, but nothing is built or read.
"""

from zalando.models.architectures import ARCHITECTURES, build_model, count_macs, count_parameters
from zalando.models.bundle import (
    ModelBundle,
    ScoringModel,
    build_bundle,
    export_onnx,
    load_bundle,
    load_int8_onnx_bytes,
    load_onnx_bytes,
    new_model_version,
    save_bundle,
)
from zalando.models.experiments import (
    Catalog,
    ExperimentSpec,
    ProfileParams,
    get_experiment,
    get_profile,
    list_experiments,
    load_catalog,
    resolve_spec,
)
from zalando.models.predictor import make_predictor

__all__ = [
    "ARCHITECTURES",
    "Catalog",
    "ExperimentSpec",
    "ModelBundle",
    "ProfileParams",
    "ScoringModel",
    "build_bundle",
    "build_model",
    "count_macs",
    "count_parameters",
    "export_onnx",
    "get_experiment",
    "get_profile",
    "list_experiments",
    "load_bundle",
    "load_catalog",
    "load_int8_onnx_bytes",
    "load_onnx_bytes",
    "make_predictor",
    "new_model_version",
    "resolve_spec",
    "save_bundle",
]
