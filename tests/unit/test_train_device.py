"""The engine's device path: precision per device, the gradient scaler, the loader, no per-step sync.

Everything here runs on the CPU (the CUDA code paths are the same functions with another device);
the tests marked ``cuda`` also run where torch sees a GPU and check the GPU against the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from zalando.augment import apply_augment, augment_batch, draw_augment
from zalando.models import hardware
from zalando.models.experiments import AUGMENT_PRESETS, ExperimentSpec, ProfileParams
from zalando.train import (
    EpochLoader,
    EpochReporter,
    TrainingLoss,
    make_optimizer,
    train_experiment,
    train_one_epoch,
)
from zalando.validation import predict_logits

PROFILE = ProfileParams(
    name="tiny", experiments=("t",), max_train_images=120, max_val_images=60, pretrained=False
)
MEAN, STD = 0.2, 0.3
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def spec(**kw: object) -> ExperimentSpec:
    base = dict(
        name="t", architecture="fashion_cnn", arch_params={"c1": 4, "c2": 8, "c3": 8, "n2": 1, "n3": 1, "embed_dim": 8},
        input_size=28, batch_size=30, epochs=2, lr=1e-2, scheduler="none", early_stopping_patience=5,
        augmentation="strong",
    )  # fmt: skip
    base.update(kw)
    return ExperimentSpec(**base)


def data(n_train: int = 120, n_val: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    """Noise with a bright bar whose row is the label (as test_train's generated data)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_train + n_val) % 10
    x = rng.integers(0, 80, size=(len(y), 28, 28), dtype=np.uint8)
    for i, c in enumerate(y):
        x[i, 2 * c + 2 : 2 * c + 7, 3:25] = 230
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train:], "y_val": y[n_train:]}


# ----------------------------------------------------------------------------- precision and device


def test_auto_precision_on_a_gpu_is_bf16_where_it_is_native_else_fp16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu = torch.device("cuda")  # only a name: nothing here touches a GPU
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)
    assert hardware.resolve_precision("auto", gpu) == "bf16"
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    assert hardware.resolve_precision("auto", gpu) == "fp16"  # V100 / T4: fp16 with a gradient scaler
    assert hardware.resolve_precision("auto", "cpu") == "fp32"  # a CPU without bf16 keeps fp32
    assert hardware.resolve_precision("fp32", gpu) == "fp32"  # asked for by name: honoured
    with pytest.raises(Exception, match="precision must be one of auto, fp32, bf16"):
        hardware.resolve_precision("fp16", gpu)  # a spec cannot ask for fp16 by name


def test_amp_dtypes_and_the_gradient_scaler() -> None:
    assert hardware.amp_dtype("fp32") is None
    assert hardware.amp_dtype("bf16") is torch.bfloat16 and hardware.amp_dtype("fp16") is torch.float16
    assert hardware.make_grad_scaler("bf16", torch.device("cpu")) is None  # bf16 has fp32's range
    assert hardware.make_grad_scaler("fp32", torch.device("cpu")) is None
    scaler = hardware.make_grad_scaler("fp16", torch.device("cpu"))
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


def test_on_the_cpu_to_device_is_the_tensor_itself_and_cudnn_is_left_alone() -> None:
    t = torch.arange(6, dtype=torch.uint8)
    assert hardware.to_device(t, torch.device("cpu")) is t  # no copy, no pinning
    before = torch.backends.cudnn.benchmark
    hardware.configure_backend(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark == before


# ----------------------------------------------------------------------------- the loader


def test_augmentation_is_drawn_once_and_applied_anywhere() -> None:
    x = torch.rand(12, 1, 28, 28)
    pol = AUGMENT_PRESETS["strong"]
    draw = draw_augment(12, 28, 28, pol, torch.Generator().manual_seed(5))
    assert draw.flip.shape == (12,) and draw.theta.shape == (12, 2, 3) and draw.erase.shape == (12, 5)
    assert torch.equal(apply_augment(x, draw), augment_batch(x, pol, torch.Generator().manual_seed(5)))
    plain = draw_augment(12, 28, 28, AUGMENT_PRESETS["none"], torch.Generator().manual_seed(5))
    assert plain.flip is None and plain.theta is None and plain.erase is None
    assert torch.equal(apply_augment(x, plain), x)
    flip_only = draw_augment(12, 28, 28, AUGMENT_PRESETS["flip"], torch.Generator().manual_seed(5))
    got = apply_augment(x, flip_only)
    for i in range(12):  # each image is itself or its mirror, as the draw says
        assert torch.equal(got[i], x[i].flip(-1) if flip_only.flip[i] else x[i])


def test_the_loader_casts_uint8_on_the_device_and_drops_the_ragged_tail() -> None:
    d = data(n_train=70)
    x = torch.from_numpy(d["x_train"])[:, None]
    y = torch.from_numpy(d["y_train"])
    loader = EpochLoader(x, y, 30, AUGMENT_PRESETS["none"], MEAN, STD, torch.device("cpu"), seed=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 2  # 70 // 30: the last 10 images wait for another epoch
    xb, yb, wb = batches[0]
    assert wb is None  # no sample weights given: none per batch
    assert xb.dtype == torch.float32 and xb.shape == (30, 1, 28, 28) and yb.dtype == torch.int64
    assert xb.is_contiguous(memory_format=torch.channels_last)
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(1))[:30]
    assert torch.equal(yb, y[perm])
    assert torch.allclose(xb, (x[perm].float() / 255 - MEAN) / STD)
    again = list(EpochLoader(x, y, 30, AUGMENT_PRESETS["strong"], MEAN, STD, torch.device("cpu"), seed=1))
    other = list(EpochLoader(x, y, 30, AUGMENT_PRESETS["strong"], MEAN, STD, torch.device("cpu"), seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, other, strict=True))


# ----------------------------------------------------------------------------- one epoch


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def _loader(n: int = 90) -> EpochLoader:
    d = data(n_train=n)
    return EpochLoader(
        torch.from_numpy(d["x_train"])[:, None], torch.from_numpy(d["y_train"]), 30, AUGMENT_PRESETS["light"],
        MEAN, STD, torch.device("cpu"), seed=2,
    )  # fmt: skip


def test_the_running_loss_is_read_only_when_someone_asks() -> None:
    torch.manual_seed(0)
    net, loss_fn = _tiny_net(), TrainingLoss("labels", None, None, 0.0, 0.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    seen_calls: list[tuple[int, int]] = []
    means: list[float] = []

    def on_batch(step: int, running_loss, seen: int) -> None:  # noqa: ANN001
        seen_calls.append((step, seen))
        means.append(running_loss())

    stats = train_one_epoch(net, loss_fn, opt, _loader(), torch.device("cpu"), on_batch=on_batch)
    assert seen_calls == [(0, 30), (1, 60), (2, 90)] and stats.images == 90
    assert means[-1] == stats.train_loss and all(math.isfinite(m) for m in means)

    reads: list[int] = []
    reporter = EpochReporter(spec(), 0, steps=3, batch_size=30, n_val=60, progress=None)
    reporter.last = reporter.t0 + 1e9  # nothing is due before the last step
    for step in range(3):
        reporter(step, lambda step=step: reads.append(step) or 1.0, (step + 1) * 30)
    assert reads == [2]  # the GPU is waited for once an epoch, not once a step


def test_an_fp16_epoch_with_a_gradient_scaler_learns_on_the_cpu() -> None:
    torch.manual_seed(0)
    net, loss_fn = _tiny_net(), TrainingLoss("labels", None, None, 0.0, 0.0)
    opt = make_optimizer(spec(optimizer="adam", lr=3e-3), list(net.parameters()), fused=True)
    assert opt.defaults["fused"] is True
    scaler = hardware.make_grad_scaler("fp16", torch.device("cpu"))
    first = train_one_epoch(
        net, loss_fn, opt, _loader(), torch.device("cpu"), amp_dtype=torch.float16, scaler=scaler
    )
    for _ in range(4):
        last = train_one_epoch(
            net, loss_fn, opt, _loader(), torch.device("cpu"), amp_dtype=torch.float16, scaler=scaler
        )
    assert math.isfinite(first.train_loss) and last.train_loss < first.train_loss
    assert scaler.get_scale() > 0 and all(p.dtype == torch.float32 for p in net.parameters())


# ----------------------------------------------------------------------------- whole runs


def test_fp16_training_resumes_with_its_scaler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fp16 path (a GPU without bf16) end to end on the CPU: the scaler is checkpointed and restored."""
    import zalando.train as train

    scalers: list[torch.amp.GradScaler] = []

    def doubling_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
        # from 1, doubled after every step: the scale counts the steps it has seen
        scalers.append(torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(train, "resolve_precision", lambda precision, device: "fp16")
    monkeypatch.setattr(train, "make_grad_scaler", doubling_scaler)
    kw = dict(seed=1, threads=1, device="cpu", checkpoint_dir=tmp_path)
    full = train_experiment(spec(epochs=3), PROFILE, data(), MEAN, STD, seed=1, threads=1, device="cpu")
    assert full.precision == "fp16" and all(math.isfinite(h["train_loss"]) for h in full.history)
    assert scalers[-1].get_scale() == 2.0**12  # 3 epochs of 120 // 30 steps, none skipped

    def kill_in_epoch_2(info: dict) -> None:
        if info["event"] == "epoch" and info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_experiment(spec(epochs=3), PROFILE, data(), MEAN, STD, progress=kill_in_epoch_2, **kw)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (
        ck["epoch"] == 0 and ck["scaler"]["scale"] == 2.0**4
    )  # the epoch-2 event comes before its checkpoint
    resumed = train_experiment(spec(epochs=3), PROFILE, data(), MEAN, STD, **kw)
    assert resumed.resumed_from_epoch == 0
    assert scalers[-1].get_scale() == 2.0**12  # restored at 2**4, then 8 more steps
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]


def test_compile_model_trains_through_the_compiled_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile is only wired in (a stub stands in for it: compiling costs tens of seconds here)."""
    import zalando.train as train

    calls: list[int] = []

    class Compiled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return self.inner(x)

    monkeypatch.setattr(train.torch, "compile", lambda model, **kw: Compiled(model))
    kw = dict(seed=1, threads=1, device="cpu")
    compiled = train_experiment(spec(), PROFILE, data(), MEAN, STD, compile_model=True, **kw)
    eager = train_experiment(spec(), PROFILE, data(), MEAN, STD, **kw)
    assert len(calls) == 2 * 4  # 2 epochs of 120 // 30 steps; validation and scoring stay eager
    assert [h["val_loss"] for h in compiled.history] == [h["val_loss"] for h in eager.history]
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # no wrapper in the bundle


# ----------------------------------------------------------------------------- on a GPU


@cuda
def test_on_a_gpu_the_loader_gives_the_cpus_batches() -> None:
    d = data()
    x, y = torch.from_numpy(d["x_train"])[:, None], torch.from_numpy(d["y_train"])
    gpu = torch.device("cuda")
    pol = AUGMENT_PRESETS["strong"]
    on_cpu = list(EpochLoader(x, y, 30, pol, MEAN, STD, torch.device("cpu"), seed=4))
    on_gpu = list(
        EpochLoader(hardware.to_device(x, gpu), hardware.to_device(y, gpu), 30, pol, MEAN, STD, gpu, seed=4)
    )
    for (xc, yc), (xg, yg) in zip(on_cpu, on_gpu, strict=True):
        assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
        assert torch.allclose(xc, xg.cpu(), atol=1e-3)  # grid sampling may round differently


@cuda
def test_on_a_gpu_training_is_mixed_precision_and_returns_a_cpu_model() -> None:
    res = train_experiment(spec(precision="auto"), PROFILE, data(), MEAN, STD, seed=0, device="cuda")
    assert res.device == "cuda" and res.precision in ("bf16", "fp16")
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in res.model.parameters())
    assert all(math.isfinite(h["train_loss"]) for h in res.history)
    assert torch.backends.cudnn.benchmark
    x = data()["x_val"]
    on_cpu = predict_logits(res.model, x, MEAN, STD)
    on_gpu = predict_logits(res.model.to("cuda"), x, MEAN, STD)
    assert torch.allclose(on_cpu, on_gpu, atol=1e-2, rtol=1e-2)  # cuDNN convolutions run in TF32


@cuda
def test_on_a_gpu_an_epoch_waits_for_the_gpu_only_when_it_ends() -> None:
    import warnings

    from zalando.train import select_training_data, setup_training

    gpu = torch.device("cuda")
    s = spec(precision="auto", augmentation="strong", group_loss_weight=1.0)
    train = select_training_data(data(), PROFILE, "labels", MEAN, STD, seed=0)
    setup = setup_training(s, PROFILE, train, seed=0, device=gpu, lake=None, allow_download=False)
    x, y = hardware.to_device(train.x_train, gpu), hardware.to_device(train.y_train, gpu)

    def epoch() -> None:
        loader = EpochLoader(x, y, setup.batch_size, s.augmentation, MEAN, STD, gpu, seed=0)
        train_one_epoch(
            setup.model,
            setup.loss_fn,
            setup.optimizer,
            loader,
            gpu,
            amp_dtype=setup.amp_dtype,
            scaler=setup.scaler,
        )

    epoch()  # cuDNN's autotuning and the allocator's first blocks
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 2, [str(w.message) for w in syncs]  # the loss and accuracy read at the end


def test_the_gpu_benchmark_caps_epochs_to_its_budget() -> None:
    """benchmarks/paper_gpu.py has one try on a GPU: its epoch cap must keep the run inside the budget."""
    from benchmarks.paper_gpu import cap_epochs, make_plan, parse_args

    plan = make_plan(parse_args([]), smoke=False)
    assert {s.batch_size for s in plan.specs.values()} == {16} and "the study's recipe" in plan.recipe
    probe = {"epoch_s": 20.0, "step_s": 0.006, "timed_steps": 50, "val_img_s": 1e-4, "n_val": 12_000}
    probes = {"a": probe, "b": {**probe, "epoch_s": 10.0}}
    epochs, why = cap_epochs(plan, probes, left_s=600.0, n_test=10_000, max_epochs=None)
    after = 2 * (12_000 * 1e-4 * 2 + 10_000 * 1e-4 * 3 + 5.0)
    assert int((0.9 * 600 - after) // 30) == 17 and epochs == 15 and "CAPPED" not in why  # the recipe's 15
    epochs, why = cap_epochs(plan, probes, left_s=300.0, n_test=10_000, max_epochs=None)
    assert epochs * 30 + after <= 300 and epochs == 8 and "CAPPED from 15" in why
    assert cap_epochs(plan, probes, left_s=300.0, n_test=10_000, max_epochs=3)[0] == 3
    epochs, why = cap_epochs(plan, probes, left_s=10.0, n_test=10_000, max_epochs=None)
    assert epochs == 1 and "overrun" in why
    fast = make_plan(parse_args(["--fast"]), smoke=False)
    assert {s.batch_size for s in fast.specs.values()} == {128}
    assert all(s.lr == pytest.approx(5e-5 * 8**0.5) for s in fast.specs.values()) and "--fast" in fast.recipe
