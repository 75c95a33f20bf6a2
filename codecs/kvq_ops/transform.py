"""kvq version 4's per-head transform (codecs/transform.py holds the matrices), in its torch form (the reference):

- quantize_components: the encoder's integers of a transformed layer, q = round(M^-1 u * 2^10) per token and head,
  u being version 3's unit-step values (x - center) / (step * g);
- untransform_ref: the decoder's first step, float32(M q) * 2^-10, with M q computed exactly (an integer);
- the C form (transform.c) runs inside dequantize.reconstruct, between the expansion and the dequantization.

The decoder's arithmetic is specified to the bit (docs/codec.md, "Reconstruction"): every form computes M q
exactly, so the order of its sums does not matter, and rounds it once to float32. The encoder's is not: its
integers are whatever it writes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..transform import SCALE_BITS

UNIT = 2.0**-SCALE_BITS  # exact in float32: the scaling after the rounding changes no bit


def quantize_components(body: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
                        token_factor: torch.Tensor | None, inverse: np.ndarray) -> torch.Tensor:
    """int32 (heads, dim, tokens) component integers of body (heads, dim, tokens) in the quantization space (RoPE
    undone): u = (body - center) / (step * token_factor) per channel, then round(inverse @ u) per token, in
    float64 on the CPU. inverse: float64 (heads, dim, dim), Transforms.inverse."""
    body = body.detach().cpu().double()
    size = step.cpu().double()[..., None]
    if token_factor is not None:
        size = size * token_factor.cpu().double()[:, None, :]
    u = (body - center.cpu().double()[..., None]) / size
    return torch.round(torch.from_numpy(inverse) @ u).to(torch.int32)


def untransform_ref(q: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """float32 (heads, dim, tokens) float32(M q) * 2^-10 for integers q (heads, dim, tokens) and int16 matrices
    M (heads, dim, dim), on q's device. float64 holds M q exactly: every partial sum is an integer below 2^53
    (|q| < 2^30, |M| <= 2^15, dim <= 256), whatever order the product sums in."""
    y = matrix.to(device=q.device, dtype=torch.float64) @ q.double()
    return y.float().mul_(UNIT)

