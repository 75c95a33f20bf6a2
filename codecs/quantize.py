"""Pure tensor functions of the lossy codec, in symmetric pairs: rotate/unrotate keys, quantize/dequantize."""

from __future__ import annotations

import torch


def rope_tables(inv_freq: torch.Tensor, token_start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (tokens, head_dim), for absolute positions token_start.. in the rotate-half layout."""
    positions = torch.arange(token_start, token_start + tokens, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq.float())
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE on (heads, tokens, head_dim) keys: rotate each channel pair back by its angle."""
    return keys * cos - _rotate_half(keys) * sin


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to pre-rotation keys; the inverse of unrotate_keys."""
    return keys * cos + _rotate_half(keys) * sin


def quantize(x: torch.Tensor, center: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Uniform quantization: int32 q with |x - dequantize(q)| <= step / 2 per element.

    x is (heads, tokens, dim); center and step are (heads, dim), one per channel.
    """
    return torch.round((x - center[:, None, :]) / step[:, None, :]).to(torch.int32)


def dequantize(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * step[:, None, :] + center[:, None, :]
