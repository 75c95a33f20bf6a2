"""Pure tensor functions of the lossy codec, in symmetric pairs: rotate/unrotate keys, quantize/dequantize.

Everything here works channel-major, (heads, head_dim, tokens): each channel's tokens are contiguous, which is
the order the entropy coder consumes, and per-channel parameters broadcast over the last axis.
"""

from __future__ import annotations

import torch


def rope_tables(inv_freq: torch.Tensor, token_start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (head_dim / 2, tokens), for absolute positions token_start, token_start + 1, ..."""
    positions = torch.arange(token_start, token_start + tokens, dtype=torch.float32)
    angles = torch.outer(inv_freq.float(), positions)
    return angles.cos(), angles.sin()


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE (rotate-half layout) on (heads, head_dim, tokens) keys: rotate each pair back by its angle."""
    half = keys.shape[1] // 2
    x1, x2 = keys[:, :half], keys[:, half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=1)


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to pre-rotation (heads, head_dim, tokens) keys; the inverse of unrotate_keys."""
    half = keys.shape[1] // 2
    x1, x2 = keys[:, :half], keys[:, half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=1)


def quantize(x: torch.Tensor, center: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Uniform quantization: int32 q with |x - dequantize(q)| <= step / 2 per element (up to float32 rounding).

    x is (heads, dim, tokens); center and step are (heads, dim), one per channel.
    """
    return torch.round((x - center[..., None]) / step[..., None]).to(torch.int32)


def dequantize(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(center[..., None], q.to(torch.float32), step[..., None])
