"""Static int8 quantization of a bundle's scoring graph (ONNX Runtime, QDQ format), done once at build time.

The graph ``model.onnx`` is raw pixels -> normalisation -> CNN (convolutions with BatchNorm folded
in, an embedding Gemm, a head Gemm) -> softmax -> (hflip TTA: the same again, averaged) -> labels
summed into groups -> operating-point reweighting. Quantized are the CNN's layers, from the first
convolution to the head: ``Conv`` and ``Gemm`` (per-channel int8 weights; that is where the time
goes and where VNNI / AMX int8 help) and the ReLU, pooling and flatten between them, so the tensors
stay 8-bit from layer to layer (with only Conv and Gemm, ONNX Runtime requantized around every
ReLU and pool: a third of the time). Activations are uint8 with int8 weights (U8S8, ONNX Runtime's
fast path on x86), their ranges calibrated on training images. The normalisation, the softmax,
the TTA mean and the group sums stay fp32, so the probabilities still sum to 1 and the graph keeps
its input ``pixels`` and outputs ``group_probs``, ``embedding``. Scoring never quantizes: the result
is saved in the bundle as ``model.int8.onnx`` and checked on validation there (:mod:`zalando.admission`).

Torch-free, like :mod:`zalando.runtime`: ONNX Runtime's own tools only.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from zalando.errors import DataError, ModelError
from zalando.runtime import ONNX_INPUT, ONNX_OUTPUTS, as_pixels

log = logging.getLogger(__name__)

INT8_ONNX_FILE = "model.int8.onnx"
CALIBRATION_IMAGES = 512  # training images the activation ranges are measured on
CALIBRATION_BATCH = 64
INT8_OP_TYPES = ("Conv", "Gemm", "Relu", "MaxPool", "AveragePool", "Flatten")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo: int8 dot products


def int8_kernels(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """The family of int8 kernels ONNX Runtime takes on this CPU: 'x86-vnni' (VNNI or AMX int8 dot
    products), 'x86-no-vnni' (saturating 16-bit sums), 'x86' (x86 whose flags cannot be read), or
    the machine's name elsewhere ('aarch64', ...). ``cpuinfo`` (/proc/cpuinfo's text) and ``machine``
    default to this machine's, read once per process.
    """
    if cpuinfo is None and machine is None:
        return _this_cpu_int8_kernels()
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return machine or "unknown"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "x86"
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), None)
    if line is None:
        return "x86"
    return "x86-vnni" if VNNI_FLAGS & set(line.partition(":")[2].split()) else "x86-no-vnni"


@functools.cache
def _this_cpu_int8_kernels() -> str:
    return int8_kernels(machine=platform.machine())


SOURCE_SHA256_KEY = "fp32_sha256"  # metadata of the int8 graph: the sha256 of the model.onnx it came from


def calibration_images(x_train: np.ndarray, n: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """A seeded random subset of ``n`` training images (all of them when there are fewer)."""
    x_train = np.asarray(x_train)
    if len(x_train) <= n:
        return x_train
    rng = np.random.default_rng(seed)
    return x_train[np.sort(rng.choice(len(x_train), n, replace=False))]


def quantize_int8(
    onnx_bytes: bytes,
    calibration: np.ndarray,
    *,
    input_name: str = ONNX_INPUT,
    reduce_range: bool | None = None,
) -> bytes:
    """The fp32 scoring graph with its CNN layers in int8 (static QDQ, MinMax calibration).

    ``calibration``: uint8 images (N, 28, 28). ``reduce_range``: 7-bit weights, which keep the
    saturating 16-bit sums of x86 kernels without VNNI from overflowing (ONNX Runtime's advice);
    default: on such a CPU only (:func:`int8_kernels`), so a VNNI CPU keeps its 8-bit weights. The
    result carries the sha256 of ``onnx_bytes`` in its metadata (:data:`SOURCE_SHA256_KEY`) so a
    loader can tell it belongs to that graph.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pixels = as_pixels(calibration)
    if len(pixels) == 0:
        raise DataError("int8 quantization needs calibration images, got none")
    kernels = int8_kernels()
    if reduce_range is None:
        reduce_range = kernels == "x86-no-vnni"
    with tempfile.TemporaryDirectory(prefix="zalando-int8-") as tmp:
        src, pre, out = Path(tmp, "model.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(onnx_bytes)
        try:
            # shape inference and the portable (basic) graph optimisations, as ORT recommends
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(out),
                _ImageReader(pixels, input_name),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OP_TYPES),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                reduce_range=reduce_range,
            )
        except Exception as e:  # noqa: BLE001 - ORT's tools raise many kinds
            raise ModelError(f"int8 quantization failed: {str(e).splitlines()[0][:200]}") from None
        model = onnx.load(str(out))
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if inputs != [input_name] or outputs[: len(ONNX_OUTPUTS)] != list(ONNX_OUTPUTS):
        raise ModelError(f"int8 quantization changed the graph's inputs/outputs (outputs {outputs})")
    model.producer_name = "zalando"
    entry = model.metadata_props.add()
    entry.key, entry.value = SOURCE_SHA256_KEY, hashlib.sha256(onnx_bytes).hexdigest()
    onnx.checker.check_model(model)
    int8 = model.SerializeToString()
    log.info("int8 graph: %.2f MB (fp32 %.2f MB), calibrated on %d images, %d-bit weights (%s int8 kernels)",
             len(int8) / 1e6, len(onnx_bytes) / 1e6, len(pixels), 7 if reduce_range else 8, kernels)  # fmt: skip
    return int8


def int8_source_sha256(int8_bytes: bytes) -> str | None:
    """The sha256 of the fp32 graph an int8 graph was made from (None when it does not say)."""
    import onnx

    model = onnx.load_from_string(int8_bytes)
    return {p.key: p.value for p in model.metadata_props}.get(SOURCE_SHA256_KEY)


class _ImageReader:
    """ONNX Runtime's CalibrationDataReader protocol over float pixel batches."""

    def __init__(self, pixels: np.ndarray, input_name: str, batch: int = CALIBRATION_BATCH) -> None:
        self._batches = iter([pixels[i : i + batch] for i in range(0, len(pixels), batch)])
        self._input = input_name

    def get_next(self) -> dict[str, Any] | None:
        chunk = next(self._batches, None)
        return None if chunk is None else {self._input: chunk}
