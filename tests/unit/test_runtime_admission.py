"""Reduced-precision runtimes: the int8 graph a bundle is built with, the verdicts on validation in its
card, and the champion loader scoring only with what they admit (issue 16)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import mini_split
from tests.scoring_support import mnist_like
from zalando import admission, registry
from zalando.admission import CARD_KEY, RuntimeCheckData, admit_runtimes
from zalando.errors import ConfigError, ModelError
from zalando.labels import GROUP_NAMES
from zalando.lake import Lake
from zalando.quantize import INT8_ONNX_FILE, SOURCE_SHA256_KEY
from zalando.runtime import RUNTIMES
from zalando.scoring import clear_predictor_cache, load_champion_predictor

MEAN, STD = 0.286, 0.353
VERSION = "20260101T000000Z-int8test"


@pytest.fixture(scope="module")
def mini() -> dict[str, np.ndarray]:
    return mini_split()


@pytest.fixture(scope="module")
def trained(mini: dict[str, np.ndarray]) -> Any:
    """fashion_cnn trained by the quick profile (one epoch on a few hundred images)."""
    import torch

    from zalando.models import load_catalog
    from zalando.train import train_experiment

    torch.set_num_threads(1)
    cat = load_catalog()
    return train_experiment(
        cat.experiment("fashion_cnn"), cat.profile("quick"), mini, MEAN, STD, seed=0, threads=1
    )


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_predictor_cache()


def _champion(lake: Lake, trained: Any, checks: RuntimeCheckData | None) -> str:
    """Build, save, register and promote the quick-trained bundle (with or without runtime checks)."""
    from zalando.models import build_bundle, save_bundle

    bundle = build_bundle(trained, mean=MEAN, std=STD, dataset_version="dv-test", model_version=VERSION)
    key = save_bundle(lake, bundle, runtime_checks=checks)
    registry.register_model(
        lake, model_version=VERSION, experiment=bundle.experiment, metrics={},
        spec=bundle.spec.model_dump(mode="json"), dataset_version="dv-test", code_version="test", bundle_key=key,
    )  # fmt: skip
    registry.promote(lake, VERSION, reason="test", actor="test")
    return key


def _card(lake: Lake, key: str) -> dict[str, Any]:
    return json.loads(lake.read_file(key, "model_card.json"))


def _recommit(lake: Lake, key: str, drop: tuple[str, ...] = (), **changes: bytes) -> None:
    files = {n: lake.read_file(key, n) for n in lake.read_manifest(key)["files"] if n not in drop}
    files.update(changes)
    lake.commit_files(key, files, "tamper")


class _Rolled:
    """A runtime that gets the groups wrong: each row's probabilities shifted by one group."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.runtime, self.parallelism = inner, inner.runtime, inner.parallelism

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, emb = self.inner.predict(images)
        return np.roll(probs, 1, axis=1), emb


def _patch_runtimes(monkeypatch: pytest.MonkeyPatch, replace: dict[str, Callable[[dict], Any]]) -> None:
    """The runtimes a build checks, some replaced: ``{name: lambda predictors: predictor}``."""
    from zalando.models import predictor

    real = predictor.runtime_predictors

    def patched(*args: Any, **kw: Any) -> dict[str, Any]:
        predictors = real(*args, **kw)
        return {**predictors, **{name: make(predictors) for name, make in replace.items()}}

    monkeypatch.setattr(predictor, "runtime_predictors", patched)


def _native_bf16() -> bool:
    from zalando.models.hardware import native_bf16

    return native_bf16("cpu")


def test_the_bundle_holds_an_int8_graph_that_scores_like_fp32(
    tmp_path: Path, trained: Any, mini: dict[str, np.ndarray]
) -> None:
    import onnx

    from zalando.models import load_bundle, load_int8_onnx_bytes, load_onnx_bytes, make_predictor

    assert "onnx-int8" in RUNTIMES
    lake = Lake.local(tmp_path / "lake")
    key = _champion(lake, trained, RuntimeCheckData.from_training(mini))
    assert INT8_ONNX_FILE in lake.read_manifest(key)["files"]
    card = _card(lake, key)
    assert card["size_mb"]["onnx_int8"] < card["size_mb"]["onnx"]  # int8 weights

    int8_bytes = load_int8_onnx_bytes(lake, "fashion_cnn", VERSION)
    graph = onnx.load_from_string(int8_bytes)
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Softmax", "ReduceSum"} <= ops
    assert [i.name for i in graph.graph.input] == ["pixels"]
    assert [o.name for o in graph.graph.output] == ["group_probs", "embedding"]
    # the softmax and the group sums stay fp32: nothing quantized feeds them
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    assert all(
        producers.get(i) != "DequantizeLinear"
        for n in graph.graph.node
        if n.op_type == "Softmax"
        for i in n.input
    )
    assert {p.key for p in graph.metadata_props} >= {SOURCE_SHA256_KEY}

    bundle = load_bundle(lake, "fashion_cnn", VERSION)
    int8 = make_predictor(bundle, int8_bytes, "onnx-int8", threads=1)
    fp32 = make_predictor(bundle, load_onnx_bytes(lake, "fashion_cnn", VERSION), "onnx", threads=1)
    assert int8.runtime == "onnx-int8"
    p8, e8 = int8.predict(mini["x_val"])
    p32, e32 = fp32.predict(mini["x_val"])
    assert p8.shape == p32.shape and e8.shape == e32.shape
    np.testing.assert_allclose(p8.sum(1), 1.0, atol=1e-5)
    assert np.abs(p8 - p32).mean() < 0.01 and np.abs(p8 - p32).max() < 0.15
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 0.97
    assert np.abs(p8 - p32).max() > 0  # really ran in int8
    with pytest.raises(ConfigError, match="model.int8.onnx"):
        make_predictor(bundle, None, "onnx-int8")


def test_the_card_holds_each_runtimes_verdict_on_validation(
    tmp_path: Path, trained: Any, mini: dict[str, np.ndarray]
) -> None:
    lake = Lake.local(tmp_path / "lake")
    entry = _card(lake, _champion(lake, trained, RuntimeCheckData.from_training(mini)))[CARD_KEY]
    expected = {"torch", "onnx", "onnx-int8"} | ({"torch-bf16"} if _native_bf16() else set())
    assert set(entry["runtimes"]) == expected
    assert (entry["reference"], entry["max_drop_points"], entry["val_images"]) == ("torch", 0.05, 500)
    ref = entry["runtimes"]["torch"]["val_group_acc"]
    assert 0.2 < ref <= 1.0
    for name, verdict in entry["runtimes"].items():
        assert verdict["diff_points"] == pytest.approx((verdict["val_group_acc"] - ref) * 100, abs=1e-3)
        reduced = name in ("onnx-int8", "torch-bf16")
        assert verdict["admitted"] == (not reduced or ref - verdict["val_group_acc"] <= 0.0005 + 1e-9)
    assert entry["runtimes"]["onnx"]["diff_points"] == 0  # fp32 ONNX is torch to 1e-4


def test_admission_threshold_is_0_05_points_of_grouped_accuracy() -> None:
    """1 wrong of 2,000 is exactly 0.05 points: admitted; 2 wrong is not."""
    y = np.zeros(2000, dtype=np.int64)  # label 0 (T-shirt/top): group 0

    class Fixed:
        runtime, parallelism = "fixed", 1

        def __init__(self, wrong: int) -> None:
            self.wrong = wrong

        def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            probs = np.zeros((len(images), len(GROUP_NAMES)), np.float32)
            probs[:, 0] = 1.0
            probs[: self.wrong] = np.roll(probs[: self.wrong], 1, axis=1)
            return probs, np.zeros((len(images), 2), np.float32)

    x = np.zeros((2000, 28, 28), np.uint8)
    result = admit_runtimes({"torch": Fixed(0), "onnx-int8": Fixed(1), "torch-bf16": Fixed(2)}, x, y)
    assert admission.MAX_ACCURACY_DROP == 0.0005
    assert result.runtimes["onnx-int8"].admitted and result.runtimes["onnx-int8"].diff_points == -0.05
    assert not result.runtimes["torch-bf16"].admitted and result.runtimes["torch-bf16"].diff_points == -0.1
    assert result.admits("torch") and result.admits("onnx-int8") and not result.admits("torch-bf16")
    assert not result.admits("tensorrt")
    line = result.refusal("torch-bf16")
    assert (
        "torch-bf16 is not admitted" in line and "0.9990 vs fp32 (torch) 1.0000" in line and "\n" not in line
    )


@pytest.mark.parametrize("runtime", ["onnx-int8", "torch-bf16"])
def test_a_runtime_that_loses_accuracy_is_not_admitted_nor_chosen(
    runtime: str, tmp_path: Path, trained: Any, mini: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando.models import hardware

    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)  # bf16 built and offered
    lake = Lake.local(tmp_path / "lake")
    # the other reduced-precision runtime scores exactly like fp32: admitted whatever the tiny model does
    other = "torch-bf16" if runtime == "onnx-int8" else "onnx-int8"
    same = "torch" if other == "torch-bf16" else "onnx"
    _patch_runtimes(monkeypatch, {runtime: lambda p: _Rolled(p[runtime]), other: lambda p: p[same]})
    key = _champion(lake, trained, RuntimeCheckData.from_training(mini))
    verdicts = _card(lake, key)[CARD_KEY]["runtimes"]
    assert not verdicts[runtime]["admitted"] and verdicts[runtime]["diff_points"] < -5
    assert verdicts[other]["admitted"] and verdicts[other]["diff_points"] == 0

    auto = load_champion_predictor(lake, "auto", threads=1)
    assert runtime not in auto.timings and other in auto.timings
    assert auto.checks["runtime_admission"][runtime] is False
    with pytest.raises(ModelError, match=rf"runtime {runtime} is not admitted for this model: validation grouped "
                       r"accuracy 0\.\d{4} vs fp32 \(torch\) 0\.\d{4}") as err:  # fmt: skip
        load_champion_predictor(lake, runtime, threads=1)
    assert "\n" not in str(err.value)
    chosen = load_champion_predictor(lake, other, threads=1)
    assert chosen.runtime == other
    np.testing.assert_allclose(chosen.predict(mnist_like(8))[0].sum(1), 1.0, atol=1e-5)


def test_an_admitted_int8_runtime_is_measured_and_scores_torch_free(
    tmp_path: Path, trained: Any, mini: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = Lake.local(tmp_path / "lake")
    monkeypatch.setattr(admission, "MAX_ACCURACY_DROP", 1.0)  # the tiny model's int8 admitted for sure
    key = _champion(lake, trained, RuntimeCheckData.from_training(mini))
    assert _card(lake, key)[CARD_KEY]["runtimes"]["onnx-int8"]["admitted"]
    auto = load_champion_predictor(lake, "auto", threads=1)
    assert {"onnx", "torch", "onnx-int8"} <= set(auto.timings)
    assert auto.runtime == min(auto.timings, key=auto.timings.__getitem__)  # picked by timing, as ever
    clear_predictor_cache()  # (auto's choice is cached under its runtime's name too)
    int8 = load_champion_predictor(lake, "onnx-int8", threads=1)
    assert (int8.runtime, int8.checks["verify"]) == ("onnx-int8", "light")
    p8, _ = int8.predict(mini["x_val"][:64])
    p32, _ = load_champion_predictor(lake, "onnx", threads=1).predict(mini["x_val"][:64])
    assert np.abs(p8 - p32).max() < 0.15

    # an int8 graph that was not quantized from this bundle's model.onnx is refused
    import onnx

    graph = onnx.load_from_string(lake.read_file(key, INT8_ONNX_FILE))
    next(p for p in graph.metadata_props if p.key == SOURCE_SHA256_KEY).value = "0" * 64
    _recommit(lake, key, **{INT8_ONNX_FILE: graph.SerializeToString()})
    clear_predictor_cache()
    with pytest.raises(ModelError, match="not quantized from this bundle's model.onnx"):
        load_champion_predictor(lake, "onnx-int8", threads=1)


def test_int8_kernels_are_read_off_the_cpu_flags() -> None:
    avx2 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma avx512f avx512bw\n"
    assert admission.int8_kernels(avx2, "x86_64") == "x86-no-vnni"
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert admission.int8_kernels(avx2.replace("fma", f"fma {flag}"), "x86_64") == "x86-vnni"
    assert admission.int8_kernels("processor\t: 0\n", "x86_64") == "x86"  # flags unreadable
    assert admission.int8_kernels(avx2, "aarch64") == "aarch64"
    import platform

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None
    assert admission.int8_kernels() == admission.int8_kernels(cpuinfo, platform.machine())  # this CPU's


@pytest.mark.parametrize("kernels", ["x86-no-vnni", "x86-vnni"])
def test_int8_weights_are_7_bit_where_the_int8_kernels_saturate(
    kernels: str, tmp_path: Path, trained: Any, mini: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without VNNI, pairs of uint8 x int8 products are summed in 16 bits: 7-bit weights keep them in range."""
    import onnx
    from onnx import numpy_helper

    from zalando import quantize

    lake = Lake.local(tmp_path / "lake")
    fp32 = lake.read_file(_champion(lake, trained, None), "model.onnx")
    monkeypatch.setattr(quantize, "int8_kernels", lambda *a, **k: kernels)
    graph = onnx.load_from_string(quantize.quantize_int8(fp32, mini["x_train"][:64]))
    weights = [
        numpy_helper.to_array(t) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8
    ]
    top = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert top <= 64 if kernels == "x86-no-vnni" else top > 64


def test_int8_admitted_on_other_int8_kernels_is_not_offered_on_this_cpu(
    tmp_path: Path, trained: Any, mini: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """VNNI and non-VNNI CPUs sum int8 products differently: a verdict holds on its own kernels only."""
    lake = Lake.local(tmp_path / "lake")
    monkeypatch.setattr(admission, "MAX_ACCURACY_DROP", 1.0)  # the tiny model's int8 admitted for sure
    monkeypatch.setattr(admission, "int8_kernels", lambda *a, **k: "x86-vnni")  # the building machine
    key = _champion(lake, trained, RuntimeCheckData.from_training(mini))
    entry = _card(lake, key)[CARD_KEY]
    assert entry["int8_kernels"] == "x86-vnni" and entry["runtimes"]["onnx-int8"]["admitted"]
    assert "onnx-int8" in load_champion_predictor(lake, "auto", threads=1).timings

    monkeypatch.setattr(admission, "int8_kernels", lambda *a, **k: "x86-no-vnni")  # a scoring machine
    clear_predictor_cache()
    auto = load_champion_predictor(lake, "auto", threads=1)
    assert "onnx-int8" not in auto.timings and "onnx" in auto.timings
    assert auto.checks["runtime_admission"]["onnx-int8"] == "admitted on x86-vnni int8 kernels only"
    with pytest.raises(ModelError, match=r"runtime onnx-int8 was admitted on a CPU with x86-vnni int8 "
                       r"kernels; this CPU has x86-no-vnni, where its accuracy was not checked") as err:  # fmt: skip
        load_champion_predictor(lake, "onnx-int8", threads=1)
    assert "\n" not in str(err.value)

    # a card from before the kernels were recorded admits int8 as it did
    old = admission.RuntimeAdmission.model_validate({k: v for k, v in entry.items() if k != "int8_kernels"})
    assert old.int8_kernels is None and old.admits_here("onnx-int8", "x86-no-vnni")


def test_a_bundle_without_verdicts_never_scores_int8(
    tmp_path: Path, trained: Any, mini: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando.models import load_int8_onnx_bytes

    lake = Lake.local(tmp_path / "lake")
    key = _champion(lake, trained, None)  # as bundles were built before the verdicts
    assert INT8_ONNX_FILE not in lake.read_manifest(key)["files"] and CARD_KEY not in _card(lake, key)
    auto = load_champion_predictor(lake, "auto", threads=1)
    expected = {"onnx", "torch"} | ({"torch-bf16"} if _native_bf16() else set())  # bf16: the warm-up check
    assert set(auto.timings) == expected
    assert auto.checks["runtime_admission"].startswith("none")
    with pytest.raises(
        ModelError, match="onnx-int8 is not admitted for this model: it was built without runtime"
    ):
        load_champion_predictor(lake, "onnx-int8", threads=1)
    with pytest.raises(ModelError, match="has no model.int8.onnx"):
        load_int8_onnx_bytes(lake, "fashion_cnn", VERSION)

    # even with an int8 graph in the bundle (one admitted, then its card entry gone): never int8
    monkeypatch.setattr(admission, "MAX_ACCURACY_DROP", 1.0)
    key = _champion(lake, trained, RuntimeCheckData.from_training(mini))
    card = _card(lake, key)
    del card[CARD_KEY]
    _recommit(lake, key, **{"model_card.json": json.dumps(card).encode()})
    clear_predictor_cache()
    assert "onnx-int8" not in load_champion_predictor(lake, "auto", threads=1).timings
    with pytest.raises(ModelError, match="built without runtime checks"):
        load_champion_predictor(lake, "onnx-int8", threads=1)
