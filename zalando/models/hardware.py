"""What the hardware offers the engines: the training device and native bfloat16.

Sapphire Rapids class CPUs (AMX) and AVX512-BF16 CPUs multiply bfloat16 natively: small CNNs
train and score 2-3x faster under bf16 autocast there than in fp32 (see FIELD-NOTES and
``benchmarks/``); elsewhere bf16 is emulated and slower, so 'auto' keeps fp32.
"""

from __future__ import annotations

import torch

from zalando.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


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
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """A spec's precision made concrete: 'auto' picks bf16 only where the hardware runs it natively."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be one of auto, fp32, bf16; got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision
