"""Torch references of the kernels: the CPU decode path, and what each kernel is tested against."""

from __future__ import annotations

import torch

from ..codecs.quantize import dequantize, rope_tables, rotate_keys


def dequantize_rotate_ref(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
                          inv_freq: torch.Tensor | None, token_start: int) -> torch.Tensor:
    """float32 (heads, dim, tokens): center + q * step per channel, then RoPE on keys (inv_freq given)."""
    x = dequantize(q, center.float(), step.float())
    if inv_freq is None or q.shape[2] == 0:
        return x
    cos, sin = rope_tables(inv_freq.cpu(), token_start, q.shape[2])
    return rotate_keys(x, cos.to(x.device), sin.to(x.device))
