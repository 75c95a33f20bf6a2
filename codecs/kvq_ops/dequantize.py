"""kvq's decoder arithmetic, integers back to cache values, in its torch form (the reference) and its C form
(dequantize.c, for CPU outputs of the file's dtype), with the Triton form in dequantize_triton.py:

- dequantize_rotate_ref: centre + (q * step) * token factor per channel, then RoPE back onto keys;
- reconstruct / reconstruct_ref: a segment's entropy-decoded symbols expanded, dequantized, rotated and cast into
  a (heads, tokens, dim) view of the cache, clamped to the float16 range for a float16 file (reconstruct_ref also
  with version 4's transform, transform.untransform_ref in front; reconstruct, transform.c's inverse transform).

Decoding arithmetic is specified to the bit (docs/codec.md, "Reconstruction"): float32 throughout, every multiply
and add a separate IEEE operation (no fused multiply-add), so that every form and an independent decoder
reproduce kvcli's values exactly; tests/test_kvq_ops.py holds the forms to it.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import entropy
from . import _kvq
from .rope import rope_tables, rotate_keys
from .transform import Prepared, prepare, untransform_ref

FLOAT16_MAX = 65504.0  # largest finite float16
HOST_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # _kvq.reconstruct's dtype codes


def dequantize(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
               token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """float32 center + (float32(q) * step) * token_factor: each multiply and the add a separate float32
    operation (never fused, so every decoder agrees). q: int32, or a transform's float32 values in its place."""
    v = torch.mul(q, step[..., None])  # int32 * float32 promotes q exactly as .float()
    if token_factor is not None:
        v.mul_(token_factor[:, None, :])
    return v.add_(center[..., None])


def dequantize_rotate_ref(q: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
                          inv_freq: torch.Tensor | None, token_start: int,
                          token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (heads, dim, tokens): center + (q * step) * token_factor per channel, then RoPE on keys (inv_freq
    given). The reference of every form."""
    x = dequantize(q, center.float(), step.float(), token_factor)
    if inv_freq is None or q.shape[2] == 0:
        return x
    cos, sin = rope_tables(inv_freq, token_start, q.shape[2])
    return rotate_keys(x, cos.to(x.device), sin.to(x.device))


def reconstruct(symbols: entropy.Symbols, tables: entropy.ClassTables, center: np.ndarray, step: np.ndarray,
                inv_freq: torch.Tensor | None, token_start: int, token_factor: torch.Tensor | None,
                body: torch.Tensor, matrix: np.ndarray | Prepared | None = None) -> None:
    """reconstruct_ref into body, a CPU (heads, tokens, dim) view of any strides, in one C pass over each element
    (_kvq.reconstruct) without the GIL. center and step: float32 (heads * dim,); matrix: version 4's transform,
    int16 (heads, dim, dim), best prepared once (transform.prepare), or None. The C code refuses strides that
    would write outside body's storage."""
    heads, tokens, dim = body.shape
    cos = sin = None
    if inv_freq is not None:
        cos, sin = (t.numpy() for t in rope_tables(inv_freq, token_start, tokens))
    lay = symbols.layout
    storage = torch.empty(0, dtype=torch.uint8).set_(body.untyped_storage()).numpy()
    place = np.array([body.storage_offset(), heads, dim, *body.stride()], np.int64)
    if matrix is not None and not isinstance(matrix, Prepared):
        matrix = prepare(matrix)
    _kvq.reconstruct(symbols.symbols, lay.spec, lay.rows, lay.tokens, *tables.digits, symbols.escapes, center, step,
                     token_factor.numpy() if token_factor is not None else None, cos, sin, storage, place,
                     HOST_DTYPES[body.dtype], *(matrix if matrix is not None else ()))


def reconstruct_ref(symbols: entropy.Symbols, tables: entropy.ClassTables, center: torch.Tensor, step: torch.Tensor,
                    inv_freq: torch.Tensor | None, token_start: int, token_factor: torch.Tensor | None,
                    body: torch.Tensor, file_dtype: str, matrix: torch.Tensor | None = None) -> None:
    """The segment's integers (symbols expanded under `tables`) through dequantize_rotate_ref into body, a
    (heads, tokens, dim) view on any device and of any float dtype; center and step: float32 (heads, dim). With
    a transform's int16 matrices (heads, dim, dim), the integers are components, and untransform_ref's values
    take their place. The values of a float16 file are clamped to its range."""
    heads, tokens, dim = body.shape
    device = body.device
    q = torch.from_numpy(symbols.rows(tables)).reshape(heads, dim, tokens).to(device)
    if matrix is not None:
        q = untransform_ref(q, matrix)
    values = dequantize_rotate_ref(q, center.to(device), step.to(device),
                                   inv_freq.to(device) if inv_freq is not None else None, token_start,
                                   token_factor.to(device) if token_factor is not None else None)
    if file_dtype == "float16":  # a value within step/2 of 65504 must not round to infinity
        values = values.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    body.copy_(values.transpose(1, 2))
