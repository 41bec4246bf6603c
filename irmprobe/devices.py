"""What a torch device can do fast (no model or config here; SAE training and benchmarks ask it)."""

from __future__ import annotations

import torch


def fast_bfloat16(device: str) -> bool:
    """True where bfloat16 matrix products are faster than float32: a CUDA GPU that supports bfloat16,
    or a CPU with AMX bfloat16 tiles (``torch.cpu.get_capabilities()['amx_bf16']``)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return bool(torch.cpu.get_capabilities().get("amx_bf16", False))
    return False


def bf16_precision(precision: str, device: str) -> bool:
    """Whether a ``precision`` setting (``float32``, ``bfloat16``, ``auto``) means bfloat16 on ``device``:
    ``auto`` is bfloat16 on a CUDA GPU that supports it, float32 elsewhere."""
    if precision == "auto":
        return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bfloat16"
