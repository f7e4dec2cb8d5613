"""Training steps: plan the run's experiments, train one, evaluate one.

:func:`plan_experiments` resolves every experiment for the profile once per run (one read of the
experiments file); :func:`train_model` trains exactly that resolved spec, and the spec's digest
(the train task's cache key) comes from the same object. :func:`evaluate_model` measures a trained
model and commits its metric tables; :mod:`zalando.steps.promotion` gates the results.

The metrics are five Iceberg tables (``metrics_per_group``, ``metrics_confusion``,
``metrics_summary``, ``metrics_performance``, ``metrics_energy``): an evaluation replaces the rows
of its (run_id, experiment) in each. A model's test-split probabilities stay a plain Parquet object
(:func:`zalando.lake.keys.eval_key`): only the run's report reads them, whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, computed_field

from zalando.lake import Lake
from zalando.models.experiments import ExperimentSpec, ProfileParams

if TYPE_CHECKING:
    from zalando.settings import Settings

log = logging.getLogger(__name__)

METRIC_TABLES = ("per_group", "confusion", "summary", "performance", "energy")
TIMING_BATCH = 128


def metric_table(name: str) -> str:
    """The Iceberg table of one metric table: ``per_group`` -> ``metrics_per_group``."""
    return f"metrics_{name}"


def metric_keys(run_id: str, experiment: str) -> dict[str, str]:
    """The (run_id, experiment) filter of one model's metric rows; both must be plain names."""
    from zalando.errors import DataError

    for name, value in (("run_id", run_id), ("experiment", experiment)):
        if not value or "/" in value or "=" in value:
            raise DataError(f"{name}: {value!r} cannot be a metrics key (empty, or holds '/' or '=')")
    return {"run_id": run_id, "experiment": experiment}


def commit_metric_tables(lake: Lake, run_id: str, experiment: str, tables: Mapping[str, pa.Table]) -> None:
    """Replace one model's rows in each metric table (an empty table deletes them)."""
    from zalando.lake.commit import replace_partition

    flt = metric_keys(run_id, experiment)
    for name, rows in tables.items():
        replace_partition(
            lake.catalog(), metric_table(name), rows, flt, properties={"zalando.run-id": run_id}
        )


def read_metric_tables(
    lake: Lake,
    run_id: str | None = None,
    experiments: list[str] | None = None,
    names: tuple[str, ...] = METRIC_TABLES,
) -> dict[str, pd.DataFrame]:
    """The committed rows of each metric table, of one run (and some experiments) or of all."""
    from zalando.lake.commit import scan

    out = {}
    for name in names:
        df = scan(lake.catalog(), metric_table(name), {"run_id": run_id} if run_id else None).to_pandas()
        if experiments is not None:
            df = df[df["experiment"].isin(experiments)].reset_index(drop=True)
        out[name] = df
    return out


def metrics_location(lake: Lake, run_id: str, experiment: str) -> str:
    """Where one model's metric rows are, for people: the tables' location and the filter."""
    names = ",".join(METRIC_TABLES)
    cat = lake.catalog()
    return f"{lake.uri(cat.namespace)}/metrics_{{{names}}} (run_id={run_id}, experiment={experiment})"


# ---------------------------------------------------------------------------------------------- results


class PlannedExperiment(BaseModel):
    """One experiment of a run, resolved for the profile: what is trained and what the cache keys on."""

    model_config = ConfigDict(frozen=True)

    experiment: str
    spec: ExperimentSpec  # resolved for ``profile`` (overrides and caps applied)
    profile: ProfileParams  # its image limits and pretrained flag reach the training engine too

    @computed_field  # type: ignore[prop-decorator]
    @property
    def spec_digest(self) -> str:
        """A fingerprint of the resolved spec (the train task's cache key and checkpoint folder)."""
        return hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest()[:16]


class TrainedModel(BaseModel):
    """A trained, calibrated model whose bundle and drift reference are in the lake."""

    experiment: str
    model_version: str
    bundle_key: str
    dataset_version: str
    temperature: float
    train_energy: dict[str, Any] | None  # a row of the energy table, or None when not measured
    wall_s: float
    epochs_run: int
    best_val_loss: float
    trained_on: str | None = None  # the Dask worker's address, or "local"; set by the train task


class GroupMetrics(BaseModel):
    """One group's numbers on the test split (a row of the per-group artifact)."""

    group_name: str
    recall: float | None
    precision: float | None
    npv: float | None
    f1: float | None
    support: int


class Evaluation(BaseModel):
    """Every number of one model: references to its committed tables, the gates' input, display rows."""

    experiment: str
    model_version: str
    dataset_version: str
    run_id: str
    registered: bool  # False: the champion measured on other data, nothing committed
    metrics_uri: str | None  # where its metric rows are (the tables and the filter), when registered
    eval_key: str | None
    gate_metrics: dict[str, Any]  # what zalando.monitor.evaluate_gates reads (validation split)
    per_group_test: list[GroupMetrics]
    summary_test: dict[str, Any]  # the summary table's test row (accuracy, macro_f1, ...)
    performance: list[dict[str, float | int | str]]  # one row per runtime


# ---------------------------------------------------------------------------------------------- plan


def plan_experiments(settings: Settings, experiments: list[str] | None = None) -> list[PlannedExperiment]:
    """The experiments to train, each resolved for the profile (the experiments file is read here, once).

    ``experiments`` picks a subset (any known experiment, in or out of the profile); unknown names
    fail with the list of valid ones. Repeated names are planned once.
    """
    from zalando.models.experiments import load_catalog

    catalog = load_catalog(settings.experiments_file)
    profile = catalog.profile(settings.profile)
    names = list(experiments) if experiments else list(profile.experiments)
    return [
        PlannedExperiment(experiment=name, spec=catalog.resolved(name, profile.name), profile=profile)
        for name in dict.fromkeys(names)
    ]


# ---------------------------------------------------------------------------------------------- train


def checkpoint_dir_for(settings: Settings, planned: PlannedExperiment, dataset_version: str) -> Path:
    """The epoch checkpoints of one spec, dataset version and seed (a retry resumes from them)."""
    name = f"{dataset_version}-{planned.spec_digest}-{settings.seed}"
    return settings.work_dir / "checkpoints" / planned.experiment / name


def train_model(
    lake: Lake, settings: Settings, planned: PlannedExperiment, dataset_version: str, run_id: str
) -> TrainedModel:
    """Train the planned spec on a dataset version, calibrate it, save its bundle and drift reference.

    The bundle gets its int8 graph and the verdicts of its reduced-precision runtimes on validation
    (:mod:`zalando.admission`): what the champion loader may score with.

    A killed run resumes from its last epoch checkpoint in the work folder (the training engine
    checks the checkpoint matches the spec, seed and data); the checkpoints go once the bundle is in.
    """
    from zalando.admission import RuntimeCheckData
    from zalando.energy import measure_energy
    from zalando.models.bundle import build_bundle, save_bundle
    from zalando.steps.feedback import load_training_arrays  # issue 15: feedback labels
    from zalando.train import train_experiment

    checkpoint_dir = checkpoint_dir_for(settings, planned, dataset_version)
    data = load_training_arrays(lake, dataset_version)  # issue 15: feedback labels (any dataset version)
    mean, std = float(data["mean"]), float(data["std"])
    with measure_energy("train", settings.country_iso_code) as meter:
        result = train_experiment(
            planned.spec,
            planned.profile,
            data,
            mean,
            std,
            seed=settings.seed,
            threads=settings.torch_threads,
            checkpoint_dir=checkpoint_dir,
            lake=lake,
            device=settings.device,
        )
        meter.images = result.n_train * max(result.epochs_run, 1)
    energy = meter.reading.as_row() if meter.reading else None

    # temperature scaling and the operating point were fitted on the validation split (never the test split)
    temperature = result.temperature
    bundle = build_bundle(
        result,
        mean=mean,
        std=std,
        dataset_version=dataset_version,
        temperature=temperature,
        extra_card={"energy_train": energy, "run_id": run_id},
    )
    # model.int8.onnx (calibrated on training images) and every runtime's verdict on validation
    checks = RuntimeCheckData.from_training(data, seed=settings.seed)
    key = save_bundle(lake, bundle, run_id=run_id, runtime_checks=checks)
    shutil.rmtree(
        checkpoint_dir, ignore_errors=True
    )  # the bundle is committed: the checkpoints are done with
    _save_drift_reference(lake, settings, bundle, data, run_id)
    log.info("trained %s -> %s (T=%.3f)", planned.experiment, lake.uri(key), temperature)
    return TrainedModel(
        experiment=planned.experiment,
        model_version=bundle.model_version,
        bundle_key=key,
        dataset_version=dataset_version,
        temperature=temperature,
        train_energy=energy,
        wall_s=round(result.wall_s, 2),
        epochs_run=result.epochs_run,
        best_val_loss=result.best_val_loss,
    )


def _save_drift_reference(
    lake: Lake, settings: Settings, bundle: Any, data: Mapping[str, Any], run_id: str
) -> None:
    """The label-free drift reference of a new model (what a clean batch looks like)."""
    from zalando.drift import reference_profile
    from zalando.labels import NUM_GROUPS, group_of
    from zalando.models.predictor import make_predictor
    from zalando.registry import save_reference

    predictor = make_predictor(bundle, runtime="torch", threads=settings.torch_threads)
    val_probs, val_emb = predictor.predict(data["x_val"])
    prior = np.bincount(group_of(data["y_train"]), minlength=NUM_GROUPS) / max(len(data["y_train"]), 1)
    reference = reference_profile(data["x_train"], val_probs, val_emb, prior, seed=settings.seed)
    save_reference(lake, bundle.model_version, reference, run_id=run_id)


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate_model(
    lake: Lake,
    settings: Settings,
    experiment: str,
    model_version: str,
    run_id: str,
    *,
    train_energy: Mapping[str, Any] | None = None,
    dataset_version: str | None = None,
    register: bool = True,
) -> Evaluation:
    """Every number of one model: per-group metrics (val and test), confusion, performance per runtime,
    energy, canary accuracy; committed to ``metrics/run_id=…/experiment=…`` and (``register``) the registry.

    ``dataset_version`` evaluates on other data than the model's own (the champion on tonight's data).
    """
    from zalando.data.feedback_data import feedback_holdout_metrics  # issue 15: feedback labels
    from zalando.energy import measure_energy
    from zalando.gates import gate_metrics
    from zalando.lake.keys import eval_key
    from zalando.models.bundle import load_bundle, load_onnx_bytes
    from zalando.models.predictor import make_predictor
    from zalando.steps.feedback import load_training_arrays  # issue 15: feedback labels

    bundle = load_bundle(lake, experiment, model_version)
    onnx = load_onnx_bytes(lake, experiment, model_version)
    dv = dataset_version or bundle.dataset_version
    data = load_training_arrays(lake, dv)  # issue 15: feedback labels (any dataset version)
    onnx_pred = make_predictor(bundle, onnx, "onnx", threads=settings.torch_threads)
    x_test = data["x_test"]
    val_probs, _ = onnx_pred.predict(data["x_val"])
    with measure_energy("score-test-onnx", settings.country_iso_code, images=len(x_test)) as meter:
        test_probs, _ = onnx_pred.predict(x_test)
    performance = _performance(bundle, onnx, onnx_pred, x_test, settings.torch_threads)
    energy = [dict(train_energy)] if train_energy else []
    if meter.reading is not None:
        energy.append(meter.reading.as_row())

    canary = _canary_accuracy(lake, onnx_pred, data, run_id)
    frames = _metric_frames(
        run_id, experiment, model_version, data, val_probs, test_probs, performance, energy
    )
    gm = gate_metrics(
        frames["per_group"],
        frames["summary"],
        frames["performance"],
        model_version=model_version,
        dataset_version=dv,
        canary_accuracy=canary,
        split="val",
        **feedback_holdout_metrics(onnx_pred.predict, data),  # issue 15: feedback labels (the feedback gate)
    )
    if register:
        probs = _probs_table(data["ids_test"], np.asarray(data["y_test"]), test_probs)
        extra = {"model_version": model_version, "dataset_version": dv, "canary_accuracy": canary}
        _commit_evaluation(lake, bundle, run_id, experiment, frames, probs, gm, extra)
    per_group_test = frames["per_group"][frames["per_group"]["split"] == "test"]
    summary_test = frames["summary"][frames["summary"]["split"] == "test"]
    return Evaluation(
        experiment=experiment,
        model_version=model_version,
        dataset_version=dv,
        run_id=run_id,
        registered=register,
        metrics_uri=metrics_location(lake, run_id, experiment) if register else None,
        eval_key=eval_key(run_id, experiment) if register else None,
        gate_metrics=json.loads(json.dumps(gm, default=_jsonable)),
        per_group_test=json.loads(
            per_group_test[["group_name", "recall", "precision", "npv", "f1", "support"]].to_json(
                orient="records"
            )
        ),
        summary_test=json.loads(
            summary_test.drop(columns=["created_at"], errors="ignore").to_json(orient="records")
        )[0],
        performance=[{k: v for k, v in p.items() if isinstance(v, int | float | str)} for p in performance],
    )


def _performance(
    bundle: Any, onnx: bytes, onnx_pred: Any, x_test: np.ndarray, threads: int | None
) -> list[dict[str, Any]]:
    """Parameters, file sizes and scoring speed per runtime (torch, ONNX and, where native, torch bf16)."""
    from zalando.evaluate import count_parameters, model_size_mb, time_scoring, torch_model_bytes
    from zalando.models.hardware import native_bf16
    from zalando.models.predictor import make_predictor

    params = sum(count_parameters(net) for net in bundle.nets())  # a screen net's too
    sizes = {
        "size_mb_torch": sum(model_size_mb(torch_model_bytes(net)) for net in bundle.nets()),
        "size_mb_onnx": model_size_mb(onnx),
    }
    runtimes = [("torch", make_predictor(bundle, None, "torch", threads=threads)), ("onnx", onnx_pred)]
    if native_bf16("cpu"):  # what the champion loader may also score with here
        runtimes.append(("torch-bf16", make_predictor(bundle, None, "torch-bf16", threads=threads)))
    performance = []
    for runtime, pred in runtimes:
        timing = time_scoring(pred.predict, x_test, batch_size=TIMING_BATCH, parallelism=pred.parallelism)
        performance.append({"runtime": runtime, "params": params, **sizes, **timing})
    return performance


def _metric_frames(
    run_id: str,
    experiment: str,
    model_version: str,
    data: Mapping[str, Any],
    val_probs: np.ndarray,
    test_probs: np.ndarray,
    performance: list[dict[str, Any]],
    energy: list[dict[str, Any]],
) -> dict[str, pd.DataFrame]:
    """The metric tables of one model, validation and test rows together (a ``split`` column)."""
    from zalando.evaluate import metric_tables, predicted_groups
    from zalando.labels import group_of

    y_val, y_test = np.asarray(data["y_val"]), np.asarray(data["y_test"])
    val_frames = metric_tables(
        run_id, experiment, model_version, group_of(y_val), predicted_groups(val_probs), split="val"
    )
    test_frames = metric_tables(
        run_id,
        experiment,
        model_version,
        group_of(y_test),
        predicted_groups(test_probs),
        performance=performance,
        energy=energy,
        split="test",
    )
    frames = {}
    for name in METRIC_TABLES:
        parts = [f for f in (val_frames[name], test_frames[name]) if not f.empty]
        frames[name] = pd.concat(parts, ignore_index=True) if parts else test_frames[name]
    return frames


def _commit_evaluation(
    lake: Lake,
    bundle: Any,
    run_id: str,
    experiment: str,
    frames: Mapping[str, pd.DataFrame],
    test_probs: pa.Table,
    gm: Mapping[str, Any],
    extra: Mapping[str, Any],
) -> None:
    """Commit the metric tables and the test probabilities; register the model with its gate metrics
    (the registration is the commit point: the report reads only registered evaluations).

    ``extra`` (model_version, dataset_version, canary_accuracy) goes in the probabilities' manifest.
    """
    from zalando.evaluate import metric_arrow_tables
    from zalando.lake.keys import eval_key
    from zalando.registry import register_model

    extra = dict(extra)
    commit_metric_tables(lake, run_id, experiment, metric_arrow_tables(frames))
    lake.commit_partition(eval_key(run_id, experiment), {"test_probs": test_probs}, run_id, extra=extra)
    register_model(
        lake,
        model_version=extra["model_version"],
        experiment=experiment,
        metrics=gm,
        spec=bundle.spec.model_dump(mode="json"),
        dataset_version=extra["dataset_version"],
        code_version=bundle.code_version or bundle.card.get("code_version", ""),
        bundle_key=bundle.key,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pd.DataFrame):
        return value.to_dict("records")
    return str(value)


def _probs_table(ids: Any, labels: np.ndarray, probs: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array([str(i) for i in ids], pa.string()),
            "label": pa.array(labels.astype(np.int8)),
            "group_probs": pa.FixedSizeListArray.from_arrays(
                pa.array(probs.astype(np.float32).ravel()), probs.shape[1]
            ),
        }
    )


def _canary_accuracy(lake: Lake, predictor: Any, data: Mapping[str, Any], run_id: str) -> float:
    """Accuracy on the fixed canary set (hard One piece / Upper part look-alikes), chosen once."""
    from zalando.data.arrays import images_from_table
    from zalando.gates import canary_accuracy, select_canary_set
    from zalando.labels import group_of
    from zalando.registry import has_canary_set, load_canary_set, save_canary_set

    if not has_canary_set(lake):
        table = select_canary_set(data["x_val"], data["y_val"], None, image_ids=data["ids_val"])
        save_canary_set(lake, table, run_id=run_id)
    canary = load_canary_set(lake)
    if canary.num_rows == 0:
        return float("nan")
    probs, _ = predictor.predict(images_from_table(canary))
    return float(canary_accuracy(probs, group_of(canary.column("label").to_numpy())))
