"""KVTC (Staniszewski & Łańcucki, "KV Cache Transform Coding for Compact Storage in LLM Inference", ICLR 2026,
arXiv 2511.01815) as a baseline, written from the abstract and the public descriptions; docs/codec.md, "KVTC as a
baseline", lists what they leave open and what was guessed here.

- A PCA basis per (layer, K/V) over the layer's heads concatenated (features = kv_heads x head_dim per token),
  fitted once per model on kvcli's calibration texts (never the benchmark corpus), keys with RoPE undone.
- Bit allocation over the components by dynamic programming under a bit budget per token: contiguous groups of
  components, each group dropped (0 bits), cast to FP8 E4M3 (8 bits, no scale, as NVIDIA Dynamo's KVTC kernels
  do) or quantized per token with 1, 2, 4 or 8 bits, min-max uniform, with a float16 shift and scale per token
  and group; the allocation minimises the squared error measured on the calibration tokens. Trailing components
  usually get 0 bits.
- DEFLATE (zlib) over the quantized payload.
- The first 4 tokens (attention sinks) and the 128 most recent kept exact, in float16.

File bytes are counted as kvcli's are: everything one cache needs. The basis (means and the components any plan
uses, float16) is per model, reported apart by `dictionary_bytes`, as a zstd dictionary would be.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from kvcli.codecs.kvq_ops.rope import rope_tables, rotate_keys, unrotate_keys
from kvcli.modeling import inference
from kvcli.modeling.kvcache import KVCache
from kvcli.modeling.rope import inv_freq_per_layer

SINKS = 4
RECENT = 128
GROUP_SIZES = (1, 4, 16, 64, 256)  # groups start at a multiple of their size
# Types a group may take: bits per component, bits per token of metadata (IntX: a float16 shift and scale).
TYPES = {"int1": (1, 32), "int2": (2, 32), "int4": (4, 32), "int8": (8, 32), "fp8": (8, 0)}
FP8_MAX = 448.0  # E4M3FN's largest finite value: larger coefficients saturate
ZLIB_LEVEL = 6
CALIBRATION_PIECE = 512  # tokens per calibration prefill: every sliding-window layer then holds all of them
DP_ROWS = 1024  # calibration tokens the allocation measures errors on (a fixed, evenly spaced subset)


@dataclass(frozen=True)
class Basis:
    mean: np.ndarray  # (features,) float32
    components: np.ndarray  # (features, features) float32, columns by decreasing variance
    sample: np.ndarray  # (rows, features) float32: calibration tokens projected, for the allocation


@dataclass(frozen=True)
class Plan:
    groups: tuple[tuple[int, str], ...]  # (size, type or "drop") over the components, in order

    @property
    def used(self) -> int:
        """Components up to the last group that is kept: the part of the basis a decoder needs."""
        end = used = 0
        for size, kind in self.groups:
            end += size
            used = end if kind != "drop" else used
        return used


def _features(x: torch.Tensor, inv_freq: np.ndarray | None, start: int, kind: int) -> torch.Tensor:
    """(heads, tokens, dim) -> (tokens, heads * dim) float32, keys with RoPE undone."""
    heads, tokens, dim = x.shape
    x = x.float()
    if kind == 0 and inv_freq is not None and 2 * len(inv_freq) == dim:
        cos, sin = rope_tables(torch.from_numpy(inv_freq), start, tokens)
        x = unrotate_keys(x.transpose(1, 2), cos, sin).transpose(1, 2)
    return x.transpose(0, 1).reshape(tokens, heads * dim)


def _unfeatures(f: torch.Tensor, heads: int, inv_freq: np.ndarray | None, start: int, kind: int) -> torch.Tensor:
    tokens = f.shape[0]
    x = f.reshape(tokens, heads, -1).transpose(0, 1).contiguous()
    dim = x.shape[2]
    if kind == 0 and inv_freq is not None and 2 * len(inv_freq) == dim:
        cos, sin = rope_tables(torch.from_numpy(inv_freq), start, tokens)
        x = rotate_keys(x.transpose(1, 2).contiguous(), cos, sin).transpose(1, 2)
    return x.contiguous()


def _quantize(block: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row min-max uniform: (q uint8, shift float16, scale float16), as a decoder will read them."""
    lo = block.min(axis=1).astype(np.float16)
    scale = ((block.max(axis=1) - lo.astype(np.float32)) / ((1 << bits) - 1)).astype(np.float16)
    scale[scale <= 0] = 1.0  # a constant row (or a span below float16's range): every q is 0
    q = np.rint((block - lo.astype(np.float32)[:, None]) / scale.astype(np.float32)[:, None])
    return np.clip(q, 0, (1 << bits) - 1).astype(np.uint8), lo, scale


def _dequantize(q: np.ndarray, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None] + lo.astype(np.float32)[:, None]


def _to_fp8(block: np.ndarray) -> bytes:
    clipped = torch.from_numpy(np.ascontiguousarray(block)).clamp(-FP8_MAX, FP8_MAX)
    return clipped.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()


def _from_fp8(data: bytes, shape) -> np.ndarray:
    raw = torch.from_numpy(np.frombuffer(data, np.uint8).copy())
    return raw.view(torch.float8_e4m3fn).float().numpy().reshape(shape)


def _roundtrip(block: np.ndarray, kind: str) -> np.ndarray:
    if kind == "fp8":
        return _from_fp8(_to_fp8(block), block.shape)
    return _dequantize(*_quantize(block, TYPES[kind][0]))


def allocate(sample: np.ndarray, budget: int) -> Plan:
    """The groups of least squared error on `sample` whose bits per token stay within `budget`."""
    rows, n = sample.shape
    energy = (sample.astype(np.float64) ** 2).sum(axis=0)
    best = np.full((n + 1, budget + 1), np.inf)
    best[0] = 0.0
    kinds = ["drop", *TYPES]
    choice = np.zeros((n + 1, budget + 1, 2), np.int32)  # (size, index in kinds) of the last group
    for i in range(1, n + 1):
        # A dropped component: no bits, its whole energy as error.
        best[i] = best[i - 1] + energy[i - 1]
        choice[i] = (1, 0)
        for size in GROUP_SIZES:
            if i % size or size > i:
                continue
            block = sample[:, i - size:i]
            for index, kind in enumerate(kinds[1:], 1):
                cost = _cost(size, kind)
                if cost > budget:
                    continue
                err = float(((block - _roundtrip(block, kind)) ** 2).sum())
                cand = best[i - size, : budget + 1 - cost] + err
                better = cand < best[i, cost:]
                best[i, cost:][better] = cand[better]
                choice[i, cost:][better] = (size, index)
    groups = []
    i, left = n, budget
    while i > 0:
        size, index = (int(v) for v in choice[i, left])
        groups.append((size, kinds[index]))
        i -= size
        left -= _cost(size, kinds[index])
    return Plan(tuple(reversed(groups)))


def _cost(size: int, kind: str) -> int:
    if kind == "drop":
        return 0
    bits, overhead = TYPES[kind]
    return size * bits + overhead


def _pack(q: np.ndarray, bits: int) -> bytes:
    per = 8 // bits
    flat = q.reshape(-1)
    flat = np.concatenate([flat, np.zeros((-len(flat)) % per, np.uint8)]).reshape(-1, per)
    out = np.zeros(len(flat), np.uint8)
    for j in range(per):
        out |= flat[:, j] << (bits * j)
    return out.tobytes()


def _unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    raw = np.frombuffer(data, np.uint8)
    per = 8 // bits
    return np.stack([(raw >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=1).reshape(-1)[:count]


class Kvtc:
    """A model's bases (fitted once) and, per target, the plans; encode/decode one (layer, K/V) at a time."""

    def __init__(self, bases: dict[tuple[int, int], Basis], inv_freq: list[np.ndarray | None] | None):
        self.bases = bases
        self.inv_freq = inv_freq or [None] * (1 + max(layer for layer, _ in bases))

    @classmethod
    def fit(cls, lm, texts: list[str]) -> "Kvtc":
        """PCA per (layer, K/V) over the calibration texts' tokens, prefilled in pieces of CALIBRATION_PIECE
        tokens; each piece's first SINKS tokens are left out (KVTC keeps sinks exact, and they are outliers)."""
        inv_freq = inv_freq_per_layer(lm.model)
        rows: dict[tuple[int, int], list[torch.Tensor]] = {}
        with torch.no_grad():
            for text in texts:
                ids = inference.document_ids(lm, text)
                for start in range(0, len(ids) - SINKS, CALIBRATION_PIECE):
                    kv = inference.prefill(lm, ids[start:start + CALIBRATION_PIECE])
                    for layer in range(kv.num_layers):
                        freq = inv_freq[layer] if inv_freq else None
                        for kind, x in enumerate((kv.keys[layer], kv.values[layer])):
                            f = _features(x, freq, kv.token_start(layer), kind)
                            keep = max(0, SINKS - kv.token_start(layer))
                            rows.setdefault((layer, kind), []).append(f[keep:])
        bases = {}
        for key, parts in rows.items():
            x = torch.cat(parts).double()
            mean = x.mean(0)
            centered = x - mean
            values, vectors = torch.linalg.eigh(centered.T @ centered / len(x))
            components = vectors.flip(1)  # decreasing variance
            pick = torch.linspace(0, len(x) - 1, min(DP_ROWS, len(x))).long()
            sample = (centered[pick] @ components).float().numpy()
            bases[key] = Basis(mean.float().numpy(), components.float().numpy(), sample)
        return cls(bases, inv_freq)

    def plans(self, bits_per_element: float) -> dict[tuple[int, int], Plan]:
        """The allocation for a target of `bits_per_element` over the coded (middle) tokens, before DEFLATE."""
        return {key: allocate(b.sample, int(round(bits_per_element * b.mean.shape[0]))) for key, b in self.bases.items()}

    def dictionary_bytes(self, plans: dict[tuple[int, int], Plan]) -> int:
        """The per-model part a decoder needs: float16 means and the components the plans use."""
        return sum(2 * (b.mean.size + b.mean.shape[0] * plans[key].used) for key, b in self.bases.items())

    def encode(self, plan: Plan, x: torch.Tensor, layer: int, kind: int, start: int) -> bytes:
        heads, tokens, dim = x.shape
        sinks = min(tokens, max(0, SINKS - start))
        recent = min(RECENT, tokens - sinks)
        middle = tokens - sinks - recent
        exact = torch.cat([x[:, :sinks], x[:, tokens - recent:]], dim=1).half().numpy().tobytes()
        payload = bytearray()
        if middle:
            basis = self.bases[(layer, kind)]
            f = _features(x[:, sinks:sinks + middle], self.inv_freq[layer], start + sinks, kind).numpy()
            coeff = (f - basis.mean) @ basis.components[:, :plan.used]
            pos = 0
            for size, qtype in plan.groups:
                block = coeff[:, pos:pos + size]
                if qtype == "fp8":
                    payload += _to_fp8(block)
                elif qtype != "drop":
                    q, lo, scale = _quantize(block, TYPES[qtype][0])
                    payload += lo.tobytes() + scale.tobytes() + _pack(q, TYPES[qtype][0])
                pos += size
        return struct.pack("<I", len(exact)) + exact + zlib.compress(bytes(payload), ZLIB_LEVEL)

    def decode(self, plan: Plan, data: bytes, shape, layer: int, kind: int, start: int) -> torch.Tensor:
        heads, tokens, dim = shape
        sinks = min(tokens, max(0, SINKS - start))
        recent = min(RECENT, tokens - sinks)
        middle = tokens - sinks - recent
        (n,) = struct.unpack_from("<I", data)
        exact = torch.from_numpy(np.frombuffer(data, np.float16, n // 2, 4).copy()).float().reshape(heads, -1, dim)
        out = torch.empty(heads, tokens, dim)
        out[:, :sinks], out[:, tokens - recent:] = exact[:, :sinks], exact[:, sinks:]
        if middle:
            basis = self.bases[(layer, kind)]
            payload = zlib.decompress(data[4 + n:])
            coeff = np.zeros((middle, plan.used), np.float32)
            pos = off = 0
            for size, qtype in plan.groups:
                if qtype == "fp8":
                    coeff[:, pos:pos + size] = _from_fp8(payload[off:off + middle * size], (middle, size))
                    off += middle * size
                elif qtype != "drop":
                    bits = TYPES[qtype][0]
                    lo = np.frombuffer(payload, np.float16, middle, off)
                    scale = np.frombuffer(payload, np.float16, middle, off + 2 * middle)
                    off += 4 * middle
                    packed = -(-middle * size * bits // 8)
                    q = _unpack(payload[off:off + packed], bits, middle * size).reshape(middle, size)
                    off += packed
                    coeff[:, pos:pos + size] = _dequantize(q, lo, scale)
                pos += size
            f = coeff @ basis.components[:, :plan.used].T + basis.mean
            out[:, sinks:sinks + middle] = _unfeatures(torch.from_numpy(f), heads, self.inv_freq[layer],
                                                       start + sinks, kind)
        return out

    def roundtrip(self, plans: dict[tuple[int, int], Plan], kv: KVCache) -> tuple[KVCache, int]:
        """The cache as a reader would get it back, and the bytes that took."""
        out: list[list[torch.Tensor]] = [[], []]
        size = 0
        for layer in range(kv.num_layers):
            start = kv.token_start(layer)
            for kind, x in enumerate((kv.keys[layer], kv.values[layer])):
                data = self.encode(plans[(layer, kind)], x.float(), layer, kind, start)
                size += len(data)
                out[kind].append(self.decode(plans[(layer, kind)], data, x.shape, layer, kind, start).to(x.dtype))
        return KVCache(kv.token_ids, out[0], out[1]), size
