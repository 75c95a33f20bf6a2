"""`kvq`: kvcli's lossy codec. Calibrated uniform quantization plus ANS coding, in the spirit of CacheGen.

CacheGen (Liu et al., "CacheGen: Fast Context Loading for Language Model Applications", SIGCOMM 2024) codes
deltas between neighbouring tokens, gives shallow layers finer steps and models symbols per (layer, channel).
kvq keeps the per-channel modelling and the neighbour redundancy, and changes the rest (docs/codec.md):

- keys are quantized before RoPE, where each channel is stationary, and rotated again on load;
- one step per (layer, K/V, head, channel): set per (layer, K/V) from the model's measured sensitivity
  (a profile, kvcli calibrate), and per key channel from the queries' energy in that channel;
- the first `sinks` tokens (attention sinks) are kept exactly;
- entropy tables are fitted once per file and shared by channel classes; neighbouring tokens of a channel
  are coded as one joint symbol, which captures their similarity without a serial delta chain.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from . import entropy
from .base import Codec, CodecError, SegmentContext, tensor_bytes, tensor_from_bytes, unzstd
from .quantize import quantize, rope_tables, unrotate_keys

FORMAT_VERSION = 1
DEFAULT_SINKS = 1  # the first token is the sink; 4 measured no better on development text, at +0.04 bits/element
MIN_STEP = 2.0**-14  # smallest normal float16: steps are stored as float16
KINDS = ("k", "v")
TABLE_SAMPLE_TOKENS = 1024


@dataclass
class Profile:
    """Per-model calibration: how much each (layer, K/V, head) and each key channel matters.

    sensitivity: (layers, 2, kv_heads) KL of the continuation when only that head of that layer's K or V is
    coarsely quantized; (layers, 2) profiles apply one value to all heads of a layer.
    key_weights: per layer (kv_heads, head_dim) mean squared query per pre-RoPE key channel, or None.
    """

    name: str
    sensitivity: np.ndarray
    key_weights: list[np.ndarray] | None

    def digest(self) -> str:
        """Identifies the numbers, so a header can say exactly which profile set its steps."""
        h = hashlib.sha256(np.ascontiguousarray(self.sensitivity, dtype=np.float64).tobytes())
        for w in self.key_weights or []:
            h.update(np.ascontiguousarray(w, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def step_factor(self, layer: int, kind: int, heads: int) -> np.ndarray:
        """Per-head step multipliers, (sensitivity / geometric mean) ** -1/2, clipped to [1/16, 16]."""
        s = np.maximum(np.asarray(self.sensitivity, dtype=np.float64), 1e-9)
        ref = float(np.exp(np.log(s).mean()))
        mine = s[layer, kind] if s.ndim == 3 else np.full(heads, s[layer, kind])
        if mine.shape != (heads,):
            raise ValueError(f"profile has {mine.shape[0]} heads for layer {layer}, the cache {heads}")
        return np.clip(np.sqrt(ref / mine), 1 / 16, 16)


@dataclass
class LayerPlan:
    """What the decoder needs for one layer and kind: float16 centers and steps, int8 classes (heads, dim)."""

    center: np.ndarray
    step: np.ndarray
    classes: np.ndarray


class KvqCodec(Codec):
    name = "kvq"
    lossless = False

    def __init__(self, scale: float, sinks: int = DEFAULT_SINKS, profile: Profile | None = None,
                 inv_freq: list[np.ndarray | None] | None = None, meta: dict | None = None):
        if not scale > 0:
            raise ValueError(f"step scale must be positive, got {scale}")
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        self.scale = float(scale)
        self.sinks = int(sinks)
        self.profile = profile
        self.inv_freq = inv_freq  # per layer (head_dim / 2,) float32, None where keys are coded as they are
        self.meta = dict(meta or {})
        self.plans: dict[tuple[int, int], LayerPlan] = {}
        self.tables: dict[int, entropy.ClassTable] = {}

    # ------------------------------------------------------------ header

    def params(self) -> dict:
        return {"version": FORMAT_VERSION, "scale": self.scale, "sinks": self.sinks, **self.meta}

    @classmethod
    def from_params(cls, params: dict) -> "KvqCodec":
        if params.get("version") != FORMAT_VERSION:
            raise CodecError(f"kvq version {params.get('version')!r} is not supported")
        scale, sinks = params.get("scale"), params.get("sinks")
        if not isinstance(scale, (int, float)) or not isinstance(sinks, int) or not 0 <= sinks <= 1 << 20:
            raise CodecError("kvq params need a numeric scale and an integer sinks")
        meta = {k: v for k, v in params.items() if k not in ("version", "scale", "sinks")}
        return cls(float(scale), sinks, meta=meta)

    # ------------------------------------------------------------ fitting (encoder only)

    def _freq(self, layer: int, kind: int) -> torch.Tensor | None:
        """The rotary frequencies to remove from this layer's keys; None for values or without RoPE."""
        freq = self.inv_freq[layer] if (kind == 0 and self.inv_freq) else None
        return torch.from_numpy(freq) if freq is not None else None

    def _pre(self, x: torch.Tensor, layer: int, kind: int, token_start: int) -> torch.Tensor:
        """(heads, tokens, dim) -> float32 (heads, dim, tokens) in the quantization space (pre-RoPE for keys)."""
        x = x.float().transpose(1, 2).contiguous()
        freq = self._freq(layer, kind)
        if freq is None or x.shape[2] == 0:
            return x
        cos, sin = rope_tables(freq, token_start, x.shape[2])
        return unrotate_keys(x, cos, sin)

    def fit(self, keys: list[torch.Tensor], values: list[torch.Tensor], token_starts: list[int]) -> None:
        samples: dict[int, list[np.ndarray]] = {}
        for layer, start in enumerate(token_starts):
            for kind, x in enumerate((keys[layer], values[layer])):
                skip = max(0, self.sinks - start)
                body = self._pre(x, layer, kind, start)[:, :, skip:]
                plan = self._plan(body, layer, kind)
                self.plans[(layer, kind)] = plan
                if body.shape[2] == 0:
                    continue
                # Tables are a model, not a census: a contiguous window of tokens keeps neighbour statistics.
                mid = max(0, (body.shape[2] - TABLE_SAMPLE_TOKENS) // 2)
                window = body[:, :, mid : mid + TABLE_SAMPLE_TOKENS]
                q = quantize(window, _t(plan.center), _t(plan.step)).numpy()  # (H, D, T)
                for cls in np.unique(plan.classes):
                    samples.setdefault(int(cls), []).append(q[plan.classes == cls])
        self.tables = entropy.fit_tables(samples)

    def _plan(self, body: torch.Tensor, layer: int, kind: int) -> LayerPlan:
        heads, dim, tokens = body.shape
        if tokens == 0:
            ones = np.ones((heads, dim), dtype=np.float16)
            return LayerPlan(np.zeros_like(ones), ones, np.zeros((heads, dim), dtype=np.int8))
        center = body.mean(dim=2).to(torch.float16).float()
        rms = (body - center[..., None]).pow(2).mean(dim=(1, 2)).sqrt().clamp_min(1e-6)  # per head
        factor = self.profile.step_factor(layer, kind, heads) if self.profile is not None else np.ones(heads)
        step = (self.scale * torch.from_numpy(factor).float() * rms)[:, None].expand(heads, dim)
        if kind == 0 and self.profile is not None and self.profile.key_weights is not None:
            w = torch.from_numpy(np.asarray(self.profile.key_weights[layer], dtype=np.float64)).clamp_min(1e-12)
            w = w / w.log().mean().exp()
            step = step * w.pow(-0.5).float().clamp(1 / 16, 16)
        step = step.clamp(MIN_STEP, 60000).to(torch.float16).float()
        q = quantize(body, center, step).float()
        std = q.std(dim=2, unbiased=False).numpy() if tokens > 1 else q.abs().mean(dim=2).numpy()
        return LayerPlan(center.numpy().astype(np.float16), step.numpy().astype(np.float16), entropy.class_of(std))

    def roundtrip(self, x: torch.Tensor, layer: int, kind: int, token_start: int) -> torch.Tensor:
        """Quantize and dequantize one layer's K or V (heads, tokens, dim) without entropy coding.

        Calibration uses it to measure how much loss in one place costs the model.
        """
        from ..kernels.reference import dequantize_rotate_ref

        skip = min(x.shape[1], max(0, self.sinks - token_start))
        body = self._pre(x[:, skip:], layer, kind, token_start + skip)
        plan = self._plan(body, layer, kind)
        center, step = _t(plan.center), _t(plan.step)
        approx = dequantize_rotate_ref(quantize(body, center, step), center, step, self._freq(layer, kind), token_start + skip)
        return torch.cat([x[:, :skip], approx.transpose(1, 2).to(x.dtype)], 1)

    # ------------------------------------------------------------ shared tables

    def aux(self) -> dict[str, bytes]:
        parts = [struct.pack("<I", len(self.plans) // 2)]
        layers = len(self.plans) // 2
        for layer in range(layers):
            for kind in range(2):
                p = self.plans[(layer, kind)]
                heads, dim = p.center.shape
                freq = self.inv_freq[layer] if (kind == 0 and self.inv_freq and self.inv_freq[layer] is not None) else None
                parts.append(struct.pack("<HHB", heads, dim, 0 if freq is None else 1))
                parts += [p.center.tobytes(), p.step.tobytes(), p.classes.tobytes()]
                if freq is not None:
                    parts.append(np.asarray(freq, dtype=np.float32).tobytes())
        zc = zstandard.ZstdCompressor(level=19)
        return {"kvq.plan": zc.compress(b"".join(parts)), "kvq.tables": zc.compress(entropy.pack_tables(self.tables))}

    def load_aux(self, blobs: dict[str, bytes]) -> None:
        if set(blobs) != {"kvq.plan", "kvq.tables"}:
            raise CodecError(f"kvq needs aux segments kvq.plan and kvq.tables, found {sorted(blobs)}")
        plan = unzstd(blobs["kvq.plan"], 64 << 20)
        self.tables = entropy.unpack_tables(unzstd(blobs["kvq.tables"], 64 << 20))
        try:
            (layers,) = struct.unpack_from("<I", plan, 0)
            pos = 4
            self.inv_freq = []
            for layer in range(layers):
                for kind in range(2):
                    heads, dim, has_rope = struct.unpack_from("<HHB", plan, pos)
                    pos += 5
                    n = heads * dim
                    if pos + 5 * n > len(plan):
                        raise CodecError("plan is truncated")
                    center = np.frombuffer(plan, np.float16, n, pos).reshape(heads, dim)
                    step = np.frombuffer(plan, np.float16, n, pos + 2 * n).reshape(heads, dim)
                    classes = np.frombuffer(plan, np.int8, n, pos + 4 * n).reshape(heads, dim)
                    pos += 5 * n
                    if not (np.isfinite(step).all() and (step > 0).all() and np.isfinite(center).all()):
                        raise CodecError(f"layer {layer}: steps must be finite and positive")
                    self.plans[(layer, kind)] = LayerPlan(center, step, classes)
                    if kind == 0:
                        freq = None
                        if has_rope:
                            if dim % 2 or pos + 2 * dim > len(plan):
                                raise CodecError(f"layer {layer}: bad rotary table")
                            freq = np.frombuffer(plan, np.float32, dim // 2, pos).copy()
                            pos += 2 * dim
                        self.inv_freq.append(freq)
        except struct.error:
            raise CodecError("plan is truncated") from None
        if pos != len(plan):
            raise CodecError("plan has trailing bytes")

    # ------------------------------------------------------------ segments

    def _segment_plan(self, ctx: SegmentContext) -> tuple[LayerPlan, int]:
        kind = KINDS.index(ctx.kind)
        plan = self.plans.get((ctx.layer, kind))
        if plan is None or plan.center.shape != (ctx.heads, ctx.dim):
            raise CodecError(f"no plan for layer {ctx.layer} {ctx.kind.upper()} with shape {(ctx.heads, ctx.dim)}")
        skip = min(ctx.tokens, max(0, self.sinks - ctx.token_start))
        return plan, skip

    def _groups(self, plan: LayerPlan) -> list[tuple[entropy.ClassTable, np.ndarray]]:
        """(table, channel indices into the flattened (heads * dim) axis) per class, in coding order."""
        flat = plan.classes.reshape(-1)
        groups = []
        for cls in np.unique(flat):
            table = self.tables.get(int(cls))
            if table is None:
                raise CodecError(f"no entropy table for class {int(cls)}")
            groups.append((table, np.flatnonzero(flat == cls)))
        return groups

    def encode(self, x: torch.Tensor, ctx: SegmentContext) -> bytes:
        plan, skip = self._segment_plan(ctx)
        kind = KINDS.index(ctx.kind)
        body = self._pre(x[:, skip:], ctx.layer, kind, ctx.token_start + skip)
        words, escapes = np.zeros(0, np.uint32), np.zeros(0, np.int32)
        if body.shape[2]:  # a segment of sinks only has nothing to entropy-code
            q = quantize(body, _t(plan.center), _t(plan.step)).numpy()  # (H, D, T)
            rows = q.reshape(-1, q.shape[2])
            words, escapes = entropy.encode_classes([(t, rows[idx]) for t, idx in self._groups(plan)])
        esc = zstandard.ZstdCompressor(level=3).compress(escapes.tobytes()) if escapes.size else b""
        sinks = tensor_bytes(x[:, :skip]).tobytes() if skip else b""
        return struct.pack("<I", len(words)) + words.tobytes() + struct.pack("<I", len(esc)) + esc + sinks

    def decode(self, data: bytes, ctx: SegmentContext) -> torch.Tensor:
        q = np.empty(self.symbol_shape(ctx), dtype=np.int32)
        self.decode_symbols(data, ctx, q)
        return self.reconstruct(data, ctx, q).transpose(1, 2).to(ctx.torch_dtype)

    def symbol_shape(self, ctx: SegmentContext) -> tuple[int, int, int]:
        """Shape of the quantized integers of a segment: (heads, dim, tokens that are not sinks)."""
        _, skip = self._segment_plan(ctx)
        return (ctx.heads, ctx.dim, ctx.tokens - skip)

    def _layout(self, data: bytes, ctx: SegmentContext) -> tuple[int, int, int, int]:
        """(words, escape bytes, escape offset, sink bytes) of a segment, all checked against its length."""
        _, skip = self._segment_plan(ctx)
        sink_bytes = ctx.heads * skip * ctx.dim * torch.empty((), dtype=ctx.torch_dtype).element_size()
        try:
            (nwords,) = struct.unpack_from("<I", data, 0)
            (nesc,) = struct.unpack_from("<I", data, 4 + 4 * nwords)
        except struct.error:
            raise CodecError("segment is truncated") from None
        pos = 8 + 4 * nwords
        if pos + nesc + sink_bytes != len(data):
            raise CodecError(f"segment sizes do not add up ({pos + nesc + sink_bytes} != {len(data)})")
        return nwords, nesc, pos, sink_bytes

    def decode_symbols(self, data: bytes, ctx: SegmentContext, q: np.ndarray) -> None:
        """Entropy stage: fill q (heads, dim, tokens) with the segment's integers. numpy and constriction only,
        so it may run in a forked worker (kvcli.parallel)."""
        plan, _ = self._segment_plan(ctx)
        nwords, nesc, pos, _ = self._layout(data, ctx)
        tokens = q.shape[2]
        words = np.frombuffer(data, np.uint32, nwords, 4)
        limit = 4 * ctx.heads * ctx.dim * max(tokens, 1) + 64
        escapes = np.frombuffer(unzstd(bytes(data[pos : pos + nesc]), limit), np.int32) if nesc else np.zeros(0, np.int32)
        if not tokens:
            if nwords or nesc:
                raise CodecError("a segment of sinks only carries no entropy-coded data")
            return
        groups = self._groups(plan)
        symbols = entropy.decode_classes(words, [(t, len(rows), tokens) for t, rows in groups])
        flat = q.reshape(-1, tokens)
        used = 0
        for (table, rows), sym in zip(groups, symbols):
            values, n_esc = entropy.from_tuples(sym, escapes[used:], len(rows), tokens, table.half, table.m)
            flat[rows] = values
            used += n_esc
        if used != escapes.size:
            raise CodecError("escape stream has extra values")

    def reconstruct(self, data: bytes, ctx: SegmentContext, q: np.ndarray, kernel: bool = False,
                    device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor stage: dequantize and re-apply RoPE to keys, exact sinks in front.

        Returns float32 channel-major (heads, dim, tokens) on `device`; the caller transposes and casts while it
        copies the segment into place. kernel=True runs the Triton kernel (kvcli.kernels) instead of torch ops.
        """
        plan, skip = self._segment_plan(ctx)
        *_, sink_bytes = self._layout(data, ctx)
        freq = self._freq(ctx.layer, KINDS.index(ctx.kind))
        args = [torch.from_numpy(q).to(device), _t(plan.center).to(device), _t(plan.step).to(device),
                freq.to(device) if freq is not None else None, ctx.token_start + skip]
        if kernel:
            from ..kernels.dequantize import dequantize_rotate
        else:
            from ..kernels.reference import dequantize_rotate_ref as dequantize_rotate
        body = dequantize_rotate(*args)
        if skip:
            sink_ctx = SegmentContext(ctx.kind, ctx.layer, ctx.token_start, ctx.heads, skip, ctx.dim, ctx.dtype)
            sinks = tensor_from_bytes(bytes(data[len(data) - sink_bytes :]), sink_ctx).float().transpose(1, 2)
            body = torch.cat([sinks.to(device), body], dim=2)
        return body


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))
