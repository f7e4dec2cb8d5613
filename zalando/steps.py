"""The pipeline's steps on the lake: train, evaluate, decide, promote, report.

Each step reads references from the lake, calls the library (training engine, evaluation,
gates, registry, report), writes its outputs to the lake and returns a small JSON-able dict. The
Prefect tasks in ``tasks/`` call exactly one step each (retries and caching live there); the CLI
and tests can call them with no orchestrator. Nothing here imports Prefect.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from zalando.errors import DataError
from zalando.lake import Lake

log = logging.getLogger(__name__)

METRIC_TABLES = ("per_group", "confusion", "summary", "performance", "energy")
TIMING_BATCH = 128


def eval_key(run_id: str, experiment: str) -> str:
    """Where a run keeps one model's test-split probabilities (for PR curves and the report)."""
    return f"reports/run_id={run_id}/eval/experiment={experiment}"


def report_key(run_id: str) -> str:
    return f"reports/run_id={run_id}"


# ---------------------------------------------------------------------------------------------- train


def train_model(
    lake: Lake,
    settings: Any,
    experiment: str,
    dataset_version: str,
    run_id: str,
    *,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """Train one experiment on a dataset version, calibrate it, save its bundle and drift reference.

    Returns ``{experiment, model_version, bundle_key, dataset_version, temperature, train_energy,
    wall_s, epochs_run, best_val_loss}``. With ``checkpoint_dir`` a killed run resumes from its last
    epoch (the training engine checks the checkpoint matches the spec, seed and data).
    """
    from zalando.data.split import load_dataset_arrays
    from zalando.drift import reference_profile
    from zalando.energy import measure_energy
    from zalando.labels import NUM_GROUPS, group_of
    from zalando.models.bundle import build_bundle, save_bundle
    from zalando.models.experiments import load_catalog
    from zalando.models.predictor import make_predictor
    from zalando.registry import save_reference
    from zalando.train import train_experiment

    catalog = load_catalog(settings.experiments_file)
    profile = catalog.profile(settings.profile)
    spec = catalog.resolved(experiment, profile.name)
    data = load_dataset_arrays(lake, dataset_version)
    mean, std = float(data["mean"]), float(data["std"])
    with measure_energy("train", settings.country_iso_code) as meter:
        result = train_experiment(
            spec,
            profile,
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
    key = save_bundle(lake, bundle, run_id=run_id)
    if checkpoint_dir is not None:  # the bundle is committed: the epoch checkpoints are done with
        shutil.rmtree(checkpoint_dir, ignore_errors=True)

    # the label-free drift reference of this model (what a clean batch looks like)
    predictor = make_predictor(bundle, runtime="torch", threads=settings.torch_threads)
    val_probs, val_emb = predictor.predict(data["x_val"])
    prior = np.bincount(group_of(data["y_train"]), minlength=NUM_GROUPS) / max(len(data["y_train"]), 1)
    reference = reference_profile(data["x_train"], val_probs, val_emb, prior, seed=settings.seed)
    save_reference(lake, bundle.model_version, reference, run_id=run_id)
    log.info("trained %s -> %s (T=%.3f)", experiment, lake.uri(key), temperature)
    return {
        "experiment": experiment,
        "model_version": bundle.model_version,
        "bundle_key": key,
        "dataset_version": dataset_version,
        "temperature": temperature,
        "train_energy": energy,
        "wall_s": round(result.wall_s, 2),
        "epochs_run": result.epochs_run,
        "best_val_loss": result.best_val_loss,
    }


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate_model(
    lake: Lake,
    settings: Any,
    experiment: str,
    model_version: str,
    run_id: str,
    *,
    train_energy: Mapping[str, Any] | None = None,
    dataset_version: str | None = None,
    register: bool = True,
) -> dict[str, Any]:
    """Every number of one model: per-group metrics (val and test), confusion, performance per runtime,
    energy, canary accuracy; committed to ``metrics/run_id=…/experiment=…`` and (``register``) the registry.

    ``dataset_version`` evaluates on other data than the model's own (the champion on tonight's data).
    Returns small references plus the gate metrics and the test per-group rows for artifacts.
    """
    from zalando.data.split import load_dataset_arrays
    from zalando.energy import measure_energy
    from zalando.evaluate import (
        count_parameters,
        metric_arrow_tables,
        metric_tables,
        metrics_partition_key,
        model_size_mb,
        predicted_groups,
        time_scoring,
        torch_model_bytes,
    )
    from zalando.gates import gate_metrics
    from zalando.labels import group_of
    from zalando.models.bundle import load_bundle, load_onnx_bytes
    from zalando.models.hardware import native_bf16
    from zalando.models.predictor import make_predictor
    from zalando.registry import register_model

    bundle = load_bundle(lake, experiment, model_version)
    onnx = load_onnx_bytes(lake, experiment, model_version)
    dv = dataset_version or bundle.dataset_version
    data = load_dataset_arrays(lake, dv)
    threads = settings.torch_threads
    onnx_pred = make_predictor(bundle, onnx, "onnx", threads=threads)
    torch_pred = make_predictor(bundle, None, "torch", threads=threads)
    x_val, x_test = data["x_val"], data["x_test"]
    y_val, y_test = np.asarray(data["y_val"]), np.asarray(data["y_test"])

    val_probs, _ = onnx_pred.predict(x_val)
    with measure_energy("score-test-onnx", settings.country_iso_code, images=len(x_test)) as meter:
        test_probs, _ = onnx_pred.predict(x_test)

    params = count_parameters(bundle.model)
    sizes = {
        "size_mb_torch": model_size_mb(torch_model_bytes(bundle.model)),
        "size_mb_onnx": model_size_mb(onnx),
    }
    performance = []
    runtimes = [("torch", torch_pred), ("onnx", onnx_pred)]
    if native_bf16("cpu"):  # what the champion loader may also score with here
        runtimes.append(("torch-bf16", make_predictor(bundle, None, "torch-bf16", threads=threads)))
    for runtime, pred in runtimes:
        timing = time_scoring(pred.predict, x_test, batch_size=TIMING_BATCH, parallelism=pred.parallelism)
        performance.append({"runtime": runtime, "params": params, **sizes, **timing})
    energy = [dict(train_energy)] if train_energy else []
    if meter.reading is not None:
        energy.append(meter.reading.as_row())

    canary = _canary_accuracy(lake, onnx_pred, data, val_probs, run_id)
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
    gm = gate_metrics(
        frames["per_group"],
        frames["summary"],
        frames["performance"],
        model_version=model_version,
        dataset_version=dv,
        canary_accuracy=canary,
        split="val",
    )
    metrics_key = metrics_partition_key(run_id, experiment)
    extra = {"model_version": model_version, "dataset_version": dv, "canary_accuracy": canary}
    if register:
        lake.commit_partition(metrics_key, metric_arrow_tables(frames), run_id, extra=extra)
        lake.commit_partition(
            eval_key(run_id, experiment),
            {"test_probs": _probs_table(data["ids_test"], y_test, test_probs)},
            run_id,
            extra=extra,
        )
        register_model(
            lake,
            model_version=model_version,
            experiment=experiment,
            metrics=gm,
            spec=bundle.spec.model_dump(mode="json"),
            dataset_version=dv,
            code_version=bundle.code_version or bundle.card.get("code_version", ""),
            bundle_key=bundle.key,
        )
    per_group_test = frames["per_group"][frames["per_group"]["split"] == "test"]
    summary_test = frames["summary"][frames["summary"]["split"] == "test"]
    return {
        "experiment": experiment,
        "model_version": model_version,
        "dataset_version": dv,
        "metrics_key": metrics_key if register else None,
        "metrics_uri": lake.uri(metrics_key) if register else None,
        "eval_key": eval_key(run_id, experiment) if register else None,
        "gate_metrics": json.loads(json.dumps(gm, default=_jsonable)),
        "per_group_test": json.loads(
            per_group_test[["group_name", "recall", "precision", "npv", "f1", "support"]].to_json(
                orient="records"
            )
        ),
        "summary_test": json.loads(
            summary_test.drop(columns=["created_at"], errors="ignore").to_json(orient="records")
        )[0],
        "performance": [
            {k: v for k, v in p.items() if isinstance(v, int | float | str)} for p in performance
        ],
    }


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


def _read_probs(lake: Lake, key: str) -> tuple[np.ndarray, np.ndarray]:
    t = lake.read_partition(key)
    probs = np.asarray(t.column("group_probs").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    return t.column("label").to_numpy().astype(np.int64), probs.reshape(t.num_rows, -1)


def _canary_accuracy(
    lake: Lake, predictor: Any, data: Mapping[str, Any], val_probs: np.ndarray, run_id: str
) -> float:
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


# ---------------------------------------------------------------------------------------------- decide / promote


def decide_promotion(
    lake: Lake,
    settings: Any,
    candidates: Sequence[Mapping[str, Any]],
    run_id: str,
    *,
    gates: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Gate every candidate against the champion; the best one that passes (validation macro F1) wins.

    The champion's numbers come from the same validation data: when it was registered on another
    dataset version it is evaluated again on this one (not re-registered). Models with a decision
    in the registry's log already (a cached training run) are left out. Nothing is written here:
    :func:`apply_promotion` records the decisions, after an optional human approval.
    """
    from zalando.gates import evaluate_gates, gate_config
    from zalando.models.experiments import load_catalog
    from zalando.registry import decision_log, get_champion, get_model

    if not candidates:
        raise DataError("promotion: no trained model to decide on")
    config = gate_config(load_catalog(settings.experiments_file).profile(settings.profile), gates)
    champion = get_champion(lake)
    champ_version = champion["model_version"] if champion else None
    dv = candidates[0]["dataset_version"]
    champ_metrics = None
    if champion:
        record = get_model(lake, champ_version)
        if record.get("dataset_version") == dv:
            champ_metrics = record["metrics"]
        else:
            champ_metrics = evaluate_model(
                lake,
                settings,
                record["experiment"],
                champ_version,
                run_id,
                dataset_version=dv,
                register=False,
            )["gate_metrics"]
    # a cached training run gives back models decided on an earlier night: they are not gated again
    decided = set(decision_log(lake)["model_version"]) | {champ_version}
    decisions = []
    for cand in candidates:
        if cand["model_version"] in decided:
            continue
        d = evaluate_gates(cand["gate_metrics"], champ_metrics, config)
        decisions.append(
            {
                "experiment": cand["experiment"],
                "model_version": cand["model_version"],
                "macro_f1": cand["gate_metrics"].get("macro_f1"),
                "promote": d.promote,
                "decision": d.model_dump(mode="json"),
                "markdown": d.to_markdown(),
            }
        )
    passing = [d for d in decisions if d["promote"]]
    winner = max(passing, key=lambda d: d["macro_f1"] or 0.0) if passing else None
    return {
        "champion_before": champ_version,
        "winner": winner["model_version"] if winner else None,
        "winner_experiment": winner["experiment"] if winner else None,
        "decisions": decisions,
        "gates": config.model_dump(mode="json"),
    }


def apply_promotion(
    lake: Lake, decision: Mapping[str, Any], *, actor: str, approved: bool = True, comment: str = ""
) -> dict[str, Any]:
    """Record every decision in the registry's log and move the champion pointer to the winner.

    A winner refused by a human (``approved=False``) is rejected with the comment as the reason;
    challengers that passed but lost to the winner are rejected as such.
    """
    from zalando.registry import apply_gate_decision, get_champion, reject

    winner = decision.get("winner")
    promoted = None
    for d in decision["decisions"]:
        v = d["model_version"]
        if v == winner and approved:
            out = apply_gate_decision(lake, v, d["decision"], actor=actor)
            promoted = v if out["promoted"] else None
        elif v == winner:
            reason = f"approval refused{': ' + comment if comment else ''}"
            reject(lake, v, reason=reason, actor=actor, decision=d["decision"])
        elif d["promote"]:
            reason = f"passed every gate, but {winner} had the higher validation macro F1"
            reject(lake, v, reason=reason, actor=actor, decision=d["decision"])
        else:
            apply_gate_decision(lake, v, d["decision"], actor=actor)
    champion = get_champion(lake)
    return {
        "promoted": promoted,
        "champion": champion["model_version"] if champion else None,
        "champion_experiment": champion["experiment"] if champion else None,
    }


# ---------------------------------------------------------------------------------------------- report


def _read_metric_table(lake: Lake, key: str, name: str) -> pd.DataFrame:
    return pq.read_table(io.BytesIO(lake.read_file(key, f"{name}.parquet"))).to_pandas()


def write_run_report(
    lake: Lake,
    settings: Any,
    run_id: str,
    evaluations: Sequence[Mapping[str, Any]],
    champion: str | None,
) -> dict[str, Any]:
    """The study's report for this run (Markdown + PNGs) in ``reports/run_id=…/``; returns its keys
    and the display tables (for Prefect artifacts)."""
    from zalando.data.arrays import images_from_table
    from zalando.data.ingest import load_raw
    from zalando.evaluate import label_group_matrix, pr_curves, predicted_groups, worst_mistakes
    from zalando.gradcam import confused_pair_gradcams
    from zalando.labels import GROUP_NAMES, group_of
    from zalando.models.bundle import bundle_key, load_bundle
    from zalando.report import build_run_report, display_tables, worst_one_piece_items

    evaluations = [e for e in evaluations if e.get("metrics_key")]
    if not evaluations:
        raise DataError(f"report for run {run_id}: no evaluated model")
    tables = {
        name: pd.concat(
            [_read_metric_table(lake, e["metrics_key"], name) for e in evaluations], ignore_index=True
        )
        for name in METRIC_TABLES
    }
    curves, label_group, histories = {}, {}, {}
    cards: list[dict[str, Any]] = []
    probs_by_exp: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for e in evaluations:
        labels, probs = _read_probs(lake, e["eval_key"])
        probs_by_exp[e["experiment"]] = (labels, probs)
        curves[e["experiment"]] = pr_curves(group_of(labels), probs)
        label_group[e["experiment"]] = label_group_matrix(labels, predicted_groups(probs))
        bkey = bundle_key(e["experiment"], e["model_version"])
        meta = json.loads(lake.read_file(bkey, "bundle.json"))
        histories[e["experiment"]] = meta.get("history", [])
        cards.append(json.loads(lake.read_file(bkey, "model_card.json")))

    # the gallery and Grad-CAM maps of the champion if it was evaluated tonight, else the best model
    focus = next((e for e in evaluations if e["model_version"] == champion), None) or max(
        evaluations, key=lambda e: e["gate_metrics"].get("macro_f1") or 0.0
    )
    labels, probs = probs_by_exp[focus["experiment"]]
    images = images_from_table(load_raw(lake, "test", columns=["image"]))
    one_piece = GROUP_NAMES.index("One piece")
    worst = worst_one_piece_items(images, labels, probs, worst_mistakes(group_of(labels), probs, one_piece))
    try:
        bundle = load_bundle(lake, focus["experiment"], focus["model_version"])
        gradcams = confused_pair_gradcams(
            bundle.scoring_model(), images, group_of(labels), probs, y_true_label=labels
        )
    except (
        DataError,
        ValueError,
        RuntimeError,
    ) as exc:  # an architecture Grad-CAM cannot hook: report without it
        log.warning("Grad-CAM skipped for %s: %s", focus["model_version"], exc)
        gradcams = {}

    files = build_run_report(
        run_id,
        tables["per_group"],
        performance=tables["performance"],
        energy=tables["energy"],
        confusion=tables["confusion"],
        pr_curves=curves,
        histories=histories,
        worst_one_piece=worst,
        gradcam_pngs=gradcams,
        summary=tables["summary"],
        label_group=label_group,
        champion=champion,
        models=cards,
    )
    key = report_key(run_id)
    lake.commit_files(key, files, run_id, extra={"champion": champion, "focus": focus["model_version"]})
    display = display_tables(tables["per_group"], tables["performance"], tables["energy"], tables["summary"])
    return {
        "key": key,
        "uri": lake.uri(key),
        "report_uri": lake.uri(f"{key}/report.md"),
        "files": {name: lake.uri(f"{key}/{name}") for name in sorted(files)},
        "tables": {name: json.loads(df.to_json(orient="records")) for name, df in display.items()},
    }


# ---------------------------------------------------------------------------------------------- monitor


def monitoring_key(batch_date: Any, model_version: str, batch_id: str) -> str:
    return f"monitoring/batch_date={batch_date}/model_version={model_version}/batch_id={batch_id}"


def _sample_images(lake: Lake, batch: Any, ids: set[str], image_prep: Any) -> dict[str, np.ndarray]:
    """The images of the sampled ids, read again from the batch's inputs (one file at a time)."""
    from zalando.images import decode_image
    from zalando.scoring.batch import ID_COLUMN, IMAGE_COLUMN, image_id_for_file, open_input
    from zalando.scoring.inputs import decode_image_column

    found: dict[str, np.ndarray] = {}
    for f in batch.inputs:
        if f.error is not None or len(found) == len(ids):
            continue
        fs, path = open_input(f.uri, lake)
        if f.kind == "image":
            image_id = image_id_for_file(f.name)
            if image_id in ids and image_id not in found:
                with fs.open_input_file(path) as fh:
                    found[image_id] = decode_image(fh.read(), image_prep, name=f.name)
            continue
        table = pq.read_table(path, filesystem=fs, columns=[ID_COLUMN, IMAGE_COLUMN])
        mask = pc.is_in(table.column(ID_COLUMN), value_set=pa.array(sorted(ids), pa.string()))
        table = table.filter(mask)
        images, bad = decode_image_column(table.column(IMAGE_COLUMN), image_prep, source=f.name)
        bad_rows = {i for i, _, _ in bad}
        for i, image_id in enumerate(table.column(ID_COLUMN).to_pylist()):
            if i not in bad_rows and image_id not in found:
                found[image_id] = images[i]
    return found


def monitor_batch(
    lake: Lake,
    settings: Any,
    batch: Any,
    model_version: str,
    run_id: str,
    *,
    image_prep: Any = None,
    thresholds: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Label-free drift of one scored batch against the model's reference profile.

    Uses the batch's embedding sample (kept by scoring), the predictions of those rows and their
    images read again from the inputs; commits the drift table to ``monitoring/…`` and returns
    ``{alarm, alarms (statistic names), key, uri, rows, table}``.
    """
    from zalando.drift import DriftThresholds, any_alarm, drift_report
    from zalando.images import ImagePrepConfig
    from zalando.registry import load_reference
    from zalando.scoring import layout
    from zalando.scoring.schema import PROB_COLUMNS

    d, b, v = batch.batch_date, batch.batch_id, model_version
    key = monitoring_key(d, v, b)
    emb_key = layout.embeddings_key(d, v, b)
    if not lake.is_committed(emb_key):
        raise DataError(f"batch {b}: no embedding sample in {lake.uri(emb_key)}; score it first")
    emb_table = lake.read_partition(emb_key)
    ids = emb_table.column("image_id").to_pylist()
    preds = lake.read_partition(layout.predictions_key(d, v, b), columns=["image_id", *PROB_COLUMNS])
    preds = preds.filter(pc.is_in(preds.column("image_id"), value_set=pa.array(ids, pa.string())))
    probs_by_id = dict(
        zip(
            preds.column("image_id").to_pylist(),
            np.stack([preds.column(c).to_numpy() for c in PROB_COLUMNS], axis=1),
            strict=True,
        )
    )
    images_by_id = _sample_images(lake, batch, set(ids), image_prep or ImagePrepConfig())
    emb = np.asarray(emb_table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    emb = emb.reshape(emb_table.num_rows, -1)
    keep = [i for i, x in enumerate(ids) if x in probs_by_id and x in images_by_id]
    if len(keep) < 2:
        raise DataError(f"batch {b}: only {len(keep)} sampled rows could be matched for drift monitoring")
    report = drift_report(
        np.stack([images_by_id[ids[i]] for i in keep]),
        np.stack([probs_by_id[ids[i]] for i in keep]),
        emb[keep],
        load_reference(lake, v),
        DriftThresholds(**dict(thresholds or {})),
    )
    for col in ("batch_value", "reference_value"):  # numbers for some statistics, text for others
        report[col] = report[col].map(str)
    report.insert(0, "batch_id", b)
    report.insert(1, "model_version", v)
    lake.commit_partition(
        key, {"drift": pa.Table.from_pandas(report, preserve_index=False)}, run_id, extra={"rows": len(keep)}
    )
    alarms = report.loc[report["alarm"].astype(bool), "statistic"].astype(str).tolist()
    log.info("drift of batch %s (%d sampled rows): %s", b, len(keep), ", ".join(alarms) or "no alarm")
    return {
        "alarm": any_alarm(report),
        "alarms": alarms,
        "key": key,
        "uri": lake.uri(key),
        "rows": len(keep),
        "table": json.loads(report.drop(columns=["batch_id", "model_version"]).to_json(orient="records")),
    }
