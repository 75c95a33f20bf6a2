"""kvq's tensor stage on the GPU: integers to values, then RoPE back onto keys, in one pass.

Reference: codecs/quantize.py (dequantize_rotate_ref), which is also the CPU path. Kernels import from codecs,
never the reverse at import time.

q is channel-major int32 (heads, dim, tokens); center and step are float32 (heads, dim). For keys, inv_freq
(dim / 2,) rotates channel pairs (i, i + dim/2) by (token_start + t) * inv_freq[i] (rotate-half layout); the
launcher passes the reference's own cos and sin tables (float64 angles rounded once), so the kernel and the
reference differ at most where the compiler fuses a multiply and an add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codecs.quantize import rope_tables

BLOCK_TOKENS = 256


@triton.jit
def dequantize_rotate_kernel(q_ptr, center_ptr, step_ptr, cos_ptr, sin_ptr, out_ptr, dim, tokens,
                             ROTATE: tl.constexpr, BLOCK: tl.constexpr):
    # One program: one head, one channel pair (or one channel without RoPE), one block of tokens.
    head = tl.program_id(0)
    chan = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tokens
    half = dim // 2
    row_a = head * dim + chan
    qa = tl.load(q_ptr + row_a * tokens + offs, mask=mask, other=0).to(tl.float32)
    xa = qa * tl.load(step_ptr + row_a) + tl.load(center_ptr + row_a)
    if ROTATE:
        row_b = row_a + half
        qb = tl.load(q_ptr + row_b * tokens + offs, mask=mask, other=0).to(tl.float32)
        xb = qb * tl.load(step_ptr + row_b) + tl.load(center_ptr + row_b)
        c = tl.load(cos_ptr + chan * tokens + offs, mask=mask, other=0.0)
        s = tl.load(sin_ptr + chan * tokens + offs, mask=mask, other=0.0)
        tl.store(out_ptr + row_a * tokens + offs, xa * c - xb * s, mask=mask)
        tl.store(out_ptr + row_b * tokens + offs, xb * c + xa * s, mask=mask)
    else:
        tl.store(out_ptr + row_a * tokens + offs, xa, mask=mask)


def dequantize_rotate(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
                      inv_freq: torch.Tensor | None, token_start: int) -> torch.Tensor:
    """Host launcher: float32 (heads, dim, tokens) on q's device."""
    heads, dim, tokens = q.shape
    out = torch.empty((heads, dim, tokens), dtype=torch.float32, device=q.device)
    if tokens == 0:
        return out
    rotate = inv_freq is not None
    if rotate and dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {dim}")
    channels = dim // 2 if rotate else dim
    if rotate:
        cos, sin = (t.to(q.device).contiguous() for t in rope_tables(inv_freq, token_start, tokens))
    else:
        cos = sin = center  # unused pointers when not rotating
    grid = (heads, channels, triton.cdiv(tokens, BLOCK_TOKENS))
    dequantize_rotate_kernel[grid](q.contiguous(), center.float().contiguous(), step.float().contiguous(), cos, sin,
                                   out, dim, tokens, ROTATE=rotate, BLOCK=BLOCK_TOKENS)
    return out
