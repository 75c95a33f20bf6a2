"""The Triton form of kvq version 4's inverse transform (transform.py holds the torch form, transform.c the C one):
per head, float32(M q) * 2^-10 for the int16 matrices M (heads, dim, dim) and a run's integers q (heads, dim,
tokens) on the device, before dequantize_triton's kernel takes these values in place of float32(q).

Exact, as docs/codec.md "Reconstruction" asks: where max|q| times M's largest row sum of |M| is below 2^24,
every partial sum of M q is an integer that float32 holds, so the kernel's float32 dot product in IEEE precision
(no TF32) gives M q exactly in any order; otherwise the launcher falls back to the torch form's float64 product
(exact there too), on the same device. Imported only where the triton backend runs (it needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .transform import UNIT, untransform_ref

FLOAT32_EXACT = 1 << 24  # float32 holds every integer up to here exactly
BLOCK_ROWS = 64
BLOCK_TOKENS = 64
BLOCK_INNER = 32
MIN_DOT = 16  # tl.dot's smallest dimension
SCALE = tl.constexpr(UNIT)


@triton.jit
def untransform_kernel(m_ptr, q_ptr, w_ptr, dim, tokens, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # One program: one head, BM rows of M q, BN tokens; the inner dimension in blocks of BK.
    head = tl.program_id(0)
    i = tl.program_id(1) * BM + tl.arange(0, BM)
    t = tl.program_id(2) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, dim, BK):
        j = k0 + tl.arange(0, BK)
        m = tl.load(m_ptr + head * dim * dim + i[:, None] * dim + j[None, :],
                    mask=(i[:, None] < dim) & (j[None, :] < dim), other=0).to(tl.float32)
        q = tl.load(q_ptr + head * dim * tokens + j[:, None] * tokens + t[None, :],
                    mask=(j[:, None] < dim) & (t[None, :] < tokens), other=0).to(tl.float32)
        acc = tl.dot(m, q, acc, input_precision="ieee")
    tl.store(w_ptr + head * dim * tokens + i[:, None] * tokens + t[None, :], acc * SCALE,
             mask=(i[:, None] < dim) & (t[None, :] < tokens))


def row_sum(matrix: torch.Tensor) -> int:
    """The largest sum of |M| over a row of any head: |M q| <= max|q| times it."""
    return int(matrix.to(torch.int64).abs().sum(dim=2).max()) if matrix.numel() else 0


def untransform(q: torch.Tensor, matrix: torch.Tensor, largest: int, rows: int | None = None) -> torch.Tensor:
    """float32 (heads, dim, tokens) untransform_ref's values for integers q (heads, dim, tokens) int32 on the
    device whose magnitudes are at most `largest`, with int16 matrices (heads, dim, dim) on the same device; rows:
    row_sum(matrix), if the caller keeps it."""
    heads, dim, tokens = q.shape
    rows = row_sum(matrix) if rows is None else rows
    if largest * rows >= FLOAT32_EXACT:
        return untransform_ref(q, matrix)
    w = torch.empty((heads, dim, tokens), dtype=torch.float32, device=q.device)
    if w.numel() == 0:
        return w
    size = max(MIN_DOT, triton.next_power_of_2(dim))
    bm, bk = min(BLOCK_ROWS, size), min(BLOCK_INNER, size)
    grid = (heads, triton.cdiv(dim, bm), triton.cdiv(tokens, BLOCK_TOKENS))
    untransform_kernel[grid](matrix.contiguous(), q.contiguous(), w, dim, tokens, BM=bm, BN=BLOCK_TOKENS, BK=bk)
    return w
