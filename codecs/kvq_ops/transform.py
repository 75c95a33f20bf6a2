"""kvq version 4's per-head transform (codecs/transform.py holds the matrices), in its torch form (the reference):

- quantize_components_ref: the encoder's integers of a transformed layer, q = round(M^-1 u * 2^10) per token and
  head, u being version 3's unit-step values (x - center) / (step * g), in float64, and each component's class;
  its C form (transform.c, `quantize_components`) takes the product in float32 and redoes in float64 only the
  elements whose rounding a proven error bound leaves open, for the same integers;
- untransform_ref: the decoder's first step, float32(M q) * 2^-10, with M q computed exactly (an integer);
- the C form (transform.c) runs inside dequantize.reconstruct, after the expansion: for a channel-major output it
  also dequantizes, rotates and casts (the values of dequantize.c's loops, bit for bit). It reads each matrix as
  `prepare` lays it out once.

The decoder's arithmetic is specified to the bit (docs/codec.md, "Reconstruction"): every form computes M q
exactly, so the order of its sums does not matter, and rounds it once to float32. The encoder's is not: its
integers are whatever it writes, the float64 reference's here, with which tests/test_kvq_ops.py holds the C form.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .. import entropy
from ..transform import SCALE_BITS
from . import _kvq
from .quantize import narrow

UNIT = 2.0**-SCALE_BITS  # exact in float32: the scaling after the rounding changes no bit


class Prepared(NamedTuple):
    """A transform's matrices, int16 (heads, dim, dim), with what transform.c's product reads: pairs, int32 (heads,
    dim rounded up to 8, ceil(dim / 2)), each row's int16 pairs (M[i][2k], M[i][2k + 1]) (rows past dim zero), and
    row_sum, the largest sum of |M| over a row (with max |q|, it bounds the product's sums)."""

    matrix: np.ndarray
    pairs: np.ndarray
    row_sum: int


def prepare(matrix: np.ndarray) -> Prepared:
    """matrix as the C form reads it (_kvq.pair_rows): where dim is a multiple of 8 (every model's so far), the
    pairs are the matrix's own bytes, and only row_sum is computed (once per matrix: per segment, it took about 6%
    of Gemma 3's reconstruction); otherwise a padded copy."""
    matrix = np.ascontiguousarray(matrix, dtype=np.int16)
    heads, dim, _ = matrix.shape
    if dim % 8 == 0:
        return Prepared(matrix, matrix.view(np.int32), _kvq.pair_rows(matrix, heads, None))
    pairs = np.empty((heads, -(-dim // 8) * 8, (dim + 1) // 2), np.int32)
    return Prepared(matrix, pairs, _kvq.pair_rows(matrix, heads, pairs))


def quantize_components(body: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
                        token_factor: torch.Tensor | None, inverse: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """quantize_components_ref's integers and classes in one C pass (_kvq.quantize_components) over a float32 CPU
    body, without the GIL: the product in float32, in float64 where its error bound cannot decide the rounding."""
    if body.device.type != "cpu" or body.dtype != torch.float32 or body.numel() == 0:
        return quantize_components_ref(body, center, step, token_factor, inverse)
    body, center, step = body.contiguous(), center.float().cpu().contiguous(), step.float().cpu().contiguous()
    factor = token_factor.float().cpu().contiguous().numpy() if token_factor is not None else None
    inverse = np.ascontiguousarray(inverse, dtype=np.float64)  # Transforms.inverse's already is: no copy
    std = np.empty(center.shape, np.float64)
    for dtype in (torch.int16, torch.int32):
        q = torch.empty(body.shape, dtype=dtype)
        if _kvq.quantize_components(body.numpy(), center.numpy(), step.numpy(), factor, inverse, body.shape[0],
                                    q.numpy(), std) >= 0:
            return q, entropy.class_of(std) if body.shape[2] > 1 else entropy.classes_of(q.numpy())
    raise AssertionError("component integers always fit int32")


def quantize_components_ref(body: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
                            token_factor: torch.Tensor | None, inverse: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Component integers (heads, dim, tokens) of body (heads, dim, tokens) in the quantization space (RoPE
    undone), int16 where every one fits, else int32, and each component's class: u = (body - center) / (step *
    token_factor) per channel, then round(inverse @ u) per token, in float64 on the CPU. inverse: float64 (heads,
    dim, dim), Transforms.inverse."""
    body = body.detach().cpu().double()
    size = step.cpu().double()[..., None]
    if token_factor is not None:
        size = size * token_factor.cpu().double()[:, None, :]
    u = (body - center.cpu().double()[..., None]) / size
    q = torch.round(torch.from_numpy(inverse) @ u).to(torch.int32)
    return narrow(q), entropy.classes_of(q.numpy())


def untransform_ref(q: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """float32 (heads, dim, tokens) float32(M q) * 2^-10 for integers q (heads, dim, tokens) and int16 matrices
    M (heads, dim, dim), on q's device. float64 holds M q exactly: every partial sum is an integer below 2^53
    (|q| < 2^30, |M| <= 2^15, dim <= 256), whatever order the product sums in."""
    y = matrix.to(device=q.device, dtype=torch.float64) @ q.double()
    return y.float().mul_(UNIT)

