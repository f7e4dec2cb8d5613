"""The study's set-up on one GPU: mobilenet_v2_full and squeezenet1_1_full under the `paper` profile.

    python benchmarks/paper_gpu.py --out /tmp/paper-gpu            # the study's recipe: batch 16, Adam 5e-5
    python benchmarks/paper_gpu.py --out /tmp/paper-gpu --fast     # batch 128, lr x sqrt(8): fills an H200
    python benchmarks/paper_gpu.py --smoke                         # the CPU smoke run, also on a GPU machine

One command, no questions. It ingests the four IDX files (``--data``, else ``ZALANDO_DATA_SOURCE``, else
``shared/data/fashion-mnist`` in or beside the repo) into a file:// lake in a work folder, makes the
dataset version (48,000 train / 12,000 validation, seeded) exactly as the pipeline does, and trains both
experiments at 224x224 on the GPU with the engine (mixed precision, channels_last, the uint8 images on
the device). ImageNet weights come from the torch cache; where they are not there, the model trains
from scratch and the tables say so (``--weights``). Before training it times the first steps of each
model and caps the epochs so that the whole run fits ``--budget-min`` (the recipe's early stopping may
end sooner). The 10,000 test images are scored on the GPU only after training.

It prints, and writes to ``--out`` as Markdown and JSON: per-group recall / precision / NPV beside the
study's (``zalando/study.py``), parameters, model size, the test split's inference time on the GPU beside
the study's 37.3 s, and energy: codecarbon's reading (GPU power through NVML when nvidia-ml-py is
installed) and NVML's own energy counter. Every phase's elapsed time is printed as it ends.

Without a CUDA GPU it says so in one line, runs a CPU-sized smoke run (256 train / 128 validation /
256 test images at 32x32, 1 epoch, both models), prints the same tables and exits 0.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXPERIMENTS = ("mobilenet_v2_full", "squeezenet1_1_full")
SMOKE = {"train": 256, "val": 128, "test": 256, "input_size": 32, "batch_size": 64}
FAST_BATCH = 128
PROBE_STEPS = {"gpu": (5, 50), "smoke": (1, 2)}  # (warm-up, timed) training steps per model
SAFETY = 0.9  # of the time left for training: what the epoch cap plans to use
log = logging.getLogger("paper_gpu")


# ----------------------------------------------------------------------------- phases and arguments


@dataclass
class Phases:
    """Elapsed seconds per phase, printed as each one ends."""

    t0: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            print(f"# phase {name}: {self.seconds[name]:.1f} s (total {self.elapsed():.1f} s)", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:5]),
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("paper-gpu-out"), help="tables go here (.md, .json)")
    ap.add_argument("--data", default=None, help="folder (or file:// / https:// prefix) with the 4 IDX files")
    ap.add_argument("--work", type=Path, default=None, help="work folder for the lake (default: a temp dir)")
    ap.add_argument("--budget-min", type=float, default=9.0, help="the whole run, minutes (default 9)")
    ap.add_argument("--fast", action="store_true", help=f"batch {FAST_BATCH} and lr x sqrt(batch / 16)")
    ap.add_argument("--batch-size", type=int, default=None, help="overrides the recipe's (and --fast's)")
    ap.add_argument("--lr", type=float, default=None, help="overrides the recipe's (and --fast's)")
    ap.add_argument("--max-epochs", type=int, default=None, help="cap epochs below what the budget allows")
    ap.add_argument(
        "--weights", choices=("auto", "imagenet", "none"), default="auto",
        help="auto: ImageNet from the torch cache, else from scratch (said in the table); "
        "imagenet: cache or download, else fail; none: from scratch",
    )  # fmt: skip
    ap.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto", help="training arithmetic"
    )
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the training forward (off: see README)"
    )
    ap.add_argument("--smoke", action="store_true", help="the CPU-sized smoke run, even where there is a GPU")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--country", default="DEU", help="ISO code for codecarbon's carbon intensity")
    ap.add_argument("-q", "--quiet", action="store_true", help="no engine progress lines")
    return ap.parse_args(argv)


def data_source(arg: str | None) -> str:
    """--data, else ZALANDO_DATA_SOURCE, else shared/data/fashion-mnist inside or beside the repo."""
    if arg:
        return arg
    if os.environ.get("ZALANDO_DATA_SOURCE"):
        return os.environ["ZALANDO_DATA_SOURCE"]
    tried = [REPO / "shared" / "data" / "fashion-mnist", REPO.parent / "shared" / "data" / "fashion-mnist"]
    for folder in tried:
        if (folder / "train-images-idx3-ubyte.gz").is_file():
            return str(folder)
    raise SystemExit(
        f"no data: pass --data or set ZALANDO_DATA_SOURCE (looked in {', '.join(map(str, tried))})"
    )


# ----------------------------------------------------------------------------- data


def ingest_dataset(source: str, work: Path, seed: int) -> dict[str, Any]:
    """The pipeline's own ingest and preprocess into a file:// lake, then the dataset version's arrays."""
    from zalando.data.ingest import ingest
    from zalando.data.sources import fetch_source
    from zalando.data.split import load_dataset_arrays, preprocess
    from zalando.lake import Lake

    lake = Lake.local(work / "lake")
    summary = ingest(lake, fetch_source(source, cache_dir=work))
    dv = preprocess(lake, seed=seed)
    arrays = load_dataset_arrays(lake, dv)
    print(
        f"# data: {source} -> {lake.uri('')}: {dv.n_train} train / {dv.n_val} val / {dv.n_test} test, "
        f"mean {dv.mean:.4f} std {dv.std:.4f}, dataset {dv.dataset_version}, "
        f"quarantined {sum(summary.get('quarantine', {}).values())}",
        flush=True,
    )
    return arrays


# ----------------------------------------------------------------------------- specs and the budget


@dataclass(frozen=True)
class Plan:
    """What runs: the profile, each experiment's spec, and how the recipe was changed."""

    profile: Any
    specs: dict[str, Any]
    recipe: str
    allow_download: bool
    smoke: bool


def make_plan(args: argparse.Namespace, smoke: bool) -> Plan:
    """The paper profile's two experiments, with the weights, precision and batch/lr the arguments ask for."""
    from zalando.models.experiments import ExperimentSpec, load_catalog

    cat = load_catalog()
    profile = cat.profile("paper")
    if smoke:
        profile = profile.model_copy(
            update={
                "name": "paper-smoke", "max_input_size": SMOKE["input_size"], "max_epochs": 1,
                "batch_size": SMOKE["batch_size"], "max_train_images": SMOKE["train"],
                "max_val_images": SMOKE["val"],
            }
        )  # fmt: skip
    specs, recipe = {}, []
    for name in EXPERIMENTS:
        base = cat.experiment(name)
        upd: dict[str, Any] = {"precision": args.precision}
        if args.weights == "auto":
            upd["weights_fallback"] = "none"  # not in the torch cache: from scratch, recorded by the engine
        elif args.weights == "none":
            upd["weights"] = "none"
        bs, lr = base.batch_size, base.lr
        if args.fast and not smoke:
            bs, lr = FAST_BATCH, base.lr * math.sqrt(FAST_BATCH / base.batch_size)
        upd.update(batch_size=args.batch_size or bs, lr=args.lr or lr)
        specs[name] = ExperimentSpec.model_validate({**base.model_dump(), **upd})
        trains = _resolve(specs[name], profile)  # as the profile trains it (the smoke profile sets the batch)
        recipe.append(
            f"{name}: batch {trains.batch_size}, {trains.optimizer} lr {trains.lr:.3g}, {trains.input_size} px"
        )
    if smoke:
        kind = f"smoke: profile batch {SMOKE['batch_size']}, {SMOKE['input_size']} px, 1 epoch"
    elif args.fast or args.batch_size or args.lr:
        kind = "changed recipe" + (
            f" (--fast: batch {FAST_BATCH}, lr x sqrt({FAST_BATCH}/16))" if args.fast else ""
        )
    else:
        kind = "the study's recipe"
    return Plan(profile, specs, f"{kind}; " + "; ".join(recipe), args.weights == "imagenet", smoke)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def probe_epoch_s(spec: Any, plan: Plan, data: dict[str, Any], device: Any, seed: int) -> dict[str, Any]:
    """Seconds per training step and per validation image, from the engine's first steps on this device."""
    import torch

    from zalando.models.hardware import to_device
    from zalando.train import EpochLoader, select_training_data, setup_training, train_one_epoch
    from zalando.validation import predict_logits

    train = select_training_data(data, plan.profile, spec.target, data["mean"], data["std"], seed)
    resolved = spec if spec.profile else _resolve(spec, plan.profile)
    setup = setup_training(
        resolved, plan.profile, train, seed=seed, device=device, lake=None, allow_download=plan.allow_download
    )
    loader = EpochLoader(
        to_device(train.x_train, device), to_device(train.y_train, device), setup.batch_size,
        resolved.augmentation, train.mean, train.std, device, seed=seed,
    )  # fmt: skip
    kw = {"amp_dtype": setup.amp_dtype, "scaler": setup.scaler}
    warm, timed_steps = PROBE_STEPS["smoke" if plan.smoke else "gpu"]
    steps = min(warm + timed_steps, len(loader))
    warm = min(warm, steps - 1)
    batches = iter(loader)
    train_one_epoch(
        setup.model, setup.loss_fn, setup.optimizer, itertools.islice(batches, warm), device, **kw
    )
    _sync(device)
    t = time.perf_counter()
    timed = train_one_epoch(
        setup.model, setup.loss_fn, setup.optimizer, itertools.islice(batches, steps - warm), device, **kw
    )
    _sync(device)
    n_timed = max(timed.images // setup.batch_size, 1)
    step_s = (time.perf_counter() - t) / n_timed
    x_val = train.x_val[: min(len(train.x_val), 2048)]
    predict_logits(setup.model, x_val[:64], train.mean, train.std)  # warm the eval shapes
    t = time.perf_counter()
    predict_logits(setup.model, x_val, train.mean, train.std)
    val_img_s = (time.perf_counter() - t) / len(x_val)
    steps_per_epoch = setup.steps_per_epoch
    del setup, loader, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "step_s": step_s, "timed_steps": n_timed, "val_img_s": val_img_s, "steps_per_epoch": steps_per_epoch,
        "epoch_s": steps_per_epoch * step_s + train.n_val * val_img_s, "n_val": train.n_val,
    }  # fmt: skip


def _resolve(spec: Any, profile: Any) -> Any:
    from zalando.models.experiments import resolve_spec

    return resolve_spec(spec, profile)


def cap_epochs(
    plan: Plan, probes: dict[str, dict[str, float]], left_s: float, n_test: int, max_epochs: int | None
) -> tuple[int, str]:
    """The same epoch cap for both models so that training, validation and the test pass fit ``left_s``."""
    # the profile's epochs (with its cap), and what --max-epochs allows
    recipe_epochs = min(_resolve(s, plan.profile).epochs for s in plan.specs.values())
    wanted = min(recipe_epochs, max_epochs or recipe_epochs)
    # after training: the choices on validation (one pass, two with TTA) and the test split, scored twice
    after = sum(p["n_val"] * p["val_img_s"] * 2 + n_test * p["val_img_s"] * 3 + 5.0 for p in probes.values())
    per_epoch = sum(p["epoch_s"] for p in probes.values())
    usable = SAFETY * left_s - after
    fits = int(usable // per_epoch) if per_epoch > 0 else wanted
    epochs = max(1, min(wanted, fits))
    est = ", ".join(
        f"{n} {p['epoch_s']:.1f} s/epoch ({p['step_s'] * 1e3:.1f} ms/step over {p['timed_steps']} timed steps)"
        for n, p in probes.items()
    )
    why = (
        f"estimated from each model's first steps: {est}; {left_s:.0f} s left for training and testing; "
        f"{epochs} epochs each (the profile's {recipe_epochs} would need about "
        f"{recipe_epochs * per_epoch + after:.0f} s)"
    )
    if fits < 1:
        why += "; the budget is too small even for one epoch: it will be overrun"
    elif epochs < wanted:
        why += f"; CAPPED from {wanted} to fit the budget"
    return epochs, why


# ----------------------------------------------------------------------------- GPU power through NVML


class NvmlPower:
    """The GPU's power and energy through NVML (nvidia-ml-py) while a phase runs; all None where NVML is not."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.available = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._e0: float | None = None
        self.energy_j: float | None = None
        self.seconds = 0.0

    def __enter__(self) -> NvmlPower:
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.available = True
        except Exception:  # noqa: BLE001 - no driver, no GPU, no package: the columns say '-'
            return self
        try:
            self._e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0  # mJ -> J
        except Exception:  # noqa: BLE001 - pre-Volta GPUs have no energy counter: integrate the samples
            self._e0 = None
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0)  # mW -> W
            except Exception:  # noqa: BLE001
                return
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if not self.available:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.seconds = time.perf_counter() - self._t0
        if self._e0 is not None:
            self.energy_j = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0 - self._e0
        elif self.samples:
            self.energy_j = sum(self.samples) / len(self.samples) * self.seconds

    def as_row(self) -> dict[str, float | None]:
        mean = sum(self.samples) / len(self.samples) if self.samples else None
        return {
            "nvml_gpu_w_mean": mean,
            "nvml_gpu_w_max": max(self.samples) if self.samples else None,
            "nvml_gpu_kwh": self.energy_j / 3.6e6 if self.energy_j is not None else None,
        }


# ----------------------------------------------------------------------------- train and test one model


def train_one(
    name: str, plan: Plan, data: dict[str, Any], device: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Train one experiment with the engine, under codecarbon and NVML."""
    from zalando.energy import measure_energy
    from zalando.train import train_experiment

    spec = plan.specs[name]
    with NvmlPower() as nvml, measure_energy(f"train-{name}", args.country, measure_power_secs=5) as meter:
        res = train_experiment(
            spec, plan.profile, data, data["mean"], data["std"], seed=args.seed, threads=args.threads,
            allow_download=plan.allow_download, device=device.type, compile_model=args.compile,
        )  # fmt: skip
        meter.images = res.n_train * max(res.epochs_run, 1)
    return {"result": res, "energy_train": {**meter.reading.as_row(), **nvml.as_row()}}


def test_one(res: Any, data: dict[str, Any], device: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The test split scored on ``device`` as production scores it (probabilities of the groups), timed."""
    import numpy as np
    import torch

    from zalando.energy import measure_energy
    from zalando.evaluate import group_metrics
    from zalando.labels import LABEL_TO_GROUP
    from zalando.models.bundle import ScoringModel
    from zalando.validation import EVAL_BATCH

    weights = (res.operating_point or {}).get("weights")
    scoring = ScoringModel(
        res.model, data["mean"], data["std"], res.spec.target, res.temperature, res.spec.tta, weights
    )
    scoring = scoring.to(device).eval()
    x = data["x_test"]

    def score() -> np.ndarray:
        from zalando.models.hardware import to_device

        out = []
        with torch.no_grad():
            for i in range(0, len(x), EVAL_BATCH):
                xb = to_device(torch.from_numpy(x[i : i + EVAL_BATCH])[:, None], device).float()
                out.append(scoring(xb)[0])
        probs = torch.cat(out).cpu().numpy()  # waits for the GPU: part of the time
        return probs

    score()  # warm-up: cuDNN picks its kernels for these shapes
    with (
        NvmlPower() as nvml,
        measure_energy("test", args.country, images=len(x), measure_power_secs=1) as meter,
    ):
        t = time.perf_counter()
        probs = score()
        wall = time.perf_counter() - t
    y_group = np.asarray(LABEL_TO_GROUP)[data["y_test"]]
    frame = group_metrics(y_group, probs.argmax(1))
    per = {
        r["group_name"]: {k: float(r[k]) for k in ("recall", "precision", "npv")}
        for r in frame.to_dict("records")
    }
    res.model.to("cpu")
    return {
        "per_group": per,
        "group_acc": float((probs.argmax(1) == y_group).mean()),
        "test_images": len(x),
        "test_wall_s": wall,
        "energy_test": {**meter.reading.as_row(), **nvml.as_row()},
    }


def model_row(name: str, trained: dict[str, Any], tested: dict[str, Any], cap: int) -> dict[str, Any]:
    import torch

    res = trained["result"]
    buf = io.BytesIO()
    torch.save(res.model.state_dict(), buf)
    w = res.weights
    if w.used == "imagenet":
        weights = "ImageNet (downloaded)" if w.source.startswith("http") else "ImageNet (torch cache)"
    elif w.requested == "imagenet":
        weights = "none: from scratch (ImageNet weights not in the torch cache)"
    else:
        weights = "none: from scratch (--weights none)"
    return {
        "experiment": name,
        "weights": weights,
        "weights_note": w.note,
        "device": res.device,
        "precision": res.precision,
        "batch_size": res.spec.batch_size,
        "lr": res.spec.lr,
        "input_size": res.spec.input_size,
        "epochs_run": res.epochs_run,
        "epoch_cap": cap,
        "best_epoch": res.best_epoch,
        "stopped_early": res.stopped_early,
        "train_s": res.wall_s,
        "train_images_per_s": max((h["images_per_s"] for h in res.history), default=None),
        "val_group_acc": res.val_metrics["val_group_acc"],
        "params": res.params,
        "size_mb": len(buf.getvalue()) / 1e6,
        **{k: tested[k] for k in ("per_group", "group_acc", "test_images", "test_wall_s")},
        "energy_train": trained["energy_train"],
        "energy_test": tested["energy_test"],
    }


# ----------------------------------------------------------------------------- tables


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def tables(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The study's tables side by side, as Markdown."""
    from zalando.labels import GROUP_NAMES
    from zalando.study import STUDY_BEST, STUDY_SCORING

    names = [r["experiment"] for r in rows]
    out = [
        f"## Per group on the test split ({rows[0]['test_images'] if rows else 0} images): recall / precision / NPV",
        "",
    ]
    out.append(
        "| group | study: mobilenet_v2_full (GPU, ImageNet) | "
        + " | ".join(f"ours: {n}" for n in names)
        + " |"
    )
    out.append("|---" * (2 + len(names)) + "|")
    for g in GROUP_NAMES:
        s = STUDY_BEST[g]
        cells = [f"{s['recall']:.2f} / {s['precision']:.2f} / {s['npv']:.2f}"]
        for r in rows:
            m = r["per_group"][g]
            cells.append(f"{m['recall']:.3f} / {m['precision']:.3f} / {m['npv']:.3f}")
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    out.append("| group accuracy | - | " + " | ".join(f"{r['group_acc']:.4f}" for r in rows) + " |")
    out += ["", "## Models", ""]
    out.append(
        "| model | weights | trained | batch / lr | epochs (cap) | best epoch | train s | train img/s "
        "| val group acc | params | size MB | test inference s (images) | test img/s |"
    )
    out.append("|---" * 13 + "|")
    st = STUDY_SCORING
    out.append(
        f"| study: mobilenet_v2_full | ImageNet | {st['device']} | 16 / 5e-05 | - | - | - | - | - | - | - "
        f"| {st['wall_s']:.1f} ({st['n_images']:,}) | {st['n_images'] / st['wall_s']:.0f} |"
    )
    for r in rows:
        out.append(
            f"| {r['experiment']} | {r['weights']} | {r['device']} {r['precision']} | {r['batch_size']} / {r['lr']:.3g} "
            f"| {r['epochs_run']} ({r['epoch_cap']}){' early stop' if r['stopped_early'] else ''} | {r['best_epoch']} "
            f"| {r['train_s']:.0f} | {_f(r['train_images_per_s'], ',.0f')} | {r['val_group_acc']:.4f} | {r['params']:,} "
            f"| {r['size_mb']:.1f} | {r['test_wall_s']:.2f} ({r['test_images']:,}) | {r['test_images'] / r['test_wall_s']:,.0f} |"
        )
    out += ["", "## Energy (codecarbon; NVML's GPU counter beside it)", ""]
    out.append(
        "| model | phase | s | CPU W | GPU W | RAM W | kWh | kWh / 1000 img | NVML GPU W mean / max | NVML GPU kWh "
        "| how codecarbon measured |"
    )
    out.append("|---" * 11 + "|")
    for r in rows:
        for phase in ("train", "test"):
            e = r[f"energy_{phase}"]
            out.append(
                f"| {r['experiment']} | {phase} | {e['duration_s']:.1f} | {e['cpu_power_w']:.1f} | {e['gpu_power_w']:.1f} "
                f"| {e['ram_power_w']:.1f} | {e['energy_kwh']:.6f} | {_f(e['kwh_per_1000_images'], '.2e')} "
                f"| {_f(e['nvml_gpu_w_mean'], '.0f')} / {_f(e['nvml_gpu_w_max'], '.0f')} | {_f(e['nvml_gpu_kwh'], '.6f')} "
                f"| {e['power_method']} |"
            )
    out += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in header.items()]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main


def _subset_test(data: dict[str, Any], n: int, seed: int) -> None:
    from zalando.train import stratified_subset

    idx = stratified_subset(data["y_test"], n, seed)
    data["x_test"], data["y_test"] = data["x_test"][idx], data["y_test"][idx]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    phases = Phases()
    with phases("start"):
        import torch

        from zalando.models.hardware import resolve_device

        has_gpu = torch.cuda.is_available()
        smoke = args.smoke or not has_gpu
        if not has_gpu:
            print(
                f"# no CUDA GPU (torch {torch.__version__} sees none): the CPU smoke run instead, tables as on a GPU"
            )
        device = resolve_device("cpu" if smoke and not has_gpu else "auto")
        gpu_name = torch.cuda.get_device_name() if device.type == "cuda" else "-"
        plan = make_plan(args, smoke)
        print(f"# device {device.type} ({gpu_name}); {plan.recipe}; precision {args.precision}", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="paper-gpu-"))
    try:
        return _run(args, plan, device, gpu_name, work, phases)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, plan: Plan, device: Any, gpu_name: str, work: Path, phases: Phases) -> int:
    with phases("ingest"):
        data = ingest_dataset(data_source(args.data), work, args.seed)
        if plan.smoke:
            _subset_test(data, SMOKE["test"], args.seed)
    with phases("probe"):
        probes = {n: probe_epoch_s(s, plan, data, device, args.seed) for n, s in plan.specs.items()}
        left = args.budget_min * 60 - phases.elapsed()
        cap, why = cap_epochs(plan, probes, left, len(data["y_test"]), args.max_epochs)
        print(f"# epochs: {why}", flush=True)
    profile = plan.profile.model_copy(update={"max_epochs": cap})
    plan = Plan(profile, plan.specs, plan.recipe, plan.allow_download, plan.smoke)
    rows = []
    for name in plan.specs:
        with phases(f"train {name}"):
            trained = train_one(name, plan, data, device, args)
        with phases(f"test {name}"):
            tested = test_one(trained["result"], data, device, args)
        rows.append(model_row(name, trained, tested, cap))
    header = {
        "device": f"{device.type} ({gpu_name})", "torch": __import__("torch").__version__,
        "mode": "smoke (CPU-sized)" if plan.smoke else "full", "recipe": plan.recipe, "epochs": why,
        "profile": plan.profile.name, "budget_min": args.budget_min, "elapsed_s": round(phases.elapsed(), 1),
        "phases_s": {k: round(v, 1) for k, v in phases.seconds.items()},
    }  # fmt: skip
    md = tables(rows, header)
    print(md, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_gpu.md").write_text(md)
    (args.out / "paper_gpu.json").write_text(
        json.dumps({"run": header, "models": rows}, indent=2, default=str)
    )
    print(
        f"# wrote {args.out / 'paper_gpu.md'} and paper_gpu.json; total {phases.elapsed():.1f} s", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
