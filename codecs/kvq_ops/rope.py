"""RoPE as kvq codes keys: the rotary tables every form of every operation uses, and the rotations in torch.

kvq quantizes keys before RoPE (each channel is stationary there) and rotates them again on load. The tables are
specified to the bit (docs/codec.md, "Reconstruction"): float32 cos and sin of float64 angles, rounded once, so
that the torch, C and Triton forms and an independent decoder all rotate by the same numbers.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import numpy as np
import torch

TABLE_CACHE = 8  # (inv_freq, device) pairs whose cos/sin tables rope_tables_on keeps on the device
_tables: OrderedDict = OrderedDict()
_tables_lock = threading.Lock()


def rope_tables(inv_freq: torch.Tensor, token_start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin, each (head_dim / 2, tokens), of float64 angles position * inv_freq, for absolute
    positions token_start, token_start + 1, ..."""
    freq = inv_freq.cpu().numpy().astype(np.float64)
    return _rope_tables(freq.tobytes(), token_start, tokens)


@functools.lru_cache(maxsize=64)
def _rope_tables(freq: bytes, token_start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached: every layer and kind of a chunk shares its positions, and usually its frequencies."""
    angles = np.outer(np.frombuffer(freq, np.float64), np.arange(token_start, token_start + tokens, dtype=np.float64))
    return torch.from_numpy(np.cos(angles).astype(np.float32)), torch.from_numpy(np.sin(angles).astype(np.float32))


def rope_tables_on(inv_freq: torch.Tensor, token_start: int, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_tables' cos and sin (half, tokens) on `device`, as views into a per-(inv_freq, device) table of
    positions [0, 2^k) built once by `rope_tables`: every entry depends on its position alone, so a slice equals
    the table rope_tables builds for that range, and a file's layers share one build (the Triton forms' tables)."""
    freq = np.ascontiguousarray(inv_freq.detach().cpu().numpy(), dtype=np.float32)
    key = (freq.tobytes(), str(torch.device(device)))
    need = token_start + tokens
    with _tables_lock:
        hit = _tables.get(key)
        if hit is None or hit[0].shape[1] < need:
            cos, sin = rope_tables(torch.from_numpy(freq), 0, 1 << (max(need, 4096) - 1).bit_length())
            hit = _tables[key] = (cos.to(device), sin.to(device))
            while len(_tables) > TABLE_CACHE:
                _tables.popitem(last=False)
        _tables.move_to_end(key)
    return hit[0][:, token_start:need], hit[1][:, token_start:need]


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE (rotate-half layout) on (heads, head_dim, tokens) keys: rotate each pair back by its angle."""
    half = keys.shape[1] // 2
    x1, x2 = keys[:, :half], keys[:, half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=1)


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to pre-rotation (heads, head_dim, tokens) keys; the inverse of unrotate_keys.

    Each product and the difference are separate float32 operations (docs/codec.md, "Reconstruction").
    """
    half = keys.shape[1] // 2
    x1, x2 = keys[:, :half], keys[:, half:]
    out = torch.empty_like(keys)
    torch.mul(x1, cos, out=out[:, :half]).sub_(x2 * sin)
    torch.mul(x2, cos, out=out[:, half:]).add_(x1 * sin)
    return out
