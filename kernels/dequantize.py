"""kvq's tensor stage on the GPU: integers to values, then RoPE back onto keys, in one pass.

Reference: kernels/reference.py (dequantize_rotate_ref), which is also the CPU path.

q is channel-major int32 (heads, dim, tokens); center and step are float32 (heads, dim). For keys, inv_freq
(dim / 2,) rotates channel pairs (i, i + dim/2) by (token_start + t) * inv_freq[i] (rotate-half layout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_TOKENS = 256


@triton.jit
def dequantize_rotate_kernel(q_ptr, center_ptr, step_ptr, freq_ptr, out_ptr, dim, tokens, token_start,
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
        angle = (token_start + offs).to(tl.float32) * tl.load(freq_ptr + chan)
        c = tl.cos(angle)
        s = tl.sin(angle)
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
    freq = inv_freq.float().contiguous() if rotate else center  # unused pointer when not rotating
    grid = (heads, channels, triton.cdiv(tokens, BLOCK_TOKENS))
    dequantize_rotate_kernel[grid](q.contiguous(), center.float().contiguous(), step.float().contiguous(), freq, out,
                                   dim, tokens, token_start, ROTATE=rotate, BLOCK=BLOCK_TOKENS)
    return out
