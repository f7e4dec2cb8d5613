"""Champion loading: a real (tiny) bundle, both runtimes, and the bundles it must refuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.scoring_support import make_champion, mnist_like
from zalando.errors import ModelError
from zalando.lake import Lake
from zalando.registry import NoChampionError
from zalando.scoring import clear_predictor_cache, load_champion_predictor


@pytest.fixture(scope="module")
def champion_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lake, str]:
    import torch

    torch.set_num_threads(1)
    lake = Lake.local(tmp_path_factory.mktemp("champ") / "lake")
    return lake, make_champion(lake)


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_predictor_cache()


def _recommit(lake: Lake, key: str, **changes: bytes) -> None:
    """Re-commit a bundle with some files replaced (valid checksums: a consistent but wrong bundle)."""
    files = {n: lake.read_file(key, n) for n in lake.read_manifest(key)["files"]}
    files.update(changes)
    lake.commit_files(key, files, "tamper")


def test_loads_champion_with_both_runtimes_and_they_agree(champion_lake: tuple[Lake, str]) -> None:
    lake, version = champion_lake
    imgs = mnist_like(50)
    onnx = load_champion_predictor(lake, "onnx", threads=1)
    torch_p = load_champion_predictor(lake, "torch", threads=1)
    auto = load_champion_predictor(lake, "auto", threads=1)
    assert (onnx.runtime, torch_p.runtime, onnx.model_version) == ("onnx", "torch", version)
    from zalando.models.hardware import native_bf16

    expected = {"onnx", "torch"} | ({"torch-bf16"} if native_bf16("cpu") else set())
    assert auto.runtime in expected and set(auto.timings) == expected
    assert auto.checks["manifest_sha256"] == "ok" and auto.checks["registry_record"] == "ok"
    p1, e1 = onnx.predict(imgs)
    p2, e2 = torch_p.predict(imgs)
    assert p1.shape == (50, 5) and e1.shape[0] == 50
    np.testing.assert_allclose(p1, p2, atol=1e-4)
    assert load_champion_predictor(lake, "onnx", threads=1) is onnx  # cached per process


def test_evaluation_builds_the_predictors_production_scores_with(champion_lake: tuple[Lake, str]) -> None:
    """The latency gate times make_predictor's predictors: the same classes and settings as scoring's."""
    from zalando.models.bundle import load_bundle, load_onnx_bytes
    from zalando.models.predictor import TorchPredictor, make_predictor
    from zalando.runtime import OnnxPredictor

    lake, version = champion_lake
    bundle = load_bundle(lake, "tiny_cnn", version)
    for threads in (1, 3):
        scoring = load_champion_predictor(lake, "onnx", threads=threads).predictor
        evaluation = make_predictor(
            bundle, load_onnx_bytes(lake, "tiny_cnn", version), "onnx", threads=threads
        )
        assert type(scoring) is type(evaluation) is OnnxPredictor
        assert (evaluation.parallelism, evaluation.batch_size) == (scoring.parallelism, scoring.batch_size)
        assert evaluation.parallelism == threads
        options = (evaluation.session.get_session_options(), scoring.session.get_session_options())
        assert {(o.intra_op_num_threads, o.inter_op_num_threads, str(o.execution_mode)) for o in options} == {
            (1, 1, "ExecutionMode.ORT_SEQUENTIAL")
        }
    scoring_torch = load_champion_predictor(lake, "torch", threads=1).predictor
    evaluation_torch = make_predictor(bundle, None, "torch", threads=1)
    assert type(scoring_torch) is type(evaluation_torch) is TorchPredictor
    assert (scoring_torch.batch_size, scoring_torch.precision) == (evaluation_torch.batch_size, "fp32")


def test_bf16_runtime_agrees_with_fp32_or_is_refused(
    champion_lake: tuple[Lake, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from zalando.scoring import champion

    lake, version = champion_lake
    imgs = mnist_like(64)
    bf16 = load_champion_predictor(lake, "torch-bf16", threads=1)
    fp32 = load_champion_predictor(lake, "torch", threads=1)
    assert (bf16.runtime, bf16.model_version) == ("torch-bf16", version)
    assert 0 <= bf16.checks["bf16_vs_fp32_max_prob_diff"] <= champion.BF16_MAX_PROB_DIFF
    p_bf16, e_bf16 = bf16.predict(imgs)
    p_fp32, _ = fp32.predict(imgs)
    assert p_bf16.dtype == np.float32 and e_bf16.dtype == np.float32
    np.testing.assert_allclose(p_bf16.sum(1), 1.0, atol=1e-5)  # probabilities made in fp32
    assert np.abs(p_bf16 - p_fp32).max() <= champion.BF16_MAX_PROB_DIFF
    assert np.abs(p_bf16 - p_fp32).max() > 0  # really ran in bf16

    clear_predictor_cache()
    monkeypatch.setattr(champion, "BF16_MAX_PROB_DIFF", -1.0)  # nothing can pass
    with pytest.raises(ModelError, match="torch-bf16 probabilities differ from fp32"):
        load_champion_predictor(lake, "torch-bf16", threads=1)
    monkeypatch.setattr(champion, "_native_bf16", lambda: True)
    auto = load_champion_predictor(lake, "auto", threads=1)
    assert "torch-bf16" not in auto.timings and auto.runtime in ("onnx", "torch")


def test_onnx_worker_does_not_import_torch(champion_lake: tuple[Lake, str]) -> None:
    lake, version = champion_lake
    code = (
        "import sys; from zalando.lake import Lake; from zalando.scoring import load_champion_predictor\n"
        f"p = load_champion_predictor(Lake.local({lake.root!r}), 'onnx', threads=1)\n"
        "assert p.checks['verify'] == 'light' and p.runtime == 'onnx', p.checks\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(p.model_version)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == version


def test_missing_champion_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(NoChampionError, match="promote"):
        load_champion_predictor(Lake.local(tmp_path / "empty"))
    with pytest.raises(NoChampionError, match="--model-version"):
        load_champion_predictor(Lake.local(tmp_path / "empty"))


def test_refuses_corrupt_or_inconsistent_bundles(tmp_path: Path) -> None:
    lake = Lake.local(tmp_path / "lake")
    version = make_champion(lake)
    key = f"models/tiny_cnn/{version}"
    onnx_ok = lake.read_file(key, "model.onnx")
    meta_ok = json.loads(lake.read_file(key, "bundle.json"))

    # bytes changed after commit: the manifest checksum no longer matches
    lake.write_bytes(f"{key}/model.onnx", onnx_ok[:-10] + b"0123456789")
    with pytest.raises(ModelError, match="sha256"):
        load_champion_predictor(lake, "onnx", threads=1)
    lake.write_bytes(f"{key}/model.onnx", onnx_ok)

    # normalisation statistics missing
    _recommit(lake, key, **{"bundle.json": json.dumps({**meta_ok, "mean": None}).encode()})
    with pytest.raises(ModelError, match="mean missing"):
        load_champion_predictor(lake, "onnx", threads=1)

    # bundle.json for another version
    _recommit(lake, key, **{"bundle.json": json.dumps({**meta_ok, "model_version": "other"}).encode()})
    with pytest.raises(ModelError, match="model_version"):
        load_champion_predictor(lake, "onnx", threads=1)
    _recommit(lake, key, **{"bundle.json": json.dumps(meta_ok).encode()})

    # an ONNX graph from other weights than weights.pt
    other_version = make_champion(lake, seed=7, name="tiny_cnn", promote=False)
    other_onnx = lake.read_file(f"models/tiny_cnn/{other_version}", "model.onnx")
    _recommit(lake, key, **{"model.onnx": other_onnx})
    with pytest.raises(ModelError, match=r"model\.onnx does not match weights\.pt"):
        load_champion_predictor(lake, "onnx", threads=1, verify="full")
    with pytest.raises(ModelError, match=r"model\.onnx does not match weights\.pt"):
        load_champion_predictor(lake, "auto", threads=1)
    _recommit(lake, key, **{"model.onnx": onnx_ok})

    # statistics that differ from the dataset version the bundle names
    stats = {
        "dataset_version": "dv-test", "mean": 0.5, "std": 0.353, "n_train": 1, "n_val": 1, "n_test": 1,
        "seed": 0, "val_fraction": 0.2, "source_digest": "x",
    }  # fmt: skip
    _put_dataset_version(lake, stats)
    with pytest.raises(ModelError, match="differs from dataset version"):
        load_champion_predictor(lake, "onnx", threads=1)
    _put_dataset_version(lake, {**stats, "mean": 0.286})
    assert load_champion_predictor(lake, "onnx", threads=1).checks["dataset_stats"] == "ok"


def _put_dataset_version(lake: Lake, stats: dict) -> None:
    """A dataset version's statistics row, as preprocess commits it (the dataset_versions table)."""
    from datetime import UTC, datetime

    from zalando.lake.commit import replace_partition

    row = pa.Table.from_pylist([{**stats, "created_at": datetime.now(UTC)}])
    replace_partition(lake.catalog(), "dataset_versions", row, {"dataset_version": stats["dataset_version"]})


def test_the_warm_up_calls_each_runtime_as_a_shard_does() -> None:
    """Sub-batches of the default size, ``parallelism`` at once: ONNX Runtime's concurrent
    single-threaded runs are timed as they score, not as one run on one thread."""
    import threading
    import time

    from zalando.scoring import champion

    class Recorder:
        def __init__(self, parallelism: int) -> None:
            self.parallelism = parallelism
            self.sizes: list[int] = []
            self.running = self.most = 0
            self.lock = threading.Lock()

        def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with self.lock:
                self.sizes.append(len(images))
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.05)
            with self.lock:
                self.running -= 1
            return np.full((len(images), 5), 0.2, np.float32), np.zeros((len(images), 4), np.float32)

    onnx_like, torch_like = Recorder(parallelism=2), Recorder(parallelism=1)
    timings = champion._warm_up("test", [("onnx", onnx_like), ("torch", torch_like)])
    assert set(timings) == {"onnx", "torch"}
    n, sub = champion.WARMUP_IMAGES, champion.WARMUP_SUB_BATCH
    assert n > sub  # more than one sub-batch, or parallelism could not show
    for rec in (onnx_like, torch_like):
        assert rec.sizes == [16] + [sub] * (n // sub)  # the first call checks the outputs
    assert (onnx_like.most, torch_like.most) == (2, 1)
    assert timings["onnx"] < timings["torch"]  # 2 sleeps at once against 2 in a row
