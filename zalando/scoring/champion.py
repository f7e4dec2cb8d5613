"""Load the champion model for scoring, refusing a bundle that does not hold together.

The registry pointer ``registry/champion.json`` names the model version, its experiment and its
bundle key. The bundle (``zalando.models.bundle``) is read checksum-verified and checked before
any image is scored: the pointer, ``bundle.json``, the registry record and the model card agree on
the version, experiment and spec; the normalisation statistics are present, finite and equal to
the dataset version's; the ONNX graph has the contract's inputs and outputs and gives the same
probabilities as the torch weights. The chosen runtime is the fastest on a warm-up batch of those
the bundle admits (``runtime="auto"``): ONNX Runtime and torch in fp32, and the reduced-precision
ones (``onnx-int8``, ``torch-bf16``) only where the bundle's card says they kept fp32's grouped
accuracy on validation (:mod:`zalando.admission`). Loaded predictors are cached per process, so a
worker scoring many shards builds its ONNX Runtime session once. They are
:class:`zalando.runtime.OnnxPredictor` and :class:`zalando.models.predictor.TorchPredictor`, built with
the settings evaluation uses to time the latency gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from zalando.admission import RuntimeAdmission, admission_of
from zalando.errors import LakeError, ModelError, NotCommittedError, ZalandoError
from zalando.lake import Lake
from zalando.lake.keys import CHAMPION_KEY, bundle_key
from zalando.quantize import INT8_ONNX_FILE, int8_source_sha256
from zalando.registry import NoChampionError, get_champion, get_model, require_champion
from zalando.runtime import (
    ONNX_INPUT,
    ONNX_OUTPUTS,
    ONNX_RUNTIMES,
    REDUCED_PRECISION,
    RUNTIMES,
    OnnxPredictor,
    Predictor,
    Runtime,
    default_threads,
    onnxruntime_available,
)

log = logging.getLogger(__name__)

Verify = Literal["auto", "full", "light"]
WARMUP_IMAGES = 512
# the warm-up calls each runtime as a shard does (zalando.scoring.shard.predict_in_sub_batches):
# sub-batches of the default ScoringOptions.sub_batch, ``parallelism`` at once. One 256-image call ran ONNX Runtime on one
# thread and torch on two, and picked torch-bf16 where onnx-int8 scores 10,000 images 1.6x faster
WARMUP_SUB_BATCH = 256
STATS_RTOL = 1e-6
# torch-bf16 may score only when its group probabilities stay this close to fp32 torch's (warm-up batch);
# a guard on top of the validation verdict in the bundle's card (the only check for bundles without one)
BF16_MAX_PROB_DIFF = 0.02


@dataclass
class _BundleFiles:
    """What the loader reads of a committed bundle before it builds any runtime."""

    meta: dict[str, Any]  # bundle.json
    onnx_bytes: bytes
    card: dict[str, Any]  # model_card.json ({} when the bundle has none)
    files: set[str]  # the manifest's file names


@dataclass
class ChampionPredictor:
    """A checked predictor of one model version (what :func:`score_shard` is given)."""

    predictor: Predictor
    model_version: str
    experiment: str
    bundle_key: str
    runtime: str
    macs_per_image: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # warm-up seconds per runtime tried
    checks: dict[str, Any] = field(default_factory=dict)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.predictor.predict(images)

    @property
    def parallelism(self) -> int:
        """How many predict calls may run at once (thread-safe ONNX Runtime sessions)."""
        return self.predictor.parallelism


_CACHE: dict[tuple[str, str, str, int], ChampionPredictor] = {}
_CACHE_LOCK = threading.Lock()


def clear_predictor_cache() -> None:
    """Forget the per-process predictors (tests; a new champion is picked up by version anyway)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _require_champion(lake: Lake) -> dict[str, Any]:
    """The registry's champion pointer; NoChampionError (also naming --model-version) when there is none."""
    try:
        pointer = require_champion(lake)
    except NoChampionError as e:
        raise NoChampionError(f"{e}; or pass --model-version to score a given version") from None
    if not pointer.get("model_version"):
        raise NoChampionError(
            f"the champion pointer {lake.uri(CHAMPION_KEY)} names no model_version: promote one with "
            "`zalando promote VERSION`, or pass --model-version"
        )
    return pointer


def resolve_model(lake: Lake, model_version: str | None = None) -> dict[str, Any]:
    """{model_version, experiment, bundle_key} of the champion, or of ``model_version`` when given."""
    if model_version is None:
        return _pointer_fields(lake, _require_champion(lake))
    pointer = get_champion(lake)
    if pointer and pointer.get("model_version") == model_version:
        return _pointer_fields(lake, pointer)
    try:
        return _pointer_fields(lake, get_model(lake, model_version))
    except (ModelError, LakeError):
        pass
    # not registered: look for a committed bundle of that version under models/
    found = [p for p in lake.list_partitions("models") if p.rsplit("/", 1)[-1] == model_version]
    if len(found) != 1:
        raise ModelError(
            f"model version {model_version!r}: {'not found' if not found else 'ambiguous'} under "
            f"{lake.uri('models')} (see `zalando models`)"
        )
    experiment = found[0].split("/")[1]
    return {"model_version": model_version, "experiment": experiment, "bundle_key": found[0]}


def _pointer_fields(lake: Lake, pointer: dict[str, Any]) -> dict[str, Any]:
    version, experiment = pointer.get("model_version"), pointer.get("experiment")
    if not version or not experiment:
        raise ModelError(f"registry entry {pointer!r} lacks model_version or experiment")
    key = pointer.get("bundle_key") or bundle_key(str(experiment), str(version))
    return {"model_version": str(version), "experiment": str(experiment), "bundle_key": str(key)}


def resolve_model_version(lake: Lake, model_version: str | None = None) -> str:
    """Pin the model version once per batch (the champion now, unless one is given)."""
    return resolve_model(lake, model_version)["model_version"]


def load_champion_predictor(
    lake: Lake,
    runtime: Runtime = "auto",
    *,
    model_version: str | None = None,
    threads: int | None = None,
    verify: Verify = "auto",
    use_cache: bool = True,
) -> ChampionPredictor:
    """The champion's (or ``model_version``'s) checked predictor, cached per process.

    ``runtime``: ``auto`` measures ONNX Runtime and torch on a warm-up batch once and keeps the
    fastest (torch alone when onnxruntime is not installed), adding the reduced-precision runtimes
    the bundle's card admits (grouped accuracy on validation within 0.05 points of fp32's):
    ``onnx-int8`` (model.int8.onnx) and, on CPUs with native bf16, ``torch-bf16``, which must also
    agree with fp32 torch to ``BF16_MAX_PROB_DIFF`` on the warm-up batch. A bundle whose card has no
    verdicts (built before them) gets bf16 by that warm-up check alone and never int8.
    ``onnx`` / ``onnx-int8`` / ``torch`` / ``torch-bf16`` force one; a reduced-precision runtime the
    card does not admit is refused with a ModelError naming its accuracy and fp32's.
    ``verify``: ``full`` also rebuilds the torch model and checks that model.onnx gives the same
    outputs as weights.pt; ``light`` checks checksums, bundle.json, statistics and the ONNX graphs
    without importing torch (600 MB less per worker); ``auto`` = full unless the runtime is
    ``onnx`` or ``onnx-int8``.
    ``threads``: cores to use (default: ZALANDO_TORCH_THREADS or all cores): concurrent single-threaded
    runs for ONNX Runtime, intra-op threads for torch.
    Raises :class:`ModelError` for a missing champion or a bundle that fails a check.
    """
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; valid choices: {', '.join(RUNTIMES)}")
    info = resolve_model(lake, model_version)
    n_threads = int(threads or default_threads())
    full = verify == "full" or (verify == "auto" and runtime not in ONNX_RUNTIMES)
    cache_key = (lake.uri_root, info["model_version"], runtime, n_threads)
    if use_cache:
        with _CACHE_LOCK:
            hit = _CACHE.get(cache_key)
        if hit is not None and (not full or hit.checks.get("verify") == "full"):
            return hit
    loaded = _load_checked(lake, info, runtime, n_threads, full)
    if use_cache:
        with _CACHE_LOCK:
            _CACHE[cache_key] = loaded
            # the measured choice also serves later requests for that runtime by name
            _CACHE.setdefault((lake.uri_root, info["model_version"], loaded.runtime, n_threads), loaded)
    return loaded


def choose_runtime(lake: Lake, model_version: str, threads: int | None = None) -> str:
    """Measure once (fully verified) which admitted runtime is fastest for this model (e.g. 'onnx')."""
    return load_champion_predictor(lake, "auto", model_version=model_version, threads=threads).runtime


def _load_checked(
    lake: Lake, info: dict[str, Any], runtime: Runtime, threads: int, full: bool
) -> ChampionPredictor:
    """Read and check the bundle, build the runtimes asked for (and admitted), keep the fastest on the warm-up batch."""
    t0 = time.perf_counter()
    version, experiment, key = info["model_version"], info["experiment"], info["bundle_key"]
    where = f"model bundle {lake.uri(key)}"
    bundle_files = _read_bundle(lake, where, info)
    meta, onnx_bytes = bundle_files.meta, bundle_files.onnx_bytes
    checks: dict[str, Any] = {"manifest_sha256": "ok", "verify": "full" if full else "light"}
    _check_meta(lake, where, meta, version, experiment, checks)
    onnx_io = meta.get("onnx") or {}
    input_name = str(onnx_io.get("input", ONNX_INPUT))
    output_names = tuple(onnx_io.get("outputs", ONNX_OUTPUTS))
    _check_onnx_graph(where, onnx_bytes, version, input_name, output_names)
    admission = _admission(where, bundle_files, runtime, checks)
    has_ort = onnxruntime_available()
    if runtime in ONNX_RUNTIMES and not has_ort:
        raise ModelError(
            f"runtime {runtime!r} asked for, but onnxruntime is not installed (pip install onnxruntime)"
        )
    if runtime == "auto" and not has_ort:
        log.warning("onnxruntime is not installed: scoring with torch")
        runtime = "torch"
    candidates: list[tuple[str, Predictor]] = []
    if runtime in ("auto", "onnx"):
        onnx = OnnxPredictor(onnx_bytes, threads, input_name=input_name, output_names=output_names)
        candidates.append(("onnx", onnx))
    if runtime == "onnx-int8" or (
        runtime == "auto" and admission is not None and admission.admits_here("onnx-int8")
    ):
        int8 = _int8_predictor(lake, where, key, onnx_bytes, threads, input_name, output_names)
        candidates.append(("onnx-int8", int8))
    macs = None
    if full or runtime in ("auto", "torch", "torch-bf16"):
        bf16_admitted = admission is None or admission.admits("torch-bf16")
        torch_candidates, macs = _torch_candidates(
            lake, where, info, onnx_bytes if has_ort else None, runtime, threads, checks, bf16_admitted
        )
        candidates += torch_candidates
    timings = _warm_up(where, candidates)
    chosen = min(timings, key=timings.__getitem__)
    log.info(
        "champion %s/%s loaded in %.2fs (%s checks): runtime %s (warm-up %s), %d threads",
        experiment,
        version,
        time.perf_counter() - t0,
        checks["verify"],
        chosen,
        ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()),
        threads,
    )
    return ChampionPredictor(
        predictor=dict(candidates)[chosen],
        model_version=version,
        experiment=experiment,
        bundle_key=key,
        runtime=chosen,
        macs_per_image=int(macs) if isinstance(macs, int | float) else None,
        timings=timings,
        checks=checks,
    )


def _read_bundle(lake: Lake, where: str, info: dict[str, Any]) -> _BundleFiles:
    """bundle.json, model.onnx and the model card of a committed bundle, checksum-verified against its manifest."""
    version, experiment, key = info["model_version"], info["experiment"], info["bundle_key"]
    expected_key = bundle_key(experiment, version)
    if key != expected_key:
        raise ModelError(f"{where}: the registry's bundle_key should be {expected_key!r}")
    try:
        manifest = lake.read_manifest(key)
        meta = json.loads(lake.read_file(key, "bundle.json"))
        onnx_bytes = lake.read_file(key, "model.onnx")
        files = set(manifest.get("files", {}))
        card = json.loads(lake.read_file(key, "model_card.json")) if "model_card.json" in files else {}
    except NotCommittedError:
        raise ModelError(
            f"{where} is not committed (no _MANIFEST.json): re-train or promote another version"
        ) from None
    except LakeError as e:
        if e.transient:  # the storage blinked: the task's retry reads the bundle again
            raise
        # a checksum mismatch or a missing file
        raise ModelError(f"{where}: {e}; the bundle is corrupt or was changed after commit") from None
    missing = [n for n in ("weights.pt", "bundle.json", "model.onnx") if n not in files]
    if missing:
        raise ModelError(f"{where}: files {missing} missing from its manifest")
    return _BundleFiles(meta=meta, onnx_bytes=onnx_bytes, card=card, files=files)


def _admission(
    where: str, bundle_files: _BundleFiles, runtime: Runtime, checks: dict[str, Any]
) -> RuntimeAdmission | None:
    """The card's validation verdicts (None: built without them); refuses a reduced-precision runtime
    asked for by name that they do not admit (int8 is refused too when there are none)."""
    admission = admission_of(bundle_files.card, f"{where}: model_card.json")
    if admission is None:
        checks["runtime_admission"] = "none (bundle built without runtime checks)"
        if runtime == "onnx-int8":
            raise ModelError(
                f"{where}: runtime onnx-int8 is not admitted for this model: it was built without runtime "
                f"checks (no validation verdict, no {INT8_ONNX_FILE}); score with onnx or torch"
            )
        return None
    checks["runtime_admission"] = {name: v.admitted for name, v in admission.runtimes.items()}
    if admission.admits("onnx-int8") and not admission.admits_here("onnx-int8"):
        checks["runtime_admission"]["onnx-int8"] = f"admitted on {admission.int8_kernels} int8 kernels only"
        log.info("%s: %s", where, admission.refusal("onnx-int8"))  # auto does not offer it here
    if runtime in REDUCED_PRECISION and not admission.admits_here(runtime):
        raise ModelError(f"{where}: {admission.refusal(runtime)}")
    if admission.admits("onnx-int8") and INT8_ONNX_FILE not in bundle_files.files:
        raise ModelError(
            f"{where}: its card admits onnx-int8 but {INT8_ONNX_FILE} is missing from its manifest"
        )
    return admission


def _int8_predictor(
    lake: Lake,
    where: str,
    key: str,
    onnx_bytes: bytes,
    threads: int,
    input_name: str,
    output_names: tuple[str, ...],
) -> OnnxPredictor:
    """The int8 graph (checksum-verified), checked to have the contract and to come from this model.onnx."""
    try:
        int8_bytes = lake.read_file(key, INT8_ONNX_FILE)
    except LakeError as e:
        if e.transient:
            raise
        raise ModelError(
            f"{where}: {INT8_ONNX_FILE}: {e}; the bundle is corrupt or was changed after commit"
        ) from None
    _check_onnx_graph(where, int8_bytes, "", input_name, output_names, name=INT8_ONNX_FILE)
    if int8_source_sha256(int8_bytes) != hashlib.sha256(onnx_bytes).hexdigest():
        raise ModelError(f"{where}: {INT8_ONNX_FILE} was not quantized from this bundle's model.onnx")
    return OnnxPredictor(
        int8_bytes, threads, input_name=input_name, output_names=output_names, runtime="onnx-int8"
    )


def _torch_candidates(
    lake: Lake,
    where: str,
    info: dict[str, Any],
    onnx_bytes: bytes | None,
    runtime: Runtime,
    threads: int,
    checks: dict[str, Any],
    bf16_admitted: bool,
) -> tuple[list[tuple[str, Predictor]], Any]:
    """Rebuild the torch model (checking model.onnx against it when ``onnx_bytes`` are given) and the
    torch runtimes asked for: fp32, and bf16 when asked for or (``auto``) native, admitted by the
    card (``bf16_admitted``) and in agreement on the warm-up batch.

    Returns the candidates and the model card's MACs per image.
    """
    from zalando.models.bundle import check_onnx, load_bundle
    from zalando.models.predictor import TorchPredictor

    version, experiment = info["model_version"], info["experiment"]
    try:
        bundle = load_bundle(lake, experiment, version)
    except ModelError:
        raise
    except ZalandoError as e:  # e.g. arch_params this code's architecture no longer accepts
        raise ModelError(f"{where} cannot be rebuilt by this code: {e}") from None
    if bundle.model_version != version or bundle.experiment != experiment:
        raise ModelError(
            f"{where}: holds {bundle.experiment}/{bundle.model_version}, not {experiment}/{version}"
        )
    if onnx_bytes is not None:
        try:
            checks["onnx_vs_torch_max_diff"] = check_onnx(bundle, onnx_bytes)
        except ModelError as e:
            raise ModelError(f"{where}: model.onnx does not match weights.pt ({e})") from None
    candidates: list[tuple[str, Predictor]] = []
    fp32 = TorchPredictor(bundle, threads=threads)
    if runtime in ("auto", "torch"):
        candidates.append(("torch", fp32))
    if runtime == "torch-bf16" or (runtime == "auto" and bf16_admitted and _native_bf16()):
        bf16 = _checked_bf16(where, bundle, fp32, threads, checks, required=runtime == "torch-bf16")
        if bf16 is not None:
            candidates.append(("torch-bf16", bf16))
    return candidates, bundle.card.get("macs_per_image")


def _warm_up(where: str, candidates: list[tuple[str, Predictor]]) -> dict[str, float]:
    """Seconds each runtime takes on the warm-up batch, after a first call that checks its outputs."""
    from zalando.scoring.shard import predict_in_sub_batches  # the call a shard makes

    warm = _warmup_images()
    timings: dict[str, float] = {}
    for name, pred in candidates:
        probs, _ = pred.predict(warm[:16])  # first call allocates
        if probs.shape != (16, 5) or not np.all(np.isfinite(probs)) or np.abs(probs.sum(1) - 1).max() > 1e-3:
            raise ModelError(f"{where}: {name} runtime gives invalid probabilities on the warm-up batch")
        t = time.perf_counter()
        predict_in_sub_batches(pred, warm, WARMUP_SUB_BATCH, 0)
        timings[name] = time.perf_counter() - t
    return timings


def _native_bf16() -> bool:
    from zalando.models.hardware import native_bf16

    return native_bf16("cpu")


def _checked_bf16(
    where: str, bundle: Any, fp32: Any, threads: int, checks: dict[str, Any], *, required: bool
) -> Any:
    """A bf16-autocast torch predictor, if its probabilities agree with ``fp32``'s on the warm-up batch."""
    from zalando.models.predictor import TorchPredictor

    bf16 = TorchPredictor(bundle, threads=threads, precision="bf16")
    warm = _warmup_images()
    diff = float(np.abs(bf16.predict(warm)[0] - fp32.predict(warm)[0]).max())
    checks["bf16_vs_fp32_max_prob_diff"] = round(diff, 6)
    if diff <= BF16_MAX_PROB_DIFF:
        return bf16
    message = (
        f"{where}: torch-bf16 probabilities differ from fp32 by {diff:.4f} (> {BF16_MAX_PROB_DIFF}) "
        "on the warm-up batch"
    )
    if required:
        raise ModelError(message + "; score with runtime onnx or torch")
    log.warning("%s; not using torch-bf16", message)
    return None


def _check_meta(
    lake: Lake, where: str, meta: dict[str, Any], version: str, experiment: str, checks: dict[str, Any]
) -> None:
    """bundle.json against the pointer, the registry record and the dataset version's statistics."""
    if meta.get("model_version") != version:
        raise ModelError(
            f"{where}: bundle.json says model_version {meta.get('model_version')!r}, expected {version!r}"
        )
    if meta.get("experiment") != experiment:
        raise ModelError(
            f"{where}: bundle.json says experiment {meta.get('experiment')!r}, expected {experiment!r}"
        )
    spec = meta.get("spec") or {}
    if spec.get("name") != experiment:
        raise ModelError(f"{where}: spec name {spec.get('name')!r} does not match experiment {experiment!r}")
    for stat in ("mean", "std"):
        value = meta.get(stat)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ModelError(f"{where}: normalisation {stat} missing or not a finite number ({value!r})")
    if not (0.0 <= meta["mean"] <= 1.0) or not (0.0 < meta["std"] <= 1.0):
        raise ModelError(
            f"{where}: normalisation mean {meta['mean']} / std {meta['std']} out of range for pixels/255"
        )
    checks["stats"] = {"mean": meta["mean"], "std": meta["std"]}
    try:
        record = get_model(lake, version)
    except (ModelError, LakeError):
        record = None
    if record is not None:
        if record.get("experiment") != experiment:
            raise ModelError(
                f"{where}: registry records experiment {record.get('experiment')!r}, bundle has {experiment!r}"
            )
        if record.get("spec") and record["spec"] != spec:
            raise ModelError(f"{where}: spec in bundle.json differs from the spec registered for {version}")
        checks["registry_record"] = "ok"
    dataset_version = meta.get("dataset_version")
    if dataset_version:
        try:
            from zalando.data.split import read_dataset_version

            dv = read_dataset_version(lake, dataset_version)
        except (NotCommittedError, LakeError, ImportError):
            log.warning(
                "%s: dataset version %s not in the lake; statistics not cross-checked", where, dataset_version
            )
            checks["dataset_stats"] = "dataset version not found"
            return
        for stat in ("mean", "std"):
            ref = float(getattr(dv, stat))
            if not math.isclose(float(meta[stat]), ref, rel_tol=STATS_RTOL, abs_tol=1e-9):
                raise ModelError(
                    f"{where}: normalisation {stat} {meta[stat]} differs from dataset version "
                    f"{dataset_version}'s {ref}: the bundle was trained on other statistics"
                )
        checks["dataset_stats"] = "ok"


def _check_onnx_graph(
    where: str,
    onnx_bytes: bytes,
    version: str,
    input_name: str,
    output_names: tuple[str, ...],
    *,
    name: str = "model.onnx",
) -> None:
    import onnx

    try:
        model = onnx.load_from_string(onnx_bytes)
    except Exception as e:  # noqa: BLE001 - protobuf raises several kinds
        raise ModelError(f"{where}: {name} is not a valid ONNX model ({e.__class__.__name__})") from None
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if input_name not in inputs or list(output_names) != outputs[: len(output_names)]:
        raise ModelError(
            f"{where}: {name} has inputs {inputs} / outputs {outputs}, expected {input_name} -> {list(output_names)}"
        )
    meta = {p.key: p.value for p in model.metadata_props}
    if version and "model_version" in meta and meta["model_version"] != version:
        raise ModelError(f"{where}: {name} was exported for version {meta['model_version']}, not {version}")


def _warmup_images(n: int = WARMUP_IMAGES) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
