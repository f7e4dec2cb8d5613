"""What the hardware offers the engines: the training device, its arithmetic, and how data reaches it.

Sapphire Rapids class CPUs (AMX) and AVX512-BF16 CPUs multiply bfloat16 natively: small CNNs
train and score 2-3x faster under bf16 autocast there than in fp32 (see FIELD-NOTES and
``benchmarks/``); elsewhere bf16 is emulated and slower, so 'auto' keeps fp32 on such a CPU.
On a CUDA GPU 'auto' is mixed precision: bf16 autocast where the GPU has bf16 (Ampere and later),
else fp16 autocast with a gradient scaler (fp16's range is too narrow for raw gradients).
"""

from __future__ import annotations

import logging

import torch

from zalando.errors import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")  # what a spec may ask for; 'fp16' is only ever chosen by 'auto'
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' -> the CUDA GPU when torch sees one, else the CPU; 'cuda' without a GPU is an error."""
    if requested not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {requested!r}")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but torch sees no CUDA GPU; set ZALANDO_DEVICE=auto or cpu"
        )
    return torch.device(requested)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matmuls/convolutions run natively on ``device`` (AMX/AVX512-BF16 CPUs, bf16 GPUs)."""
    device = torch.device(device)
    if device.type == "cuda":
        # including_emulation=False: a pre-Ampere GPU 'supports' bf16 only by emulating it, slowly
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """A spec's precision made concrete: 'fp32', 'bf16' or (on a GPU without bf16) 'fp16'.

    'auto' picks bf16 where the hardware runs it natively; on a CUDA GPU without it, fp16 (mixed
    precision with a gradient scaler); on such a CPU, fp32. A precision asked for by name is honoured.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return precision
    if native_bf16(device):
        return "bf16"
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: plain fp32, no autocast)."""
    return AMP_DTYPES.get(precision)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training (bf16 has fp32's range and needs none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def configure_backend(device: torch.device) -> None:
    """cuDNN autotuning on a GPU: every batch has the same shape, so the first steps' search pays off."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: CPU -> GPU through pinned memory and a non-blocking copy; else ``t.to(device)``."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
