"""Pure tensor functions of the lossy codec, in symmetric pairs: rotate/unrotate keys, quantize/dequantize.

Everything here works channel-major, (heads, head_dim, tokens): each channel's tokens are contiguous, which is
the order the entropy coder consumes, and per-channel parameters broadcast over the last axis.

Decoding arithmetic is specified to the bit (docs/codec.md, "Reconstruction"): float32 throughout, every
multiply and add a separate IEEE operation (no fused multiply-add), and the rotary tables rounded once from
float64, so that an independent decoder reproduces kvcli's values exactly.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def rope_tables(inv_freq: torch.Tensor, token_start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin, each (head_dim / 2, tokens), of float64 angles position * inv_freq, for absolute
    positions token_start, token_start + 1, ..."""
    freq = inv_freq.cpu().numpy().astype(np.float64)
    return _rope_tables(freq.tobytes(), token_start, tokens)


@functools.lru_cache(maxsize=64)
def _rope_tables(freq: bytes, token_start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached: every layer and kind of a chunk shares its positions, and usually its frequencies."""
    angles = np.outer(np.frombuffer(freq, np.float64), np.arange(token_start, token_start + tokens, dtype=np.float64))
    return torch.from_numpy(np.cos(angles).astype(np.float32)), torch.from_numpy(np.sin(angles).astype(np.float32))


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE (rotate-half layout) on (heads, head_dim, tokens) keys: rotate each pair back by its angle."""
    half = keys.shape[1] // 2
    x1, x2 = keys[:, :half], keys[:, half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=1)


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to pre-rotation (heads, head_dim, tokens) keys; the inverse of unrotate_keys.

    Each product and the difference are separate float32 operations (docs/codec.md, "Reconstruction").
    """
    half = keys.shape[1] // 2
    x1, x2 = keys[:, :half], keys[:, half:]
    out = torch.empty_like(keys)
    torch.mul(x1, cos, out=out[:, :half]).sub_(x2 * sin)
    torch.mul(x2, cos, out=out[:, half:]).add_(x1 * sin)
    return out


def quantize(x: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
             token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform quantization: int32 q with |x - dequantize(q)| <= step * token_factor / 2 per element (up to
    float32 rounding).

    x is (heads, dim, tokens); center and step are (heads, dim), one per channel; token_factor, if given,
    (heads, tokens) float32, one per token of each head (docs/codec.md, "Token weights").
    """
    size = step[..., None] if token_factor is None else step[..., None] * token_factor[:, None, :]
    return torch.round((x - center[..., None]) / size).to(torch.int32)


def dequantize(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
               token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """float32 center + (float32(q) * step) * token_factor: each multiply and the add a separate float32
    operation (never fused, so every decoder agrees)."""
    v = torch.mul(q, step[..., None])  # int32 * float32 promotes q exactly as .float()
    if token_factor is not None:
        v.mul_(token_factor[:, None, :])
    return v.add_(center[..., None])


def dequantize_rotate_ref(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
                          inv_freq: torch.Tensor | None, token_start: int,
                          token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (heads, dim, tokens): center + (q * step) * token_factor per channel, then RoPE on keys (inv_freq
    given).

    The torch reference of kernels/dequantize.py, and the CPU path of decoding.
    """
    x = dequantize(q, center.float(), step.float(), token_factor)
    if inv_freq is None or q.shape[2] == 0:
        return x
    cos, sin = rope_tables(inv_freq, token_start, q.shape[2])
    return rotate_keys(x, cos.to(x.device), sin.to(x.device))
