"""The Triton form of kvq's segment quantization (quantize.py holds the torch and C forms), the inverse of
dequantize_triton.py, in one pass on the GPU: read a cache layer in transformers' layout, un-rotate keys, centre,
divide by the step, round, and write channel-major int32.

Reference: quantize.py's quantize_segment_ref, which composes the encoder's operations: float32 cast, transpose
to (heads, dim, tokens), `unrotate_keys` with `rope_tables` (to_channels_ref), then `quantize`. Every
product and sum is its own float32 operation (multiply-add fusion off), the division is correctly rounded and
rounding goes to nearest-even, so the kernel gives the reference's integers exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dequantize_triton

ROUND_MAGIC = tl.constexpr(8388608.0)  # 2^23: adding it to |v| < 2^23 rounds to an integer, nearest-even


@triton.jit
def _round_even(v):
    # Rounds float32 to nearest-even with two additions: beyond 2^23 every float32 is already an integer.
    a = tl.abs(v)
    r = (a + ROUND_MAGIC) - ROUND_MAGIC
    r = tl.where(v < 0, -r, r)
    return tl.where(a < ROUND_MAGIC, r, v)


@triton.jit
def quantize_unrotate_kernel(x_ptr, center_ptr, step_ptr, cos_ptr, sin_ptr, cs_stride, tok_ptr, q_ptr, dim, tokens,
                             x_sh, x_st, x_sc,
                             ROTATE: tl.constexpr, SCALED: tl.constexpr, CHANNELS: tl.constexpr, BLOCK: tl.constexpr):
    # One program: one head, a block of tokens, every channel (ROTATE: both halves of every pair).
    head = tl.program_id(0)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    c = tl.arange(0, CHANNELS)
    half = dim // 2
    width = half if ROTATE else dim
    cmask = c < width
    mask = cmask[:, None] & (t[None, :] < tokens)
    x_a = x_ptr + head * x_sh + t[None, :] * x_st + c[:, None] * x_sc
    xa = tl.load(x_a, mask=mask, other=0.0).to(tl.float32)
    row_a = head * dim + c
    if SCALED:  # a token's steps times its factor: the float32 product, as the torch path forms it
        g = tl.load(tok_ptr + head * tokens + t, mask=t < tokens, other=1.0)
    else:
        g = tl.full((BLOCK,), 1.0, tl.float32)
    if ROTATE:
        xb = tl.load(x_a + half * x_sc, mask=mask, other=0.0).to(tl.float32)
        cs = tl.load(cos_ptr + c[:, None] * cs_stride + t[None, :], mask=mask, other=0.0)
        sn = tl.load(sin_ptr + c[:, None] * cs_stride + t[None, :], mask=mask, other=0.0)
        ya = xa * cs + xb * sn
        yb = xb * cs - xa * sn
        row_b = row_a + half
        vb = tl.math.div_rn(yb - tl.load(center_ptr + row_b, mask=cmask, other=0.0)[:, None],
                            tl.load(step_ptr + row_b, mask=cmask, other=1.0)[:, None] * g[None, :])
        tl.store(q_ptr + row_b[:, None] * tokens + t[None, :], _round_even(vb).to(tl.int32), mask=mask)
    else:
        ya = xa
    va = tl.math.div_rn(ya - tl.load(center_ptr + row_a, mask=cmask, other=0.0)[:, None],
                        tl.load(step_ptr + row_a, mask=cmask, other=1.0)[:, None] * g[None, :])
    tl.store(q_ptr + row_a[:, None] * tokens + t[None, :], _round_even(va).to(tl.int32), mask=mask)


def quantize_unrotate(x: torch.Tensor, center: torch.Tensor, step: torch.Tensor, inv_freq: torch.Tensor | None,
                      token_start: int, token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """Host launcher: x (heads, tokens, dim) float32/float16/bfloat16, any strides -> int32 (heads, dim, tokens)
    on x's device. Values must be finite and |q| < 2^31 (kvq's plan guarantees both). token_factor: (heads,
    tokens) float32 step factors (kvq's token weights), or None."""
    heads, tokens, dim = x.shape
    q = torch.empty((heads, dim, tokens), dtype=torch.int32, device=x.device)
    if tokens == 0 or heads == 0 or dim == 0:
        return q
    a = dequantize_triton.launch(center, step, inv_freq, token_start, token_factor, heads, dim, tokens, x.device)
    quantize_unrotate_kernel[a.grid](x, a.center, a.step, a.cos, a.sin, a.cos.stride(0), a.token_factor, q, dim, tokens,
                                     *x.stride(), ROTATE=a.rotate, SCALED=a.scaled, CHANNELS=a.channels,
                                     BLOCK=a.block, num_warps=dequantize_triton.NUM_WARPS, enable_fp_fusion=False)
    return q
