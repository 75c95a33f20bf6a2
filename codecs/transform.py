"""kvq version 4's per-model transform: one orthogonal basis per (layer, K/V, head), stored as int16 matrices.

A file coded with a transform stores the integers of the basis's components instead of the channels' (docs/codec.md,
"Version 4: transform"): the encoder rounds c = M^-1 u * 2^SCALE_BITS, where u is version 3's unit-step vector of a
token and head and M the head's int16 matrix, whose column j is component j's basis vector times 2^SCALE_BITS,
rounded; the decoder computes M q exactly, in integers, so its inverse needs no floating-point agreement. The
matrices are a model's, not a file's: their bytes (`pack`) are the payload of a dictionary file
(kvcli/container/dictionary.py), which a file names by its SHA-256.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from .base import CodecError

SCALE_BITS = 10
# A head dimension above this is never transformed: with |q| < 2^30 and |M| <= 2^15, sums of at most 256 products
# stay below 2^53, so float64 computes M q exactly (docs/codec.md, "Reconstruction").
MAX_DIM = 256
# Component integers of a transformed layer and kind lie in (-MAX_COMPONENT, MAX_COMPONENT): the encoder's step
# floor keeps them there and the decoder refuses escapes outside.
MAX_COMPONENT = 1 << 30
ORTHONORMAL_TOLERANCE = 1e-4
ENTRY = struct.Struct("<IBHH")  # layer, kind, heads, dim


class Transforms:
    """int16 matrices (heads, dim, dim) by (layer, kind); a (layer, kind) without one is coded without transform."""

    def __init__(self, matrices: dict[tuple[int, int], np.ndarray]):
        if not matrices:
            raise CodecError("a transform dictionary needs at least one matrix")
        for (layer, kind), m in matrices.items():
            if kind not in (0, 1) or not 0 <= layer < 1 << 32:
                raise CodecError(f"transform for layer {layer} kind {kind}: no such layer and kind")
            if m.dtype != np.int16 or m.ndim != 3 or m.shape[1] != m.shape[2] or not 1 <= m.shape[0] < 1 << 16 \
                    or not 1 <= m.shape[1] <= MAX_DIM:
                raise CodecError(f"transform for layer {layer} kind {kind}: int16 (heads, dim, dim) with dim at most "
                                 f"{MAX_DIM}, got {m.dtype} {m.shape}")
        self.matrices = {key: np.ascontiguousarray(matrices[key]) for key in sorted(matrices)}
        self._inverses: dict[tuple[int, int], np.ndarray] = {}
        self._gains: dict[tuple[int, int], np.ndarray] = {}
        self.prepared: dict = {}  # the CPU decoder's layout of each matrix (kvq_ops.transform.prepare), filled by it

    @classmethod
    def from_bases(cls, bases: dict[tuple[int, int], np.ndarray]) -> "Transforms":
        """From float bases (heads, dim, dim), each head's columns orthonormal (component j in column j)."""
        matrices = {}
        for key, b in bases.items():
            b = np.asarray(b, dtype=np.float64)
            if b.ndim != 3 or b.shape[1] != b.shape[2] or not np.isfinite(b).all():
                raise CodecError(f"basis for layer {key[0]} kind {key[1]}: finite (heads, dim, dim), got {b.shape}")
            gram = np.einsum("hij,hik->hjk", b, b)
            if np.abs(gram - np.eye(b.shape[1])).max(initial=0.0) > ORTHONORMAL_TOLERANCE:
                raise CodecError(f"basis for layer {key[0]} kind {key[1]}: columns are not orthonormal")
            matrices[key] = np.rint(b * (1 << SCALE_BITS)).astype(np.int16)
        return cls(matrices)

    def shape(self, key: tuple[int, int]) -> tuple[int, int] | None:
        """(heads, dim) of a (layer, kind)'s matrices, None without a transform."""
        m = self.matrices.get(key)
        return None if m is None else (m.shape[0], m.shape[1])

    def inverse(self, key: tuple[int, int]) -> np.ndarray:
        """float64 (heads, dim, dim) M^-1 * 2^SCALE_BITS, what the encoder multiplies unit-step vectors by;
        CodecError for a singular matrix (a dictionary no calibration writes)."""
        inv = self._inverses.get(key)
        if inv is None:
            # torch's LAPACK, not numpy's: numpy's threads made a 256 x 256 inverse take a second on a busy machine.
            m = torch.from_numpy(self.matrices[key].astype(np.float64))
            inv, info = torch.linalg.inv_ex(m)
            residual = (m @ inv - torch.eye(m.shape[1], dtype=torch.float64)).abs().amax() if m.numel() else 0.0
            if bool((info != 0).any()) or not float(residual) < 1e-6:
                raise CodecError(f"transform for layer {key[0]} kind {key[1]} is singular: it cannot encode")
            # C order, as the encoder's C form takes it (LAPACK's result is column-major): copied once, not per call.
            # The gain first: a thread that finds the inverse also finds its gain.
            inv = np.ascontiguousarray(inv.numpy() * (1 << SCALE_BITS))
            self._gains[key] = np.abs(inv).sum(axis=2).max(axis=1)
            self._inverses[key] = inv
        return inv

    def gain(self, key: tuple[int, int]) -> np.ndarray:
        """float64 (heads,): per head the largest sum of |M^-1 * 2^SCALE_BITS| over a component's row, so that
        |c| <= gain * max |u|: the encoder's step floor divides by it."""
        self.inverse(key)
        return self._gains[key]

    def pack(self) -> bytes:
        """u32 count, then per (layer, kind) in increasing order: u32 layer, u8 kind, u16 heads, u16 dim, and the
        heads * dim * dim int16 entries, row-major (head, row i, column j), little-endian."""
        parts = [struct.pack("<I", len(self.matrices))]
        for (layer, kind), m in self.matrices.items():
            parts += [ENTRY.pack(layer, kind, m.shape[0], m.shape[1]), m.astype("<i2").tobytes()]
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes) -> "Transforms":
        """pack's bytes, every size checked before it is read; CodecError on anything malformed."""
        if len(data) < 4:
            raise CodecError("transform bytes are truncated")
        (count,) = struct.unpack_from("<I", data, 0)
        pos, matrices, last = 4, {}, None
        for _ in range(count):
            if pos + ENTRY.size > len(data):
                raise CodecError("transform bytes are truncated")
            layer, kind, heads, dim = ENTRY.unpack_from(data, pos)
            pos += ENTRY.size
            if kind > 1 or heads < 1 or not 1 <= dim <= MAX_DIM:
                raise CodecError(f"transform entry for layer {layer} kind {kind}: {heads} heads of dim {dim} (kind "
                                 f"0 or 1, at least one head, dim 1 to {MAX_DIM})")
            if last is not None and (layer, kind) <= last:
                raise CodecError("transform entries must be in increasing (layer, kind) order, each once")
            last = (layer, kind)
            n = heads * dim * dim
            if pos + 2 * n > len(data):
                raise CodecError(f"transform for layer {layer} kind {kind} is truncated")
            matrices[(layer, kind)] = np.frombuffer(data, "<i2", n, pos).astype(np.int16).reshape(heads, dim, dim)
            pos += 2 * n
        if pos != len(data):
            raise CodecError(f"transform bytes have {len(data) - pos} trailing bytes")
        return cls(matrices)
