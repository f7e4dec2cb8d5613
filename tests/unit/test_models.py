"""Architecture registry, experiment specs/profiles/files and weights handling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch

from zalando.errors import ConfigError, ModelError
from zalando.models import ARCHITECTURES, ModelBundle, build_model, count_macs, load_catalog, resolve_spec
from zalando.models.experiments import NUMERIC_FIELDS, PROFILE_NAMES, ExperimentSpec, get_experiment
from zalando.models.weights import imagenet_weights_file, init_weights
from zalando.settings import Profile


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("size", [28, 40])
def test_every_architecture_gives_logits_and_embedding(arch: str, size: int) -> None:
    torch.manual_seed(0)
    net = build_model(arch, num_classes=10, input_size=size).eval()
    with torch.no_grad():
        logits, emb = net.forward_both(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    assert emb.ndim == 2 and emb.shape[0] == 3 and emb.shape[1] >= 16
    assert torch.isfinite(logits).all()


def test_input_size_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="input_size"):
        build_model("fashion_cnn", 10, 300)


def test_unknown_architecture_lists_choices() -> None:
    with pytest.raises(ConfigError, match="mobilenet_v2.*resnet18"):
        build_model("vgg99", 10, 28)


def test_count_macs_of_a_known_net() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 28 * 28, 10)
    )
    assert count_macs(net) == 28 * 28 * 4 * 9 + 4 * 28 * 28 * 10


def test_builtin_catalogue_has_the_study_and_ours() -> None:
    cat = load_catalog()
    for name in (
        "mobilenet_v2_frozen",
        "mobilenet_v2_frozen_aug",
        "mobilenet_v2_full",
        "squeezenet1_1_full",
        "resnet18_full",
    ):
        spec = cat.experiment(name)
        assert spec.weights == "imagenet" and spec.input_size == 224 and spec.batch_size == 16
        assert spec.optimizer == "adam" and spec.lr == 5e-5 and spec.weight_decay == 0.01
        assert (spec.scheduler, spec.plateau_patience, spec.plateau_factor) == ("plateau", 3, 0.3)
        assert (spec.early_stopping_patience, spec.min_delta, spec.epochs) == (3, 1e-4, 15)
        assert spec.class_weighting == "balanced"
    assert cat.experiment("mobilenet_v2_frozen").freeze == "backbone"
    assert cat.experiment("mobilenet_v2_frozen_aug").augmentation.active
    assert any(s.architecture == "fashion_cnn" for s in cat.experiments.values())
    assert set(cat.profiles) == {"paper", "cpu", "quick"}
    assert tuple(cat.profiles) == PROFILE_NAMES == get_args(Profile)  # one list of profile names


def test_unknown_experiment_lists_valid_choices() -> None:
    with pytest.raises(ConfigError, match="unknown experiment 'nope'.*mobilenet_v2_full"):
        get_experiment("nope")
    with pytest.raises(ConfigError, match="unknown profile.*paper, cpu, quick"):
        load_catalog().profile("gpu")


def test_profiles_change_only_numbers() -> None:
    cat = load_catalog()
    for name, spec in cat.experiments.items():
        resolved = [resolve_spec(spec, p).model_dump() for p in cat.profiles.values()]
        for r in resolved:
            for k, v in r.items():
                if k not in NUMERIC_FIELDS and k != "profile":
                    assert v == spec.model_dump()[k], (name, k)
    quick = cat.resolved("mobilenet_v2_full", "quick")
    assert quick.input_size <= 32 and quick.epochs == 1
    assert cat.resolved("mobilenet_v2_full", "paper").input_size == 224


def test_experiments_file_adds_specs_and_profiles(tmp_path: Path) -> None:
    f = tmp_path / "extra.yaml"
    f.write_text(
        "experiments:\n"
        "  - name: my_cnn\n    extends: fashion_cnn\n    lr: 0.001\n    augmentation: strong\n"
        "  - name: my_sq\n    architecture: squeezenet1_1\n    input_size: 64\n"
        "profiles:\n  cpu:\n    add_experiments: [my_cnn]\n    max_epochs: 3\n"
    )
    cat = load_catalog(f)
    assert cat.experiment("my_cnn").lr == 0.001 and cat.experiment("my_cnn").architecture == "fashion_cnn"
    assert cat.experiment("my_cnn").augmentation.erase > 0
    assert "my_cnn" in cat.profile("cpu").experiments
    assert cat.resolved("my_cnn", "cpu").epochs == 3
    j = tmp_path / "extra.json"
    j.write_text(json.dumps([{"name": "j1", "architecture": "resnet18"}]))
    assert load_catalog(j).experiment("j1").architecture == "resnet18"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            "experiments:\n  - name: x\n    architecture: vgg\n",
            "architecture.*valid choices: fashion_cnn, mobilenet_v2",
        ),
        (
            "experiments:\n  - name: x\n    architecture: resnet18\n    augmentation: wild\n",
            "valid choices: none, flip",
        ),
        ("experiments:\n  - name: x\n    architecture: resnet18\n    optimizer: lbfgs\n", "optimizer"),
        ("experiments:\n  - name: x\n    architecture: resnet18\n    weights: http://x\n", "weights must be"),
        ("experiments:\n  - name: x\n    architecture: resnet18\n    lr: -1\n", "lr"),
        ("experiments:\n  - name: x\n    architecture: resnet18\n    colour: red\n", "colour"),
        ("profiles:\n  cpu:\n    add_experiments: [ghost]\n", "unknown experiment 'ghost'"),
        ("profiles:\n  cpu:\n    overrides: {fashion_cnn: {optimizer: 1}}\n", "non-numeric"),
        ("experiments: [\n", "cannot be parsed"),
    ],
)
def test_bad_experiments_file_is_a_config_error(tmp_path: Path, body: str, match: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_catalog(f)


def test_missing_experiments_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_catalog(tmp_path / "missing.yaml")


def _imagenet_spec(fallback: str | None) -> ExperimentSpec:
    return ExperimentSpec(
        name="sq",
        architecture="squeezenet1_1",
        weights="imagenet",
        weights_fallback=fallback,
        input_size=32,
        profile="paper",
    )


def test_imagenet_offline_fails_fast_naming_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _, fname = imagenet_weights_file("squeezenet1_1")
    net = build_model("squeezenet1_1", 10, 32)
    with pytest.raises(ModelError) as err:
        init_weights(net, _imagenet_spec(None), allow_download=False)
    assert fname in str(err.value) and str(tmp_path / "hub" / "checkpoints") in str(err.value)
    info = init_weights(net, _imagenet_spec("none"), allow_download=False)
    assert info.used == "none" and "fallback" in info.note and fname in info.note


def test_imagenet_weights_load_from_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import squeezenet1_1

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _, fname = imagenet_weights_file("squeezenet1_1")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(3)
    tv = squeezenet1_1(weights=None)
    torch.save(tv.state_dict(), tmp_path / "hub" / "checkpoints" / fname)
    net = build_model("squeezenet1_1", 10, 32)
    info = init_weights(net, _imagenet_spec(None), allow_download=False)
    assert info.used == "imagenet"
    assert torch.equal(net.body[0].weight, tv.features[0].weight)


def test_profile_without_pretrained_records_none() -> None:
    spec = load_catalog().resolved("mobilenet_v2_full", "cpu")
    info = init_weights(build_model("mobilenet_v2", 10, 32), spec, pretrained_allowed=False)
    assert info.requested == "imagenet" and info.used == "none" and "cpu" in info.note


@pytest.mark.parametrize("size", [28, 32])
def test_fashion_cnn_spatial_head_exports_to_onnx(size: int) -> None:
    from zalando.models import ModelBundle, export_onnx
    from zalando.models.bundle import check_onnx

    params = {"c1": 4, "c2": 8, "c3": 8, "pool_to": 3}
    spec = ExperimentSpec(
        name="x", architecture="fashion_cnn", arch_params=params, input_size=size, tta="hflip"
    )
    net = build_model("fashion_cnn", 10, size, params).eval()
    bundle = ModelBundle(spec=spec, model=net, mean=0.3, std=0.35, model_version="v", dataset_version="d")
    assert check_onnx(bundle, export_onnx(bundle)) < 1e-4


def test_make_predictor_gives_the_scoring_predictors_and_they_agree() -> None:
    """ONNX Runtime (streams, chunked) and torch agree to 1e-4; one runtime type, one class each."""
    import typing

    import numpy as np

    from zalando.models import ModelBundle
    from zalando.models.predictor import TorchPredictor, make_predictor
    from zalando.runtime import RUNTIMES, OnnxPredictor, Runtime

    assert typing.get_args(Runtime) == RUNTIMES
    params = {"c1": 4, "c2": 8, "c3": 8, "embed_dim": 8}
    spec = ExperimentSpec(name="x", architecture="fashion_cnn", arch_params=params, input_size=28)
    torch.manual_seed(0)
    net = build_model("fashion_cnn", 10, 28, params).eval()
    bundle = ModelBundle(spec=spec, model=net, mean=0.3, std=0.35, model_version="v", dataset_version="d")
    images = np.random.default_rng(0).integers(0, 256, size=(70, 28, 28), dtype=np.uint8)

    onnx = make_predictor(bundle, runtime="onnx", threads=2)  # exported now
    fp32 = make_predictor(bundle, runtime="torch", threads=1)
    assert isinstance(onnx, OnnxPredictor) and isinstance(fp32, TorchPredictor)
    assert (onnx.runtime, onnx.parallelism, fp32.runtime, fp32.parallelism) == ("onnx", 2, "torch", 1)
    p_onnx, e_onnx = onnx.predict(images)
    p_torch, e_torch = fp32.predict(images)
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4)
    np.testing.assert_allclose(e_onnx, e_torch, atol=1e-4 * max(1.0, float(np.abs(e_torch).max())))

    onnx.batch_size = 16  # 5 chunks, 2 at a time: the same rows in the same order
    p_chunked, e_chunked = onnx.predict(images.reshape(70, 784))
    np.testing.assert_allclose(p_chunked, p_onnx, atol=1e-6)
    np.testing.assert_allclose(e_chunked, e_onnx, atol=1e-5)
    assert onnx.predict(images[:0])[0].shape == (0, 5)

    bf16 = make_predictor(bundle, runtime="torch-bf16", threads=1)
    assert (bf16.runtime, bf16.precision) == ("torch-bf16", "bf16")
    with pytest.raises(ConfigError, match="valid choices"):
        make_predictor(bundle, runtime="tensorrt")  # type: ignore[arg-type]


def _onnx_agrees_with_torch(bundle: ModelBundle, x: torch.Tensor, emb_dim: int) -> None:
    """The bundle's exported graph gives torch's probabilities and embedding on ``x`` and on no rows."""
    import numpy as np
    import onnxruntime as ort

    from zalando.models import export_onnx
    from zalando.runtime import ONNX_INPUT, ONNX_OUTPUTS

    sess = ort.InferenceSession(export_onnx(bundle), providers=["CPUExecutionProvider"])
    for rows in (x, x[:0]):
        o_probs, o_emb = sess.run(list(ONNX_OUTPUTS), {ONNX_INPUT: rows.numpy()})
        with torch.no_grad():
            t_probs, t_emb = bundle.scoring_model()(rows)
        assert o_probs.shape == (len(rows), 5) and o_emb.shape == (len(rows), emb_dim)
        np.testing.assert_allclose(o_probs, t_probs.numpy(), atol=1e-5)
        np.testing.assert_allclose(o_emb, t_emb.numpy(), atol=1e-4)


def test_flip_below_flips_only_the_doubtful_rows_in_torch_and_onnx() -> None:
    """Under ``flip_below`` a row below the threshold gets the full flip's probabilities, a row above
    keeps the one view's; the embedding is the one view's; ONNX agrees with 0, some and all rows doubtful."""
    import numpy as np

    from zalando.models import ModelBundle
    from zalando.models.bundle import ScoringModel

    params = {"c1": 4, "c2": 8, "c3": 8, "embed_dim": 8}
    spec = ExperimentSpec(name="x", architecture="fashion_cnn", arch_params=params, tta="hflip")
    torch.manual_seed(0)
    net = build_model("fashion_cnn", 10, 28, params).eval()
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (64, 1, 28, 28)).astype(np.float32))
    weights = [1.0, 1.2, 1.0, 0.9, 1.0]

    def graph(tta: str, flip_below: float | None = None) -> ScoringModel:
        return ScoringModel(net, 0.3, 0.35, "labels", 0.8, tta, weights, flip_below).eval()

    with torch.no_grad():
        one, emb_one = graph("none")(x)
        both, _ = graph("hflip")(x)
        t = float(one.amax(1).median())  # half the rows doubtful
        mixed, emb_mixed = graph("hflip", t)(x)
    doubtful = one.amax(1) < t
    assert 0 < int(doubtful.sum()) < len(x)
    torch.testing.assert_close(mixed[doubtful], both[doubtful])
    torch.testing.assert_close(mixed[~doubtful], one[~doubtful])
    torch.testing.assert_close(emb_mixed, emb_one)
    assert graph("none", 0.5).flip_below is None  # a threshold means nothing without the flip

    for flip_below in (0.0, t, 1.01):  # none, half, every row doubtful
        bundle = ModelBundle(
            spec=spec, model=net, mean=0.3, std=0.35, model_version="v", dataset_version="d",
            temperature=0.8, group_weights=weights, flip_below=flip_below,
        )  # fmt: skip
        _onnx_agrees_with_torch(bundle, x, emb_dim=8)


def test_a_screen_passes_on_only_the_rows_it_doubts_in_torch_and_onnx() -> None:
    """With a screen, a row whose screen top group probability is below the threshold gets the main
    graph's probabilities (its flip threshold included), the others keep the screen's; the embedding
    is the screen's; ONNX agrees with 0, some and all rows passed on."""
    import numpy as np

    from zalando.models import ModelBundle
    from zalando.models.bundle import ScoringModel, Screen

    params = {"c1": 4, "c2": 8, "c3": 8, "embed_dim": 8}
    small = {"c1": 2, "c2": 4, "c3": 4, "embed_dim": 6}
    spec = ExperimentSpec(name="x", architecture="fashion_cnn", arch_params=params, tta="hflip")
    torch.manual_seed(0)
    net = build_model("fashion_cnn", 10, 28, params).eval()
    screen_net = build_model("fashion_cnn", 10, 28, small).eval()
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (64, 1, 28, 28)).astype(np.float32))
    weights = [1.0, 1.2, 1.0, 0.9, 1.0]
    main = ScoringModel(net, 0.3, 0.35, "labels", 0.8, "hflip", weights, 0.6).eval()
    alone = ScoringModel(screen_net, 0.3, 0.35, "labels", 1.1, "none").eval()
    with torch.no_grad():
        full, _ = main(x)
        first, emb_screen = alone(x)
        t = float(first.amax(1).median())
        cascade, emb = ScoringModel(net, 0.3, 0.35, "labels", 0.8, "hflip", weights, 0.6, alone, t).eval()(x)
    passed = first.amax(1) < t
    assert 0 < int(passed.sum()) < len(x)
    torch.testing.assert_close(cascade[passed], full[passed])
    torch.testing.assert_close(cascade[~passed], first[~passed])
    torch.testing.assert_close(emb, emb_screen)
    with pytest.raises(ModelError, match="screen needs its threshold"):
        ScoringModel(net, 0.3, 0.35, "labels", screen=alone)

    for below in (0.0, t, 1.01):  # none, half, every row passed on
        screen = Screen(
            net=screen_net, architecture="fashion_cnn", arch_params=small, temperature=1.1, below=below
        )
        bundle = ModelBundle(
            spec=spec, model=net, mean=0.3, std=0.35, model_version="v", dataset_version="d",
            temperature=0.8, group_weights=weights, flip_below=0.6, screen=screen,
        )  # fmt: skip
        _onnx_agrees_with_torch(bundle, x, emb_dim=6)
