"""Shared by the scoring benchmarks: a throw-away S3 lake, the benchmark champion, FLOPs and peak.

The benchmark champion is the built-in ``fashion_cnn`` experiment (the custom CNN the ``cpu``
profile trains), quick-trained on a few thousand Fashion-MNIST training images for one epoch:
scoring speed depends on the architecture, not on accuracy. It is built as training builds bundles
(with ``model.int8.onnx`` and the runtimes' verdicts on its validation images), trained once and
cached in ``.zalando/bench/champion-lake`` (a file lake); each run copies it into the S3 lake and
promotes it.
``--use-champion`` scores with the lake's own champion instead (a real trained one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zalando.lake import Lake  # noqa: E402

FULL_DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"
BENCH_DIR = ROOT / ".zalando" / "bench"
ACCESS, SECRET = "bench", "bench-secret-7c1e"
log = logging.getLogger("bench")


@contextlib.contextmanager
def s3_lake(keep: bool = False) -> Iterator[tuple[Lake, object]]:
    """A SeaweedFS server on free ports with an empty lake; stopped (and its data removed) after."""
    from zalando.s3server import S3Server, free_port_block
    from zalando.settings import Settings

    with tempfile.TemporaryDirectory(prefix="zalando-bench-s3-") as tmp:
        server = S3Server(Path(tmp), free_port_block(), ACCESS, SECRET)
        server.start(timeout=90)
        try:
            settings = Settings(
                lake_uri="s3://bench/lake",
                s3_endpoint=server.endpoint,
                s3_access_key=ACCESS,
                s3_secret_key=SECRET,
                work_dir=Path(tmp) / "work",
            )
            lake = Lake.from_settings(settings)  # its tables' catalog: SQLite in the work folder
            lake.ensure_ready()
            yield lake, settings
        finally:
            server.stop()


def test_split() -> tuple[np.ndarray, np.ndarray]:
    from zalando.data.idx import read_idx_images, read_idx_labels

    return (
        read_idx_images(str(FULL_DATA / "t10k-images-idx3-ubyte.gz")),
        read_idx_labels(str(FULL_DATA / "t10k-labels-idx1-ubyte.gz")),
    )


def put_test_split(lake: Lake) -> int:
    """The Fashion-MNIST test split as the raw table ingest writes (the built-in demo batch)."""
    from zalando.data.ingest import put_raw_split

    images, labels = test_split()
    ids = [f"test-{i:05d}" for i in range(len(images))]
    put_raw_split(lake, "test", ids, images, labels, digest="bench-ingest")
    return len(images)


def _train_bench_champion(cache: Lake) -> str:
    import torch

    from zalando.admission import RuntimeCheckData
    from zalando.data.idx import read_idx_images, read_idx_labels
    from zalando.models.bundle import build_bundle, save_bundle
    from zalando.models.experiments import get_experiment, get_profile
    from zalando.train import train_experiment

    torch.set_num_threads(2)
    x = read_idx_images(str(FULL_DATA / "train-images-idx3-ubyte.gz"))
    y = read_idx_labels(str(FULL_DATA / "train-labels-idx1-ubyte.gz")).astype(np.int64)
    data = {"x_train": x[:54000], "y_train": y[:54000], "x_val": x[54000:], "y_val": y[54000:]}
    xf = x[:54000].astype(np.float64) / 255.0
    mean, std = float(xf.mean()), float(xf.std())
    profile = get_profile("quick").model_copy(update={"max_train_images": 4000, "max_val_images": 1000})
    spec = get_experiment("fashion_cnn")
    log.info("quick-training the benchmark champion (fashion_cnn, 4,000 images, 1 epoch)")
    result = train_experiment(spec, profile, data, mean, std, seed=0, threads=2)
    bundle = build_bundle(result, mean=mean, std=std, dataset_version="bench-fashion-mnist")
    save_bundle(cache, bundle, runtime_checks=RuntimeCheckData.from_training(data))  # as training does
    return bundle.model_version


def _loads_with_this_code(cache: Lake, key: str) -> bool:
    from zalando.errors import ZalandoError
    from zalando.models.bundle import load_bundle
    from zalando.models.experiments import get_experiment
    from zalando.quantize import INT8_ONNX_FILE

    _, experiment, version = key.split("/")
    if INT8_ONNX_FILE not in cache.read_manifest(key)["files"]:
        return False  # built before bundles had an int8 graph and runtime verdicts
    try:
        bundle = load_bundle(cache, experiment, version)
    except ZalandoError:
        return False
    return bundle.spec.arch_params == get_experiment("fashion_cnn").arch_params


def install_champion(lake: Lake, check_code: bool = True) -> dict:
    """Copy the cached benchmark champion into ``lake``, register and promote it; returns its pointer.

    ``check_code``: retrain when the cached bundle no longer loads with the current model code
    (pass False to score with its self-contained ONNX graph anyway, ``--runtime onnx``).
    """
    from zalando import registry

    cache = Lake.local(BENCH_DIR / "champion-lake")
    parts = cache.list_partitions("models")
    if parts and check_code and not _loads_with_this_code(cache, parts[-1]):
        log.info("cached benchmark champion %s no longer fits the model code: training a new one", parts[-1])
        stale = parts[-1]
        _train_bench_champion(cache)  # a new version (sorts last); the stale one goes only after
        cache.delete_prefix(stale)
        parts = cache.list_partitions("models")
    if not parts:
        _train_bench_champion(cache)
        parts = cache.list_partitions("models")
    key = parts[-1]
    manifest = cache.read_manifest(key)
    files = {name: cache.read_file(key, name) for name in manifest["files"]}
    lake.commit_files(key, files, manifest["run_id"], manifest["extra"])
    _, experiment, version = key.split("/")
    import json

    meta = json.loads(files["bundle.json"])
    registry.register_model(
        lake,
        model_version=version,
        experiment=experiment,
        metrics={},
        spec=meta["spec"],
        dataset_version=meta["dataset_version"],
        code_version=meta.get("code_version", ""),
        bundle_key=key,
    )
    return registry.promote(lake, version, reason="benchmark champion", actor="benchmark")


def onnx_flops_per_image(onnx_bytes: bytes) -> int:
    """FLOPs (2 x multiply-accumulates) of Conv/Gemm/MatMul for one image, from the ONNX graph."""
    import onnx
    from onnx import shape_inference

    model = onnx.load_from_string(onnx_bytes)
    inp = model.graph.input[0]
    inp.type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out = shapes.get(node.output[0])
            w = shapes.get(node.input[1])
            if out and w:
                total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if a and b:
                m = int(np.prod(a[:-1])) if len(a) > 1 else 1
                k = a[-1]
                n = (
                    b[0]
                    if node.op_type == "Gemm" and any(at.name == "transB" and at.i for at in node.attribute)
                    else b[-1]
                )
                total += 2 * m * k * n
    return total


def work_per_image(lake: Lake, experiment: str, model_version: str) -> tuple[float, str]:
    """FLOPs (2 x multiply-accumulates) the champion's scoring graph does per test image, and how.

    The ONNX graph's count cannot see the rows only known at run time (a screen net passes on the rows
    it doubts; a flip threshold flips only doubtful rows), so the test split is run through the graph's
    parts here, in torch, to count them: screen on every row, the main net on the rows passed on, its
    mirror on the rows flipped."""
    import torch

    from zalando.models.architectures import count_macs
    from zalando.models.bundle import ScoringModel, load_bundle

    b = load_bundle(lake, experiment, model_version)
    images, _ = test_split()
    x = torch.from_numpy(images[:, None].astype(np.float32))
    n = len(x)
    work = {"screen": 0, "main": n, "mirror": n if b.spec.tta == "hflip" else 0}
    with torch.no_grad():
        if b.screen is not None:
            first, _ = ScoringModel(
                b.screen.net, b.mean, b.std, b.spec.target, b.screen.temperature, "none"
            ).eval()(x)
            x = x[first.amax(1) < b.screen.below]
            work.update(screen=n, main=len(x), mirror=len(x) if b.spec.tta == "hflip" else 0)
        if b.flip_below is not None:
            one, _ = ScoringModel(
                b.model, b.mean, b.std, b.spec.target, b.temperature, "none", b.group_weights
            ).eval()(x)
            work["mirror"] = int((one.amax(1) < b.flip_below).sum())
    macs_main = count_macs(b.model)
    macs_screen = count_macs(b.screen.net) if b.screen is not None else 0
    flops = 2 * (macs_screen * work["screen"] + macs_main * (work["main"] + work["mirror"])) / n
    parts = [f"screen on {work['screen'] / n:.0%}"] if b.screen is not None else []
    parts += [f"main net on {work['main'] / n:.1%}", f"its mirror on {work['mirror'] / n:.1%}"]
    return flops, ", ".join(parts)


def matmul_peak_gflops(threads: int = 2, n: int = 2048, seconds: float = 2.0, dtype: str = "fp32") -> float:
    """Best GFLOP/s of an n x n matrix multiply on ``threads`` threads (torch's BLAS / oneDNN), best of
    repeats; ``dtype='bf16'`` multiplies bfloat16 (AMX where the CPU has it); ``dtype='int8'``
    multiplies int8 into int32 (GOP/s), the better of torch's ``_int_mm`` (oneDNN: AMX where the CPU
    has it) and ONNX Runtime's uint8 x int8 MatMulInteger (the kernels the onnx-int8 runtime runs on):
    on a Sapphire Rapids core under load we saw 1,330 vs 830 GOP/s."""
    if dtype == "int8":
        return max(_torch_int8_peak_gops(threads, n, seconds), _ort_int8_peak_gops(threads, n, seconds))
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        a, b = torch.randn(n, n, dtype=tdtype), torch.randn(n, n, dtype=tdtype)
        torch.mm(a, b)
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
        return best
    finally:
        torch.set_num_threads(old)


def _best_rate(run: Callable[[], object], n: int, seconds: float) -> float:
    """Best n x n multiply rate of ``run`` (G operations/s) over ``seconds`` of repeats, after one call."""
    run()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        run()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def _torch_int8_peak_gops(threads: int, n: int, seconds: float) -> float:
    """torch's int8 x int8 -> int32 ``_int_mm`` on ``threads`` threads (0 where this torch lacks it)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        return _best_rate(lambda: torch._int_mm(a, b), n, seconds)
    except (AttributeError, RuntimeError, NotImplementedError):
        return 0.0
    finally:
        torch.set_num_threads(old)


def _ort_int8_peak_gops(threads: int, n: int, seconds: float) -> float:
    """ONNX Runtime's n x n uint8 x int8 -> int32 MatMulInteger on ``threads`` threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "int8_peak",
        [
            helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
            helper.make_tensor_value_info("B", TensorProto.INT8, [n, n]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        "A": rng.integers(0, 256, (n, n), dtype=np.uint8),
        "B": rng.integers(-128, 128, (n, n), dtype=np.int8),
    }
    return _best_rate(lambda: session.run(None, feed), n, seconds)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_avg() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} cores"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    log.setLevel(logging.INFO)


def copy_champion_from_settings(lake: Lake) -> dict:
    """Copy the champion of the lake the environment names (ZALANDO_* settings, e.g. the one `make run`
    just filled; its S3 server must be running) into ``lake``: bundle, registry record, pointer,
    dataset version. Returns the pointer."""
    from zalando import registry
    from zalando.errors import ZalandoError
    from zalando.settings import load_settings

    src = Lake.from_settings(load_settings())
    try:
        pointer = registry.require_champion(src)
    except ZalandoError as e:
        raise SystemExit(
            f"error: --use-champion: {str(e).splitlines()[0]} (is its S3 server up? `.venv/bin/zalando stack up`)"
        ) from None
    key = pointer["bundle_key"]
    manifest = src.read_manifest(key)
    lake.commit_files(
        key, {n: src.read_file(key, n) for n in manifest["files"]}, manifest["run_id"], manifest["extra"]
    )
    record = registry.get_model(src, pointer["model_version"])
    dv = record.get("dataset_version")
    if dv:  # the dataset version's rows (split indices, statistics), when the source lake has them
        from zalando.lake.commit import replace_partition, scan

        for table in ("datasets", "dataset_versions"):
            rows = scan(src.catalog(), table, {"dataset_version": dv})
            if rows.num_rows:
                replace_partition(lake.catalog(), table, rows, {"dataset_version": dv})
    registry.register_model(
        lake,
        model_version=pointer["model_version"],
        experiment=pointer["experiment"],
        metrics=record.get("metrics", {}),
        spec=record.get("spec", {}),
        dataset_version=dv or "",
        code_version=record.get("code_version", ""),
        bundle_key=key,
    )
    return registry.promote(
        lake, pointer["model_version"], reason="benchmark copy of the real champion", actor="benchmark"
    )
