"""kvq's encoder arithmetic, each operation in its torch form (`*_ref`, the reference) and its C form
(quantize.c, for CPU tensors), with the Triton form of the fused segment path in quantize_triton.py:

- to_channels: a layer (heads, tokens, dim) into the quantization space, float32 (heads, dim, tokens), RoPE
  undone on keys;
- deviations: each channel's largest deviation from its centre and the squares that set the steps;
- quantize_classes: the integers, and each channel's class from their spread;
- quantize_segment: to_channels then quantize for one segment (the Triton form fuses them).

Everything works channel-major, (heads, head_dim, tokens): each channel's tokens are contiguous, which is the
order the entropy coder consumes, and per-channel parameters broadcast over the last axis. Every form computes
the same float32 operations in the same order (no fused multiply-add, division correctly rounded, ties to
even), so they give the same integers; tests/test_kvq_ops.py holds them to it.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import entropy
from . import _kvq
from .rope import rope_tables, unrotate_keys


def to_channels(x: torch.Tensor, inv_freq: torch.Tensor | None, token_start: int) -> torch.Tensor:
    """to_channels_ref's values, for a float32 CPU tensor in one C pass (_kvq.unrotate) instead of torch's six."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad or x.shape[1] == 0:
        return to_channels_ref(x, inv_freq, token_start)
    heads, tokens, dim = x.shape
    cos, sin = rope_tables(inv_freq, token_start, tokens) if inv_freq is not None else (None, None)
    body = torch.empty((heads, dim, tokens), dtype=torch.float32)
    _kvq.unrotate(x.numpy(), *(t.numpy() if t is not None else None for t in (cos, sin)), body.numpy())
    return body


def to_channels_ref(x: torch.Tensor, inv_freq: torch.Tensor | None, token_start: int) -> torch.Tensor:
    """(heads, tokens, dim) of any float dtype and device -> float32 (heads, dim, tokens) on that device, with
    RoPE undone where inv_freq (dim / 2,) is given (keys) for absolute positions from token_start."""
    x = x.float().transpose(1, 2).contiguous()
    if inv_freq is None or x.shape[2] == 0:
        return x
    cos, sin = rope_tables(inv_freq, token_start, x.shape[2])
    return unrotate_keys(x, cos.to(x.device), sin.to(x.device))


def quantize(x: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
             token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform quantization: int32 q with |x - dequantize(q)| <= step * token_factor / 2 per element (up to
    float32 rounding): the rounding rule every form follows.

    x is (heads, dim, tokens); center and step are (heads, dim), one per channel; token_factor, if given,
    (heads, tokens) float32, one per token of each head (docs/codec.md, "Token weights").
    """
    size = step[..., None] if token_factor is None else step[..., None] * token_factor[:, None, :]
    return torch.round((x - center[..., None]) / size).to(torch.int32)


def deviations(body: torch.Tensor, center: torch.Tensor,
               token_factor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """deviations_ref's tensors, in one C pass (_kvq.deviations) for a float32 CPU body; torch's where any
    deviation is not finite, so that the fit's error path sees what it always saw."""
    if body.device.type != "cpu" or body.requires_grad or body.numel() == 0:
        return deviations_ref(body, center, token_factor)
    body, center = body.float().contiguous(), center.float().contiguous()
    factor = token_factor.float().contiguous().numpy() if token_factor is not None else None
    spread, squares = torch.empty(center.shape), torch.empty(body.shape)
    if not _kvq.deviations(body.numpy(), center.numpy(), factor, body.shape[0], spread.numpy(), squares.numpy()):
        return deviations_ref(body, center, token_factor)
    return spread, squares


def deviations_ref(body: torch.Tensor, center: torch.Tensor,
                   token_factor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel the largest |body - center|; per element ((body - center) / token_factor)^2, whose mean per
    head is the rms that sets the head's step."""
    dev = body - center[..., None]
    spread_of = dev if token_factor is None else dev / token_factor[:, None, :]
    return dev.abs().amax(dim=2), spread_of.pow(2)


def quantize_classes(body: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
                     token_factor: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray]:
    """quantize_classes_ref's integers and classes in one C pass (_kvq.quantize) over a CPU body: the integers
    are written straight as int16 when they fit (as nearly always), the classes' sums taken on the way."""
    if body.device.type != "cpu" or body.shape[2] < 2 or body.numel() == 0:
        return quantize_classes_ref(body, center, step, token_factor)
    body, center, step = (t.float().contiguous() for t in (body, center, step))
    factor = token_factor.float().contiguous().numpy() if token_factor is not None else None
    std = np.empty(center.shape, np.float64)
    for dtype in (torch.int16, torch.int32):
        q = torch.empty(body.shape, dtype=dtype)
        if _kvq.quantize(body.numpy(), center.numpy(), step.numpy(), factor, body.shape[0], q.numpy(), std):
            return q, entropy.class_of(std)
    raise AssertionError("kvq integers always fit int32")


def quantize_classes_ref(body: torch.Tensor, center: torch.Tensor, step: torch.Tensor,
                         token_factor: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray]:
    """quantize's integers (int16 where every one fits, else int32) and the class of each channel."""
    q = quantize(body, center, step, token_factor).cpu()
    return narrow(q), entropy.classes_of(q.numpy())


def narrow(q: torch.Tensor) -> torch.Tensor:
    """int16 when every integer of the layer fits, as nearly always: half the memory the encoder holds."""
    if q.numel():
        lo, hi = torch.aminmax(q)
        if int(lo) >= -(1 << 15) and int(hi) < 1 << 15:
            return q.to(torch.int16)
    return q


def quantize_segment(x: torch.Tensor, center: torch.Tensor, step: torch.Tensor, inv_freq: torch.Tensor | None,
                     token_start: int, token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """A segment's int32 integers (heads, dim, tokens) from its values x (heads, tokens, dim) on the CPU:
    to_channels, then quantize (the integers of quantize_segment_ref)."""
    return quantize(to_channels(x, inv_freq, token_start), center, step, token_factor)


def quantize_segment_ref(x: torch.Tensor, center: torch.Tensor, step: torch.Tensor, inv_freq: torch.Tensor | None,
                         token_start: int, token_factor: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_segment in torch on x's device: the reference of quantize_triton.quantize_unrotate."""
    device = x.device
    return quantize(to_channels_ref(x, inv_freq, token_start), center.float().to(device), step.float().to(device),
                    token_factor.float().to(device) if token_factor is not None else None)
