"""The rotary-embedding frequencies a model applies to each layer's keys, read from the model itself."""

from __future__ import annotations

import numpy as np
import torch


def inv_freq_per_layer(model) -> list[np.ndarray | None] | None:
    """(head_dim / 2,) float32 per layer, or None when the model has no rotate-half RoPE we can find.

    The codec only needs an invertible rotation: a wrong frequency costs compression, never correctness,
    because the decoder re-applies exactly the rotation the encoder removed.
    """
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None:
        return None
    config = model.config.get_text_config(decoder=True)
    layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None) or [None] * layers
    out: list[np.ndarray | None] = []
    for layer_type in layer_types:
        freq = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
        if freq is None:
            freq = getattr(rotary, "inv_freq", None)
        out.append(freq.detach().to(torch.float32).cpu().numpy().copy() if isinstance(freq, torch.Tensor) else None)
    return out if any(f is not None for f in out) else None


def shift_keys(keys: torch.Tensor, inv_freq: torch.Tensor, offset: int) -> torch.Tensor:
    """Keys (heads, tokens, head_dim) rotated by RoPE at position p, moved to position p + offset.

    Rotations compose, R(p + offset) = R(offset) R(p), so rotating by the offset alone is exact for rotate-half
    RoPE. The angles are taken in float64 (a float32 product offset * inv_freq loses up to 1e-4 rad at long
    offsets), the rotation is applied in float32 and the result cast back to the keys' dtype. A negative offset
    moves keys back; shift_keys(shift_keys(k, f, d), f, -d) == k up to float32 rounding.
    """
    if offset == 0:
        return keys
    angles = inv_freq.to(torch.float64).cpu() * offset
    cos = angles.cos().to(torch.float32).to(keys.device)
    sin = angles.sin().to(torch.float32).to(keys.device)
    k = keys.to(torch.float32)
    half = k.shape[-1] // 2
    x1, x2 = k[..., :half], k[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(keys.dtype)
