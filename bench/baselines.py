"""Baseline KV codecs, implemented beside kvcli's so that one run measures all of them.

Each baseline turns a cache into real bytes (packed integers, scales, coded streams) and back; sizes are the
lengths of those bytes, never estimates. Every function takes and returns (heads, tokens, dim) float tensors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from kvcli.codecs import rans


@dataclass
class Encoded:
    blobs: list[bytes]  # one per (layer, K/V)

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.blobs)


def _pack_bits(q: np.ndarray, bits: int) -> bytes:
    """Unsigned ints below 2**bits packed little-endian, 8 // bits per byte (bits in 2, 4, 8)."""
    per = 8 // bits
    flat = q.astype(np.uint8).reshape(-1)
    pad = (-len(flat)) % per
    flat = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, per)
    out = np.zeros(len(flat), np.uint8)
    for j in range(per):
        out |= flat[:, j] << (bits * j)
    return out.tobytes()


def _unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    per = 8 // bits
    raw = np.frombuffer(data, np.uint8)
    out = np.stack([(raw >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=1).reshape(-1)
    return out[:count]


# ---------------------------------------------------------------- int8 per token (CacheGen's 8-bit baseline)


def int8_per_token_encode(x: torch.Tensor) -> bytes:
    scale = x.abs().amax(dim=(0, 2), keepdim=True).clamp_min(1e-8) / 127  # one scale per token over heads x dim
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return scale.half().numpy().tobytes() + q.numpy().tobytes()


def int8_per_token_decode(data: bytes, shape) -> torch.Tensor:
    h, t, d = shape
    scale = torch.from_numpy(np.frombuffer(data, np.float16, t).copy()).float().reshape(1, t, 1)
    q = torch.from_numpy(np.frombuffer(data, np.int8, h * t * d, 2 * t).copy()).float().reshape(h, t, d)
    return q * scale


# ---------------------------------------------------------------- int4, symmetric, groups of 64 channels


def int4_g64_encode(x: torch.Tensor) -> bytes:
    h, t, d = x.shape
    g = x.reshape(h, t, -1, 64) if d % 64 == 0 else x.reshape(h, t, 1, d)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7
    q = (torch.round(g / scale).clamp(-8, 7) + 8).to(torch.uint8)
    return scale.half().numpy().tobytes() + _pack_bits(q.numpy(), 4)


def int4_g64_decode(data: bytes, shape) -> torch.Tensor:
    h, t, d = shape
    groups = d // 64 if d % 64 == 0 else 1
    n_scale = h * t * groups
    scale = torch.from_numpy(np.frombuffer(data, np.float16, n_scale).copy()).float().reshape(h, t, groups, 1)
    q = _unpack_bits(data[2 * n_scale :], 4, h * t * d).astype(np.float32) - 8
    return (torch.from_numpy(q).reshape(h, t, groups, -1) * scale).reshape(h, t, d)


# ---------------------------------------------------------------- KIVI (Liu et al., ICML 2024)


def kivi_encode(x: torch.Tensor, bits: int, per_channel: bool, group: int = 32) -> bytes:
    """Asymmetric min/max quantization: keys per channel (groups of `group` tokens), values per token
    (groups of `group` channels). float16 scale and minimum per group."""
    h, t, d = x.shape
    y = x.transpose(1, 2) if per_channel else x  # group along the last axis
    n = y.shape[-1]
    pad = (-n) % group
    y = torch.nn.functional.pad(y, (0, pad), mode="replicate") if pad else y
    g = y.reshape(*y.shape[:-1], -1, group)
    lo = g.amin(-1, keepdim=True)
    scale = (g.amax(-1, keepdim=True) - lo).clamp_min(1e-8) / (2**bits - 1)
    q = torch.round((g - lo) / scale).clamp(0, 2**bits - 1).to(torch.uint8)
    return lo.half().numpy().tobytes() + scale.half().numpy().tobytes() + _pack_bits(q.numpy(), bits)


def kivi_decode(data: bytes, shape, bits: int, per_channel: bool, group: int = 32) -> torch.Tensor:
    h, t, d = shape
    outer, n = ((h, d), t) if per_channel else ((h, t), d)
    ng = -(-n // group)
    count = outer[0] * outer[1] * ng
    lo = torch.from_numpy(np.frombuffer(data, np.float16, count).copy()).float().reshape(*outer, ng, 1)
    scale = torch.from_numpy(np.frombuffer(data, np.float16, count, 2 * count).copy()).float().reshape(*outer, ng, 1)
    q = _unpack_bits(data[4 * count :], bits, count * group).astype(np.float32)
    y = (torch.from_numpy(q).reshape(*outer, ng, group) * scale + lo).reshape(*outer, ng * group)[..., :n]
    return y.transpose(1, 2) if per_channel else y


# ---------------------------------------------------------------- CacheGen as shipped


def cachegen_bins(layer: int, layers: int, kind: int, all_bins: int | None) -> int:
    """CacheGen's public code: 32 bins for keys in the first third of layers and for values in the first
    two layers, 16 elsewhere. `all_bins` overrides that with one count everywhere."""
    if all_bins:
        return all_bins
    if kind == 0:
        return 32 if layer < layers // 3 else 16
    return 32 if layer < 2 else 16


def _cachegen_tables(cdfs: np.ndarray) -> rans.Tables:
    """One rANS table per channel from its int16 CDF (every symbol kept decodable, as the coder needs)."""
    return rans.Tables([rans.normalize_counts(np.maximum(np.diff(c.astype(np.int64)), 0)) for c in cdfs])


def cachegen_encode(x: torch.Tensor, bins: int, chunk: int = 256) -> bytes:
    """Per-token symmetric scale over all channels of the layer; symbols in [0, bins]; one empirical CDF per
    channel per `chunk` tokens, stored as int16; entropy-coded channel by channel (kvcli's rANS stream, one
    stream per channel, in place of CacheGen's arithmetic coder: same tables, within a few bytes the same size)."""
    h, t, d = x.shape
    scale = x.abs().amax(dim=(0, 2)).clamp_min(1e-8)  # (t,)
    half = bins // 2
    q = (torch.round(x / scale[None, :, None] * half).clamp(-half, half) + half).to(torch.int32)
    chans = q.permute(0, 2, 1).reshape(h * d, t).numpy()
    out = [scale.half().numpy().tobytes()]
    for c0 in range(0, t, chunk):
        block = chans[:, c0 : c0 + chunk]
        counts = np.stack([np.bincount(row, minlength=bins + 1) for row in block]).astype(np.float64)
        cdf = np.concatenate([np.zeros((len(block), 1)), np.cumsum(counts, axis=1)], axis=1)
        cdfs = np.round(cdf / cdf[:, -1:] * 32767).astype(np.int16)
        streams = rans.encode_streams(_cachegen_tables(cdfs), [(row, np.full(len(row), i, np.uint32))
                                                               for i, row in enumerate(block)])
        out.append(cdfs.tobytes())
        for st in streams:
            out += [struct.pack("<I", len(st.words)), st.states.astype("<u4").tobytes(), st.words.astype("<u2").tobytes()]
    return b"".join(out)


def cachegen_decode(data: bytes, shape, bins: int, chunk: int = 256) -> torch.Tensor:
    h, t, d = shape
    scale = torch.from_numpy(np.frombuffer(data, np.float16, t).copy()).float()
    pos = 2 * t
    half = bins // 2
    chans = np.empty((h * d, t), np.int32)
    for c0 in range(0, t, chunk):
        n = min(chunk, t - c0)
        cdfs = np.frombuffer(data, np.int16, h * d * (bins + 2), pos).reshape(h * d, bins + 2)
        pos += cdfs.nbytes
        lanes = rans.lanes_for(n)
        jobs = []
        for i in range(h * d):
            (nw,) = struct.unpack_from("<I", data, pos)
            states = np.frombuffer(data, "<u4", lanes, pos + 4).astype(np.uint32)
            words = np.frombuffer(data, "<u2", nw, pos + 4 + 4 * lanes).astype(np.uint16)
            pos += 4 + 4 * lanes + 2 * nw
            jobs.append((np.full(n, i, np.uint32), rans.Stream(states, words)))
        for i, row in enumerate(rans.decode_streams(_cachegen_tables(cdfs), jobs)):
            chans[i, c0 : c0 + n] = row
    q = torch.from_numpy(chans).reshape(h, d, t).permute(0, 2, 1).float() - half
    return q / half * scale[None, :, None]


# ---------------------------------------------------------------- fp16 and fp16 + zstd


def fp16_encode(x: torch.Tensor) -> bytes:
    return x.half().numpy().tobytes()


def fp16_decode(data: bytes, shape) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, np.float16).copy()).float().reshape(shape)


def fp16_zstd_encode(x: torch.Tensor) -> bytes:
    raw = np.frombuffer(fp16_encode(x), np.uint8).reshape(-1, 2)
    return zstandard.ZstdCompressor(level=3).compress(np.ascontiguousarray(raw.T).tobytes())


def fp16_zstd_decode(data: bytes, shape) -> torch.Tensor:
    raw = np.frombuffer(zstandard.ZstdDecompressor().decompress(data), np.uint8).reshape(2, -1)
    return fp16_decode(np.ascontiguousarray(raw.T).tobytes(), shape)


def registry(layers: int) -> dict[str, tuple]:
    """name -> (encode(x, layer, kind, token_start) -> bytes, decode(bytes, shape, layer, kind, token_start) ->
    tensor); token_start is the absolute position of the layer's first held token."""
    def fixed(enc, dec, **kw):
        return (lambda x, l, k, start: enc(x, **kw), lambda b, s, l, k, start: dec(b, s, **kw))

    def cg(all_bins, chunk=256):
        return (lambda x, l, k, start: cachegen_encode(x, cachegen_bins(l, layers, k, all_bins), chunk),
                lambda b, s, l, k, start: cachegen_decode(b, s, cachegen_bins(l, layers, k, all_bins), chunk))

    def kivi(bits):
        return (lambda x, l, k, start: kivi_encode(x, bits, per_channel=(k == 0)),
                lambda b, s, l, k, start: kivi_decode(b, s, bits, per_channel=(k == 0)))

    return {
        "fp16": fixed(fp16_encode, fp16_decode),
        "fp16+zstd": fixed(fp16_zstd_encode, fp16_zstd_decode),
        "int8-per-token": fixed(int8_per_token_encode, int8_per_token_decode),
        "int4-g64": fixed(int4_g64_encode, int4_g64_decode),
        "kivi-2bit": kivi(2),
        "kivi-4bit": kivi(4),
        "cachegen": cg(None),
        "cachegen-32bins": cg(32),
        # Not as shipped: one CDF table per 2,048 tokens, which shrinks CacheGen's table overhead eightfold.
        "cachegen-32bins-chunk2048": cg(32, 2048),
    }
