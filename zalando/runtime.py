"""Scoring runtimes: the one ``Predictor`` protocol, the runtime names, and the ONNX Runtime predictor.

Torch-free on purpose: importing torch costs about 600 MB of resident memory per process, and a
scoring worker that runs ONNX Runtime needs none of it. The torch predictor (fp32 or bf16) lives in
:mod:`zalando.models.predictor`; evaluation, the gates and production scoring all use these two
classes, built with the same settings, so the latency gate times what production runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Protocol, TypeVar

import numpy as np

from zalando.errors import DataError, ModelError

Runtime = Literal["auto", "onnx", "onnx-int8", "torch", "torch-bf16"]
"""``auto`` lets the champion loader measure and pick; the others name one runtime.

``onnx-int8`` runs the bundle's statically quantized graph (``model.int8.onnx``) in ONNX Runtime;
``torch-bf16`` is torch under bfloat16 autocast. Both are reduced-precision runtimes: the champion
loader uses them only where the bundle's validation check admitted them (:mod:`zalando.admission`).
"""
RUNTIMES: tuple[Runtime, ...] = ("auto", "onnx", "onnx-int8", "torch", "torch-bf16")
REDUCED_PRECISION: tuple[Runtime, ...] = ("onnx-int8", "torch-bf16")
ONNX_RUNTIMES: tuple[Runtime, ...] = ("onnx", "onnx-int8")  # torch-free: a worker never imports torch

ONNX_INPUT = "pixels"
ONNX_OUTPUTS = ("group_probs", "embedding")
ONNX_BATCH = 1024  # images per session run when one predict call is given more

T = TypeVar("T")
R = TypeVar("R")


class Predictor(Protocol):
    """uint8 (N, 28, 28) -> (group probabilities (N, 5), embeddings (N, D)), both float32.

    ``parallelism``: how many ``predict`` calls may run at once (the scoring engine and the timing
    of the latency gate hand it that many sub-batches concurrently).
    """

    runtime: str
    parallelism: int

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def as_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) or (N, 784) -> float32 (N, 1, 28, 28), with a clear error otherwise."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8 pixels 0..255, got dtype {images.dtype}")
    if images.ndim == 2 and images.shape[1] == 784:
        images = images.reshape(-1, 28, 28)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"images must have shape (N, 28, 28) or (N, 784), got {images.shape}")
    return images.astype(np.float32)[:, None]  # the graph does /255 and normalises


def default_threads() -> int:
    """ZALANDO_TORCH_THREADS when set to a positive number, else the cores this process may use."""
    env = os.environ.get("ZALANDO_TORCH_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def run_concurrently(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``[fn(x) for x in items]``, at most ``workers`` at once on threads (in order)."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


class OnnxPredictor:
    """One ONNX Runtime session over the bundle's self-contained scoring graph (CPU).

    ``threads`` cores are used as ``threads`` concurrent single-threaded runs of one session
    (``parallelism``; the scoring engine hands it that many sub-batches at once) rather than one run
    split across threads: no intra-op synchronisation, and on our shared 2-core machines it measured
    1.2-1.7x faster. A call with more than ``batch_size`` images is run in chunks of ``batch_size``,
    ``parallelism`` chunks at once. ``runtime`` names the graph: ``onnx`` (fp32, ``model.onnx``) or
    ``onnx-int8`` (``model.int8.onnx``); the session is the same.
    """

    def __init__(
        self,
        onnx_bytes: bytes,
        threads: int | None = None,
        *,
        batch_size: int = ONNX_BATCH,
        input_name: str = ONNX_INPUT,
        output_names: tuple[str, ...] = ONNX_OUTPUTS,
        runtime: Runtime = "onnx",
    ) -> None:
        import onnxruntime as ort

        if runtime not in ONNX_RUNTIMES:
            raise ModelError(f"OnnxPredictor runs {', '.join(ONNX_RUNTIMES)}, not {runtime!r}")
        self.runtime: str = runtime

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:200]}") from None
        self.input_name = input_name
        self.output_names = list(output_names)
        self.batch_size = int(batch_size)
        self.threads = int(threads or default_threads())
        self.parallelism = self.threads  # session.run is thread-safe and frees the GIL

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = as_pixels(images)
        if len(x) == 0:
            return np.zeros((0, 5), np.float32), np.zeros((0, 0), np.float32)
        if len(x) <= self.batch_size:
            return self._run(x)
        chunks = [x[i : i + self.batch_size] for i in range(0, len(x), self.batch_size)]
        outs = run_concurrently(self._run, chunks, self.parallelism)
        return np.concatenate([p for p, _ in outs]), np.concatenate([e for _, e in outs])

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, emb = self.session.run(self.output_names, {self.input_name: x})
        return probs.astype(np.float32, copy=False), emb.astype(np.float32, copy=False)
