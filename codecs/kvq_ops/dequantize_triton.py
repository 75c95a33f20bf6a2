"""The Triton form of kvq's dequantization (dequantize.py holds the torch and C forms): integers to values, RoPE
back onto keys, cast, in one pass on the GPU.

Reference: dequantize.py's dequantize_rotate_ref. Imported only where the triton backend runs (it needs triton).

q is channel-major int32 (heads, dim, tokens); center and step are float32 (heads, dim). For keys, inv_freq
(dim / 2,) rotates channel pairs (i, i + dim/2) by (token_start + t) * inv_freq[i] (rotate-half layout); the
launcher passes the reference's own cos and sin tables (float64 angles rounded once), built once per rotary
frequency vector and device and kept there (rope.rope_tables_on). Every product and sum is
its own float32 operation (the launch turns off multiply-add fusion), so the kernel reproduces the reference's
values bit for bit (docs/codec.md, "Reconstruction").

The output is any (heads, tokens, dim) tensor of float32, float16 or bfloat16 with any strides, such as a
transformers cache layer's [0]: the kernel writes it directly, clamping to the float16 range where the output is
float16 and rounding to nearest-even on the cast, as `Tensor.copy_` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .rope import rope_tables_on

BLOCK_TOKENS = 256
# Values per program (per half with RoPE) and warps: bench/kernel_bandwidth.py --sweep on an H200 found 4096 and 8 the
# fastest for dequantizing keys and values together (234 us for 2 x 33.5 M elements; 2048/4: 250, 8192/8: 278).
TILE_ELEMENTS = 4096
NUM_WARPS = 8
FLOAT16_MAX = tl.constexpr(65504.0)


@triton.jit
def _cast(v, out_ptr, CLAMP: tl.constexpr, BF16: tl.constexpr):
    if CLAMP:
        v = tl.minimum(tl.maximum(v, -FLOAT16_MAX), FLOAT16_MAX)
    if BF16:
        # Round to nearest-even by hand: the interpreter's cast truncates, and both paths must agree.
        b = v.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(out_ptr.dtype.element_ty)


@triton.jit
def dequantize_rotate_kernel(q_ptr, center_ptr, step_ptr, cos_ptr, sin_ptr, cs_stride, tok_ptr, out_ptr, dim, tokens,
                             out_sh, out_st, out_sc, ROTATE: tl.constexpr, CLAMP: tl.constexpr, BF16: tl.constexpr,
                             SCALED: tl.constexpr, CHANNELS: tl.constexpr, BLOCK: tl.constexpr):
    # One program: one head, a block of tokens, every channel (ROTATE: the first halves of the pairs).
    head = tl.program_id(0)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    c = tl.arange(0, CHANNELS)
    half = dim // 2
    width = half if ROTATE else dim
    mask = (c[:, None] < width) & (t[None, :] < tokens)
    row_a = head * dim + c
    qa = tl.load(q_ptr + row_a[:, None] * tokens + t[None, :], mask=mask, other=0).to(tl.float32)
    sa = tl.load(step_ptr + row_a, mask=c < width, other=1.0)
    ca = tl.load(center_ptr + row_a, mask=c < width, other=0.0)
    if SCALED:  # token weights: (q * step) * factor, then + centre (docs/codec.md, "Reconstruction")
        g = tl.load(tok_ptr + head * tokens + t, mask=t < tokens, other=1.0)
        xa = (qa * sa[:, None]) * g[None, :] + ca[:, None]
    else:
        xa = qa * sa[:, None] + ca[:, None]
    out_a = out_ptr + head * out_sh + t[None, :] * out_st + c[:, None] * out_sc
    if ROTATE:
        row_b = row_a + half
        qb = tl.load(q_ptr + row_b[:, None] * tokens + t[None, :], mask=mask, other=0).to(tl.float32)
        sb = tl.load(step_ptr + row_b, mask=c < width, other=1.0)
        cb = tl.load(center_ptr + row_b, mask=c < width, other=0.0)
        if SCALED:
            xb = (qb * sb[:, None]) * g[None, :] + cb[:, None]
        else:
            xb = qb * sb[:, None] + cb[:, None]
        cs = tl.load(cos_ptr + c[:, None] * cs_stride + t[None, :], mask=mask, other=0.0)
        sn = tl.load(sin_ptr + c[:, None] * cs_stride + t[None, :], mask=mask, other=0.0)
        ya = xa * cs - xb * sn
        yb = xb * cs + xa * sn
        tl.store(out_a, _cast(ya, out_ptr, CLAMP, BF16), mask=mask)
        tl.store(out_a + half * out_sc, _cast(yb, out_ptr, CLAMP, BF16), mask=mask)
    else:
        tl.store(out_a, _cast(xa, out_ptr, CLAMP, BF16), mask=mask)


def tile(width: int) -> tuple[int, int]:
    """(channels, tokens) of a program's tile for `width` channels, powers of two."""
    channels = triton.next_power_of_2(width)
    return channels, max(1, min(BLOCK_TOKENS, TILE_ELEMENTS // channels))


class Launch(NamedTuple):
    """What the quantize and dequantize kernels both take besides their own tensors."""

    center: torch.Tensor
    step: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    token_factor: torch.Tensor
    rotate: bool
    scaled: bool
    channels: int
    block: int
    grid: tuple[int, int]


def launch(center: torch.Tensor, step: torch.Tensor, inv_freq: torch.Tensor | None, token_start: int,
           token_factor: torch.Tensor | None, heads: int, dim: int, tokens: int, device) -> Launch:
    """Checked arguments on `device`: float32 centres and steps, the rotary tables, the token factors, the tile and
    grid. Where the kernel does not rotate or scale, the centres stand in as unused pointers."""
    rotate = inv_freq is not None
    if rotate and dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {dim}")
    center, step = center.float().to(device).contiguous(), step.float().to(device).contiguous()
    cos, sin = rope_tables_on(inv_freq, token_start, tokens, device) if rotate else (center, center)
    scaled = token_factor is not None
    if scaled:
        if token_factor.shape != (heads, tokens):
            raise ValueError(f"token_factor must be (heads, tokens) = {(heads, tokens)}, got {tuple(token_factor.shape)}")
        token_factor = token_factor.float().to(device).contiguous()
    channels, block = tile(dim // 2 if rotate else dim)
    return Launch(center, step, cos, sin, token_factor if scaled else center, rotate, scaled, channels, block,
                  (heads, triton.cdiv(tokens, block)))


def dequantize_rotate(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor, inv_freq: torch.Tensor | None,
                      token_start: int, out: torch.Tensor | None = None,
                      token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """Host launcher. Without `out`: float32 (heads, dim, tokens) on q's device, the reference's values. With
    `out` (heads, tokens, dim), float32/float16/bfloat16, any strides, on q's device: written in place, as
    `out.copy_(reference.clamp(float16 range if float16).transpose(1, 2))` would, and returned. token_factor:
    (heads, tokens) float32 step factors (kvq's token weights), or None."""
    heads, dim, tokens = q.shape
    if out is None:
        result = torch.empty((heads, dim, tokens), dtype=torch.float32, device=q.device)
        view = result.transpose(1, 2)
    else:
        if out.shape != (heads, tokens, dim) or out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"out must be float (heads, tokens, dim) = {(heads, tokens, dim)}, got "
                             f"{out.dtype} {tuple(out.shape)}")
        result = view = out
    if tokens == 0 or heads == 0 or dim == 0:
        return result
    a = launch(center, step, inv_freq, token_start, token_factor, heads, dim, tokens, q.device)
    dequantize_rotate_kernel[a.grid](q.contiguous(), a.center, a.step, a.cos, a.sin, a.cos.stride(0), a.token_factor,
                                     view, dim, tokens, *view.stride(), ROTATE=a.rotate,
                                     CLAMP=view.dtype == torch.float16, BF16=view.dtype == torch.bfloat16,
                                     SCALED=a.scaled, CHANNELS=a.channels, BLOCK=a.block, num_warps=NUM_WARPS,
                                     enable_fp_fusion=False)
    return result
