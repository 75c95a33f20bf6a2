"""`kvq`: kvcli's lossy codec. Calibrated uniform quantization plus ANS coding, in the spirit of CacheGen.

CacheGen (Liu et al., "CacheGen: Fast Context Loading for Language Model Applications", SIGCOMM 2024) codes
deltas between neighbouring tokens, gives shallow layers finer steps and models symbols per (layer, channel).
kvq keeps the per-channel modelling and the neighbour redundancy, and changes the rest (docs/codec.md):

- keys are quantized before RoPE, where each channel is stationary, and rotated again on load;
- one step per (layer, K/V, head, channel): set per (layer, K/V) from the model's measured sensitivity
  (a profile, kvcli calibrate), and per key channel from the queries' energy in that channel;
- the first `sinks` tokens (attention sinks) are kept exactly;
- entropy tables are fitted once per file and shared by channel classes (version 4: by class and token-weight
  band, docs/codec.md "Version 4"); neighbouring tokens of a channel are coded as one joint symbol, which
  captures their similarity without a serial delta chain.

This module plans a file and runs its segments through kvq's arithmetic, whose torch, C and Triton forms live in
codecs/kvq_ops/ (docs/codec.md, "Where the code lives").
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from . import entropy
from .base import (ITEMSIZE, Codec, CodecError, Decoder, Encoder, SegmentContext, bytes_to_tensor, check_backend,
                   tensor_bytes, unzstd)
from .kvq_ops import dequantize, quantize
from .kvq_ops import transform as transform_ops
from .transform import MAX_COMPONENT, Transforms

# Written unless asked otherwise. Version 4 (make_codec(version=4)) is 3-5% smaller, but still decodes about 1.1x
# slower per element on CPU (docs/codec.md, "Version 4"): it becomes the default when it decodes as fast as version 3.
FORMAT_VERSION = 3
# Version 2 is version 3 without token weights; version 4 is version 3 with entropy tables per (class,
# token-exponent band) (docs/codec.md, "Version 4").
READABLE_VERSIONS = (2, 3, 4)
WRITABLE_VERSIONS = (3, 4)
DEFAULT_SINKS = 1  # the first token is the sink; 4 measured no better on development text, at +0.04 bits/element
MIN_STEP = 2.0**-14  # smallest normal float16: steps are stored as float16
MAX_STEP = dequantize.FLOAT16_MAX  # largest float16: steps are stored as float16
MAX_LEVEL = 2**30  # |q| stays below this, so escapes fit int32 with room to spare
KINDS = ("k", "v")
TABLE_SAMPLE_TOKENS = 1024
BATCH_SYMBOLS = 1 << 22  # symbols per task of encode_many's two threads (each segment is one C call)
AUX_LIMIT = 64 << 20
# zstd level of the aux segments: level 19 saved 0.05% of a 2,048-token file's bytes over 12 and cost a
# seventh of the encoder's time (0.16 s against 0.02 s, most of it on the token weights).
AUX_LEVEL = 12
# Token weights (docs/codec.md, "Token weights"): a token's steps are multiplied by 2^(e/8) for its exponent e
# in [-TOKEN_EXPONENT_LIMIT, TOKEN_EXPONENT_LIMIT], one per (layer, K/V, head, token); e/8 = -alpha * log2 of
# the attention the token received relative to its head's geometric mean.
TOKEN_EXPONENT_LIMIT = 24
TOKEN_FACTORS = np.float32(2.0 ** (np.arange(-TOKEN_EXPONENT_LIMIT, TOKEN_EXPONENT_LIMIT + 1) / 8))
DEFAULT_TOKEN_ALPHA = 0.25
TOKEN_ALPHA_LIMIT = 4


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


@dataclass(frozen=True)
class LayerPlan:
    """What the decoder needs for one layer and kind: float16 centers and steps, int8 classes (heads, dim)."""

    center: np.ndarray
    step: np.ndarray
    classes: np.ndarray

    @property
    def groups(self) -> list[entropy.Group]:
        return entropy.groups_of(self.classes)


class KvqCodec(Codec):
    """The configuration: preset scale, sink count, and for encoding the profile and rotary frequencies."""

    name = "kvq"
    lossless = False
    # Each lane of a stream carries at most STEPS_PER_LANE symbols of at most 4 elements in at least 4 bytes of
    # state (docs/codec.md, "Bounds"): at most 1,024 elements, 4,096 float32 bytes, per stored byte.
    max_expansion = 4096.0
    PARAMS = {"version": ((int,), True), "scale": ((int, float), True), "sinks": ((int,), True),
              "quality": ((str,), False), "step_scale": ((int, float), False), "profile": ((str,), False),
              "token_alpha": ((int, float), False), "dictionary": ((str,), False)}

    def __init__(self, scale: float, sinks: int = DEFAULT_SINKS, profile: Profile | None = None,
                 inv_freq: list[np.ndarray | None] | None = None, meta: dict | None = None,
                 token_alpha: float = DEFAULT_TOKEN_ALPHA, version: int = FORMAT_VERSION,
                 transforms: Transforms | None = None, dictionary: str | None = None,
                 token_coarsest: int = TOKEN_EXPONENT_LIMIT):
        if not (math.isfinite(scale) and scale > 0):
            raise CodecError(f"kvq step scale must be finite and positive, got {scale}")
        if not 0 <= sinks <= 1 << 22:
            raise CodecError(f"kvq sinks must be in [0, 2^22], got {sinks}")
        if not (math.isfinite(token_alpha) and 0 <= token_alpha <= TOKEN_ALPHA_LIMIT):
            raise CodecError(f"kvq token alpha must be in [0, {TOKEN_ALPHA_LIMIT}], got {token_alpha}")
        if not 0 <= token_coarsest <= TOKEN_EXPONENT_LIMIT:
            raise CodecError(f"kvq token_coarsest must be in [0, {TOKEN_EXPONENT_LIMIT}], got {token_coarsest}")
        self.scale = float(scale)
        self.sinks = int(sinks)
        self.token_alpha = float(token_alpha)  # encoder policy: 0 writes no token weights
        # Encoder policy too: the largest exponent a token gets, so that a token the prefill's last queries ignored
        # (a fact only a later question asks for) is coded at most 2^(token_coarsest/8) coarser than its head's
        # typical token.
        self.token_coarsest = int(token_coarsest)
        if version not in WRITABLE_VERSIONS:
            raise CodecError(f"kvq writes bitstream versions {', '.join(map(str, WRITABLE_VERSIONS))}, not {version}")
        self.version = version  # what an encoder writes, or a decoder was opened for
        self.profile = profile
        self.inv_freq = inv_freq  # per layer (head_dim / 2,) float32, None where keys are coded as they are
        self.meta = dict(meta or {})
        # The SHA-256 of the dictionary file that holds the transform (kvcli/container/dictionary.py), and the
        # transform itself: given to an encoder, attached to a decoder's codec by the container (attach).
        self.dictionary = _check_dictionary(dictionary, version) if dictionary is not None else None
        if transforms is not None and self.dictionary is None:
            raise CodecError("a kvq transform needs the SHA-256 of its dictionary, which the file names")
        self.transforms = transforms

    def params(self) -> dict:
        named = {"dictionary": self.dictionary} if self.dictionary is not None else {}
        return {"version": self.version, "scale": self.scale, "sinks": self.sinks, **self.meta, **named}

    def attach(self, transforms: Transforms) -> "KvqCodec":
        """Give a codec read from a header the transform of the dictionary it names, before open."""
        if self.dictionary is None:
            raise CodecError("this kvq file names no dictionary: it takes no transform")
        if not isinstance(transforms, Transforms):
            raise TypeError(f"attach takes Transforms, not {type(transforms).__name__}")
        self.transforms = transforms
        return self

    @classmethod
    def _from_checked(cls, params: dict) -> "KvqCodec":
        if params["version"] not in READABLE_VERSIONS:
            raise CodecError(f"kvq bitstream version {params['version']} is not supported (this build reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}); re-create the file with this kvcli")
        meta = {k: v for k, v in params.items() if k not in ("version", "scale", "sinks", "dictionary")}
        codec = cls(float(params["scale"]), params["sinks"], meta=meta)
        codec.version = params["version"]  # set here: version 2 is read, never written
        if "dictionary" in params:
            codec.dictionary = _check_dictionary(params["dictionary"], codec.version)
        return codec

    # ------------------------------------------------------------ quantization space

    def _freq(self, layer: int, kind: int, dim: int) -> torch.Tensor | None:
        """The rotary frequencies to remove from this layer's keys of head dimension `dim`; None for values,
        without RoPE, or where the frequencies do not span the head (partial rotary, DeepSeek's MLA, whose
        rotation is not rotate-half over the whole head): those keys are coded as they are."""
        freq = self.inv_freq[layer] if (kind == 0 and self.inv_freq and layer < len(self.inv_freq)) else None
        if freq is None or 2 * len(freq) != dim:
            return None
        return torch.from_numpy(np.asarray(freq, dtype=np.float32))

    def token_exponents(self, attention: torch.Tensor, skip: int) -> np.ndarray:
        """int8 (heads, held) token-weight exponents from the attention each held token received (kvcli/
        importance.py): -8 * alpha * log2(attention / the head's geometric mean over non-sink tokens), rounded
        and clipped; 0 for sinks."""
        a = attention.double().clamp_min(1e-12)
        body = a[:, skip:]
        e = torch.zeros_like(a)
        if body.shape[1]:
            mean = body.log2().mean(dim=1, keepdim=True)
            e[:, skip:] = (-8 * self.token_alpha * (body.log2() - mean)).round()
        return e.clamp(-TOKEN_EXPONENT_LIMIT, self.token_coarsest).numpy().astype(np.int8)

    def _fit_layer(self, body: torch.Tensor, layer: int, kind: int,
                   token_factor: torch.Tensor | None = None) -> tuple[LayerPlan, torch.Tensor]:
        """The plan of one layer's K or V body (heads, dim, tokens) in the quantization space, and its integers
        (same shape; int16 where every one fits, else int32; with a transform, per component), which the classes
        are measured on; token_factor (heads, tokens) scales each token's steps. CodecError for non-finite or too
        large values."""
        heads, dim, tokens = body.shape
        if tokens == 0:
            ones = np.ones((heads, dim), dtype=np.float16)
            empty = torch.zeros((heads, dim, 0), dtype=torch.int32)
            return LayerPlan(np.zeros_like(ones), ones, np.zeros((heads, dim), dtype=np.int8)), empty
        center = body.mean(dim=2).clamp(-MAX_STEP, MAX_STEP).to(torch.float16).float()
        # Per head, of what is quantized: with token weights, the deviations in units of their tokens' factors.
        spread, squares = quantize.deviations(body, center, token_factor)
        # NaN or infinite where the body is, or where finite values are so large that their mean overflowed: a
        # second pass over the body, only on the way to an error, tells which.
        if not torch.isfinite(spread).all():
            what = f"layer {layer} {KINDS[kind].upper()}"
            if not torch.isfinite(body).all():
                raise CodecError(f"{what} holds non-finite values (NaN or Inf), which kvq cannot code; use lossless")
            spread = body.abs().amax(dim=2)
        rms = squares.mean(dim=(1, 2)).sqrt().nan_to_num(MAX_STEP).clamp_min(1e-6)
        factor = self.profile.step_factor(layer, kind, heads) if self.profile is not None else np.ones(heads)
        step = (self.scale * torch.from_numpy(factor).float() * rms)[:, None].expand(heads, dim)
        if kind == 0 and self.profile is not None and self.profile.key_weights is not None:
            w = torch.from_numpy(np.asarray(self.profile.key_weights[layer], dtype=np.float64)).clamp_min(1e-12)
            w = w / w.log().mean().exp()
            step = step * w.pow(-0.5).float().clamp(1 / 16, 16)
        # No channel needs more than MAX_LEVEL steps from its center: escapes stay far inside int32. With a
        # transform no component may reach MAX_COMPONENT: a component sums at most `gain` times a channel's largest
        # unit value, so channels stay within half of MAX_COMPONENT / gain (the half for the steps' float16 rounding).
        finest = token_factor.min(dim=1).values[:, None] if token_factor is not None and tokens else 1.0
        key = (layer, kind)
        transformed = self.transforms is not None and key in self.transforms.matrices
        if transformed:
            gain = torch.from_numpy(self.transforms.gain(key)).float()[:, None]
            floor = spread * gain / (MAX_COMPONENT / 2 * finest)
        else:
            floor = spread / (MAX_LEVEL * finest)
        if (floor > MAX_STEP).any():
            if token_factor is not None:
                raise _TooFine()
            raise CodecError(f"layer {layer} {KINDS[kind].upper()}: values up to {float(spread.max()):.3g} from "
                             f"their channel mean are beyond kvq's range ({MAX_STEP * MAX_LEVEL:.3g}); use lossless")
        # float16 rounding may shave 2^-11 off a floored step: |q| stays below 2^31 all the same.
        step = torch.maximum(step.clamp(MIN_STEP, 60000), floor).to(torch.float16).float()
        if transformed:
            q, classes = transform_ops.quantize_components(body, center, step, token_factor,
                                                           self.transforms.inverse(key))
        else:
            q, classes = quantize.quantize_classes(body, center, step, token_factor)
        return LayerPlan(center.numpy().astype(np.float16), step.numpy().astype(np.float16), classes), q

    def _skip(self, tokens: int, token_start: int) -> int:
        """How many of a segment's tokens are exact sinks."""
        return min(tokens, max(0, self.sinks - token_start))

    def roundtrip(self, x: torch.Tensor, layer: int, kind: int, token_start: int,
                  attention: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize and dequantize one layer's K or V (heads, tokens, dim) as a file would, without entropy
        coding: with `attention` (heads, tokens) and a token alpha above 0, under the token weights `fit` would
        derive from it.

        Calibration uses it to measure how much the encoder's own error in one place costs the model.
        """
        plan, q, weights, _ = self._fit_one(x.cpu(), layer, kind, token_start,
                                            attention if self.token_alpha > 0 else None, tables=False)
        skip = self._skip(x.shape[1], token_start)
        factor = weights.factors(token_start + skip, x.shape[1] - skip) if weights is not None else None
        if self.transforms is not None and (layer, kind) in self.transforms.matrices:
            q = transform_ops.untransform_ref(q.int(), torch.from_numpy(self.transforms.matrices[(layer, kind)]))
        approx = dequantize.dequantize_rotate_ref(q, _t(plan.center), _t(plan.step),
                                                  self._freq(layer, kind, x.shape[2]), token_start + skip, factor)
        return torch.cat([x[:, :skip].cpu(), approx.transpose(1, 2).to(x.dtype)], 1).to(x.device)

    # ------------------------------------------------------------ factories

    def fit(self, keys: list[torch.Tensor], values: list[torch.Tensor], token_starts: list[int],
            attention: list[torch.Tensor] | None = None, backend: str = "torch") -> "KvqEncoder":
        """Plans and tables from the whole cache, quantizing every element once on the CPU: the encoder keeps the
        integers and codes the segments that are slices of these tensors from them; with backend "triton" it
        quantizes the others where they live. With `attention` (per layer (kv_heads, held),
        kvcli/modeling/importance.py) and a token alpha above 0, token weights too."""
        check_backend(backend)
        self._check_transforms({(layer, kind): (x.shape[0], x.shape[2]) for layer in range(len(token_starts))
                                for kind, x in enumerate((keys[layer], values[layer]))})
        jobs = [(layer, kind) for layer in range(len(token_starts)) for kind in range(2)]

        def fit_one(job: tuple[int, int]):
            layer, kind = job
            return self._fit_one((keys, values)[kind][layer], layer, kind, token_starts[layer],
                                 attention[layer] if attention is not None and self.token_alpha > 0 else None)

        plans: dict[tuple[int, int], LayerPlan] = {}
        tokens: dict[tuple[int, int], TokenWeights] = {}
        counts: dict = {}  # by class, or in version 4 by (class, band)
        fitted: dict[tuple[int, int], Fitted] = {}
        # Two threads: the passes over the elements (C) and torch's reductions run without the GIL. Results and
        # errors come in job order, as from a loop.
        with ThreadPoolExecutor(max_workers=2) as pool:
            for job, (plan, q, weights, layer_counts) in zip(jobs, pool.map(fit_one, jobs)):
                plans[job], fitted[job] = plan, Fitted((keys, values)[job[1]][job[0]], token_starts[job[0]], q)
                if weights is not None:
                    tokens[job] = weights
                for cls, n in layer_counts.items():
                    counts[cls] = counts[cls] + n if cls in counts else n
        freqs = [self._freq(layer, 0, keys[layer].shape[2]) for layer in range(len(token_starts))]
        inv_freq = [None if f is None else f.numpy() for f in freqs]
        if self.version >= 4:
            # A pair no window tuple counted (a segment's tuples start at its own first token) takes its class's
            # counts over all bands.
            pooled: dict[int, np.ndarray] = {}
            for (cls, _), n in counts.items():
                pooled[cls] = pooled[cls] + n if cls in pooled else n.copy()
            counts = {key: n if n.any() else pooled[key[0]] for key, n in counts.items()}
        return KvqEncoder(self, plans, entropy.tables_of(counts), inv_freq, tokens, fitted, backend, self.transforms)

    def _check_transforms(self, shapes: dict[tuple[int, int], tuple[int, int]]) -> None:
        """CodecError unless a codec that names a dictionary has its transform, and every matrix fits the (heads,
        dim) of its layer and kind in `shapes` (the cache's, or the file's plans)."""
        if self.dictionary is None:
            return
        if self.transforms is None:
            raise CodecError(f"the file needs dictionary {self.dictionary}, and none was attached")
        for (layer, kind), m in self.transforms.matrices.items():
            if shapes.get((layer, kind)) != m.shape[:2]:
                raise CodecError(f"the transform of layer {layer} {KINDS[kind].upper()} has (heads, dim) "
                                 f"{m.shape[:2]}, the cache {shapes.get((layer, kind), 'no such layer')}")

    def _fit_one(self, x: torch.Tensor, layer: int, kind: int, start: int, attention: torch.Tensor | None,
                 tables: bool = True):
        """fit's work for one layer and kind: (plan, integers, token weights or None, symbol counts of a table
        sample per class of the plan, or in version 4 per (class, band); {} unless `tables`)."""
        skip = self._skip(x.shape[1], start)
        if skip and not torch.isfinite(x[:, :skip]).all():
            raise CodecError(f"layer {layer} {KINDS[kind].upper()} holds non-finite values (NaN or Inf) in "
                             "its sink tokens, which kvq cannot code; use lossless")
        body = quantize.to_channels(x[:, skip:], self._freq(layer, kind, x.shape[2]), start + skip)
        weights = factor = None
        if attention is not None:
            if attention.shape != x.shape[:2]:
                raise ValueError(f"layer {layer}: attention {tuple(attention.shape)} for a cache of "
                                 f"{tuple(x.shape[:2])} (heads, tokens)")
            weights = TokenWeights(start, self.token_exponents(attention, skip))
            factor = weights.factors(start + skip, x.shape[1] - skip)
        try:
            plan, q = self._fit_layer(body, layer, kind, factor)
        except _TooFine:  # values so far out that a token's finer steps would leave int32: no weights
            weights = None
            plan, q = self._fit_layer(body, layer, kind)
        if not tables:
            return plan, q, weights, {}
        # Every class a plan names gets a table, used or not. Tables are a model, not a census: a contiguous
        # window of tokens keeps neighbour statistics.
        mid = max(0, (body.shape[2] - TABLE_SAMPLE_TOKENS) // 2)
        window = q[:, :, mid : mid + TABLE_SAMPLE_TOKENS].numpy()  # (H, D, T)
        if self.version < 4:
            counts = {int(cls): entropy.count_symbols(int(cls), window[plan.classes == cls])
                      for cls in np.unique(plan.classes)}
            return plan, q, weights, counts
        # Version 4: every band among the layer's coded tokens gets a table for every class of the plan.
        bands = entropy.bands_of(weights.exponents[:, skip:]) if weights is not None else \
            np.full((x.shape[0], body.shape[2]), entropy.PLAIN_BAND, np.uint8)
        present = np.unique(bands).tolist() or [entropy.PLAIN_BAND]  # a body of no tokens: classes still need one
        win_bands = np.broadcast_to(bands[:, None, mid : mid + window.shape[2]], window.shape)
        counts = {}
        for cls in np.unique(plan.classes).tolist():
            mask = plan.classes == cls
            got = entropy.count_banded(cls, window[mask], np.ascontiguousarray(win_bands[mask]))
            for band in present:
                counts[(cls, band)] = got.get(band, np.zeros(entropy.alphabet(cls), np.int64))
        return plan, q, weights, counts

    def open(self, aux: dict[str, bytes], layers: int, backend: str = "torch") -> "KvqDecoder":
        check_backend(backend)
        version = self.version
        allowed = [{"kvq.plan", "kvq.tables"}] + ([{"kvq.plan", "kvq.tables", "kvq.tokens"}] if version >= 3 else [])
        if set(aux) not in allowed:
            raise CodecError(f"kvq version {version} needs aux segments kvq.plan and kvq.tables"
                             f"{' (and optionally kvq.tokens)' if version >= 3 else ''}, found {sorted(aux)}")
        tables = entropy.unpack_tables(unzstd(aux["kvq.tables"], AUX_LIMIT), banded=version >= 4)
        plans, inv_freq = unpack_plans(unzstd(aux["kvq.plan"], AUX_LIMIT))
        if len(plans) != 2 * layers:  # a plan for a layer the file does not have would be read and never used
            raise CodecError(f"kvq.plan has {len(plans) // 2} layers, the header {layers}")
        tokens = unpack_tokens(unzstd(aux["kvq.tokens"], AUX_LIMIT), plans) if "kvq.tokens" in aux else {}
        self._check_transforms({key: p.center.shape for key, p in plans.items()})
        return KvqDecoder(self, plans, tables, inv_freq, tokens, backend, self.transforms)


class _TooFine(Exception):
    """A layer's values reach so far that its finest token weight would need integers beyond MAX_LEVEL."""


@dataclass(frozen=True)
class TokenWeights:
    """One layer and kind's token-weight exponents: int8 (heads, tokens) for absolute positions from `first`."""

    first: int
    exponents: np.ndarray

    @functools.cached_property
    def bands(self) -> np.ndarray:
        """Version 4's band (uint8, heads, tokens) of every exponent, computed once (threads compute the same)."""
        return entropy.bands_of(self.exponents)

    def factors(self, start: int, tokens: int) -> torch.Tensor:
        """float32 (heads, tokens) step factors 2^(e/8) of positions [start, start + tokens), which must lie
        inside the weights' range (callers check with covers)."""
        lo = start - self.first
        return torch.from_numpy(TOKEN_FACTORS[self.exponents[:, lo : lo + tokens].astype(np.int64) + TOKEN_EXPONENT_LIMIT])

    def covers(self, heads: int, start: int, tokens: int) -> bool:
        return (self.exponents.shape[0] == heads and start >= self.first
                and start + tokens <= self.first + self.exponents.shape[1])


class _Planned:
    """What encoder and decoder share: the codec, per-(layer, kind) plans, entropy tables, rotary frequencies,
    token weights, the transform's matrices by (layer, kind) (int16 tensors; none without a transform), and the
    backend they were built for (base.BACKENDS)."""

    def __init__(self, codec: KvqCodec, plans: dict[tuple[int, int], LayerPlan], tables: entropy.ClassTables,
                 inv_freq: list[np.ndarray | None], tokens: dict[tuple[int, int], TokenWeights] | None = None,
                 backend: str = "torch", transforms: Transforms | None = None):
        self.codec = codec
        self.transforms = transforms
        self._matrices = {key: torch.from_numpy(m) for key, m in transforms.matrices.items()} if transforms else {}
        self.backend = backend
        self.tokens = tokens or {}
        self.plans = plans
        self.tables = tables
        self.inv_freq = inv_freq
        self._groups = {key: plan.groups for key, plan in plans.items()}
        self._tensors = {key: (_t(p.center), _t(p.step)) for key, p in plans.items()}

    def _segment(self, ctx: SegmentContext) -> tuple[LayerPlan, int, entropy.Limits]:
        """The plan, sink count and size limits of a segment."""
        kind = KINDS.index(ctx.kind)
        plan = self.plans.get((ctx.layer, kind))
        if plan is None or plan.center.shape != (ctx.heads, ctx.dim):
            raise CodecError(f"no plan for layer {ctx.layer} {ctx.kind.upper()} with shape {(ctx.heads, ctx.dim)}")
        skip = self.codec._skip(ctx.tokens, ctx.token_start)
        sink_bytes = ctx.heads * skip * ctx.dim * ITEMSIZE[ctx.dtype]
        return plan, skip, entropy.limits(self._groups[(ctx.layer, kind)], ctx.tokens - skip, sink_bytes)

    def _freq(self, layer: int, kind: int) -> torch.Tensor | None:
        freq = self.inv_freq[layer] if kind == 0 and layer < len(self.inv_freq) else None
        return torch.from_numpy(freq) if freq is not None else None

    def _token_weights(self, ctx: SegmentContext, skip: int) -> TokenWeights | None:
        """The token weights of a segment's layer and kind, None if the file has none for them; CodecError if
        they do not cover the segment's body."""
        weights = self.tokens.get((ctx.layer, KINDS.index(ctx.kind)))
        if weights is not None and not weights.covers(ctx.heads, ctx.token_start + skip, ctx.tokens - skip):
            raise CodecError(f"token weights of layer {ctx.layer} {ctx.kind.upper()} (heads "
                             f"{weights.exponents.shape[0]}, positions {weights.first} to "
                             f"{weights.first + weights.exponents.shape[1]}) do not cover the segment")
        return weights

    def _bands(self, ctx: SegmentContext, skip: int) -> np.ndarray | None:
        """Version 4: the bands (heads, non-sink tokens) uint8 of a segment's coded tokens, which choose its symbols'
        tables (docs/codec.md, "Version 4"); None before."""
        if self.tables.bands is None:
            return None
        weights = self._token_weights(ctx, skip)
        if weights is None:
            return np.full((ctx.heads, ctx.tokens - skip), entropy.PLAIN_BAND, np.uint8)
        lo = ctx.token_start + skip - weights.first
        return weights.bands[:, lo : lo + ctx.tokens - skip]

    def _table_ids(self, ctx: SegmentContext, skip: int, lay: entropy.Layout) -> np.ndarray | None:
        """Version 4: the table of each of a segment's symbols (entropy.Layout.table_ids); None before."""
        bands = self._bands(ctx, skip)
        return None if bands is None else lay.table_ids(self.tables, bands, ctx.dim)

    def _token_factors(self, ctx: SegmentContext, skip: int) -> torch.Tensor | None:
        """float32 (heads, non-sink tokens) step factors of a segment's body, or None (_token_weights)."""
        weights = self._token_weights(ctx, skip)
        return weights.factors(ctx.token_start + skip, ctx.tokens - skip) if weights is not None else None


@dataclass(frozen=True)
class Fitted:
    """What fit quantized for one layer and kind: the tensor (heads, tokens, dim) it was given, the absolute
    position of that tensor's first token, and the integers (heads, dim, non-sink tokens) of its body."""

    source: torch.Tensor
    start: int
    q: torch.Tensor

    def rows(self, x: torch.Tensor, token_start: int, skip: int) -> torch.Tensor | None:
        """The integers of x[:, skip:] if x is the slice of `source` from absolute position token_start (so
        the values fit saw, as kvfile.encode passes them); None for any other tensor."""
        src, lo = self.source, token_start - self.start
        if (x.device != src.device or x.dtype != src.dtype or x.stride() != src.stride() or x.dim() != 3
                or x.shape[0] != src.shape[0] or x.shape[2] != src.shape[2] or lo < 0
                or lo + x.shape[1] > src.shape[1]
                or x.data_ptr() != src.data_ptr() + lo * src.stride(1) * src.element_size()):
            return None
        first = lo + skip - (src.shape[1] - self.q.shape[2])  # fit's body starts after the layer's sinks
        return self.q[:, :, first : first + x.shape[1] - skip] if first >= 0 else None


class KvqEncoder(_Planned, Encoder):
    """With backend "triton", _prepare quantizes each segment fit did not see on its tensor's device with
    kvq_ops/quantize_triton.py, which gives the torch path's integers exactly."""

    def __init__(self, codec: KvqCodec, plans: dict[tuple[int, int], LayerPlan], tables: entropy.ClassTables,
                 inv_freq: list[np.ndarray | None], tokens: dict[tuple[int, int], TokenWeights] | None = None,
                 fitted: dict[tuple[int, int], Fitted] | None = None, backend: str = "torch",
                 transforms: Transforms | None = None):
        super().__init__(codec, plans, tables, inv_freq, tokens, backend, transforms)
        self.fitted = fitted or {}
        self._layouts: dict = {}  # entropy.Layout by (layer, kind, non-sink tokens); threads compute the same
        tables.reciprocals  # computed once here rather than by both coding threads

    def aux(self) -> dict[str, bytes]:
        zc = zstandard.ZstdCompressor(level=AUX_LEVEL)
        aux = {"kvq.plan": zc.compress(pack_plans(self.plans, self.inv_freq)),
               "kvq.tables": zc.compress(entropy.pack_tables(self.tables))}
        if self.tokens:
            aux["kvq.tokens"] = zc.compress(pack_tokens(self.tokens))
        return aux

    def encode(self, x: torch.Tensor, ctx: SegmentContext) -> bytes:
        return self.encode_many([(x, ctx)])[0]

    def encode_many(self, jobs: list[tuple[torch.Tensor, SegmentContext]]) -> list[bytes]:
        """Quantize every segment, then entropy-code them in a few large batches on two threads."""
        batches, current, size = [], [], 0
        for i, (_, ctx) in enumerate(jobs):
            current.append(i)
            size += self._segment(ctx)[2].symbols
            if size >= BATCH_SYMBOLS:
                batches.append(current)
                current, size = [], 0
        if current:
            batches.append(current)
        out: list[bytes] = [b""] * len(jobs)

        def run(batch: list[int]) -> None:
            prepared = [self._prepare(*jobs[i]) for i in batch]
            coded = entropy.encode_segments(self.tables, [p[:3] + p[4:] for p in prepared])
            for i, head, (_, _, lim, sinks, _) in zip(batch, coded, prepared):
                out[i] = head + sinks
                assert len(out[i]) <= lim.max_bytes

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(run, batches))
        return out

    def _prepare(self, x: torch.Tensor, ctx: SegmentContext):
        """(entropy layout, rows (heads*dim, tokens) int16 or int32, limits, sink bytes, table per symbol or None
        before version 4) of one segment."""
        plan, skip, lim = self._segment(ctx)
        kind = KINDS.index(ctx.kind)
        center, step = self._tensors[(ctx.layer, kind)]
        fitted = self.fitted.get((ctx.layer, kind))
        q = fitted.rows(x, ctx.token_start, skip) if fitted is not None else None
        if q is None:
            factor = self._token_factors(ctx, skip)
        if q is None and (ctx.layer, kind) in self._matrices:  # on the CPU, in float64, with either backend
            body = quantize.to_channels(x[:, skip:].cpu(), self._freq(ctx.layer, kind), ctx.token_start + skip)
            inverse = self.transforms.inverse((ctx.layer, kind))
            q = transform_ops.quantize_components(body, center, step, factor, inverse)[0]
        elif q is None and self.backend == "triton":
            from .kvq_ops.quantize_triton import quantize_unrotate  # needs triton; imported only when asked for

            q = quantize_unrotate(x[:, skip:], center, step, self._freq(ctx.layer, kind), ctx.token_start + skip,
                                  factor).cpu()
        elif q is None:
            q = quantize.quantize_segment(x[:, skip:], center, step, self._freq(ctx.layer, kind),
                                          ctx.token_start + skip, factor)
        rows = q.numpy().reshape(ctx.heads * ctx.dim, ctx.tokens - skip)  # a view: no copy of fit's integers
        sinks = tensor_bytes(x[:, :skip].cpu()).tobytes() if skip else b""
        key = (ctx.layer, kind, ctx.tokens - skip)
        if key not in self._layouts:
            self._layouts[key] = entropy.Layout.of(self._groups[(ctx.layer, kind)], ctx.tokens - skip, self.tables)
        lay = self._layouts[key]
        return lay, rows, lim, sinks, self._table_ids(ctx, skip, lay)


class KvqDecoder(_Planned, Decoder):
    batch_elements = 1 << 23
    # decode_onto's batches: the kernels want many streams per launch; about 10 bytes of device scratch each.
    device_batch_elements = 1 << 26
    channel_major = True  # dequantization works per channel

    def __init__(self, *args):
        super().__init__(*args)
        self.on_device = self.backend == "triton"
        self._segments: dict = {}  # _segment's results by layout; every thread computes the same values
        self._layouts: dict = {}  # entropy.Layout by (layer, kind, non-sink tokens), likewise
        self._host = {key: (c.numpy().reshape(-1), st.numpy().reshape(-1)) for key, (c, st) in self._tensors.items()}
        # transform_ops.prepare's matrices by (layer, kind), made on first use: kept with the transforms, which a
        # process shares among every file of one dictionary (Dictionary.derived), so prepared once per process.
        self._prepared: dict = self.transforms.prepared if self.transforms is not None else {}
        self._device_states: dict = {}  # per device: tables and layouts on it (kvq_ops/decode_triton.py)
        self._lock = threading.Lock()

    def _layout(self, ctx: SegmentContext) -> tuple[LayerPlan, int, entropy.Limits]:
        """_segment's result, once per layout: it depends on the position only through the sink count."""
        key = (ctx.kind, ctx.layer, ctx.heads, ctx.dim, ctx.tokens, min(ctx.token_start, self.codec.sinks), ctx.dtype)
        if key not in self._segments:
            self._segments[key] = self._segment(ctx)
        return self._segments[key]

    def split(self, segments: list[tuple[SegmentContext, bytes]]) -> list[tuple[list[entropy.Group], int,
                                                                               entropy.Coded]]:
        """Per segment (groups, sink tokens, coded part), every size checked against its limits and the sinks
        checked finite; CodecError with `index` names the first failing segment."""
        out = []
        for i, (ctx, data) in enumerate(segments):
            try:
                _, skip, lim = self._layout(ctx)
                self._token_weights(ctx, skip)
                coded = entropy.split_segment(data, lim)
                if coded.end < len(data) and has_nonfinite(data[coded.end :], ctx.dtype):
                    raise CodecError("a sink token holds a non-finite value, which no kvq writer stores")
                out.append((self._groups[(ctx.layer, KINDS.index(ctx.kind))], skip, coded))
            except CodecError as err:
                raise CodecError(str(err), index=i) from None
        return out

    def entropy(self, segments: list[tuple[SegmentContext, bytes]]) -> list[entropy.Symbols]:
        """Each segment's joint symbols and escape values, every check done; all streams in one pass."""
        jobs = []
        for i, ((ctx, _), (_, skip, coded)) in enumerate(zip(segments, self.split(segments))):
            try:
                lay = self._entropy_layout(ctx.layer, KINDS.index(ctx.kind), ctx.tokens - skip)
                bands = self._bands(ctx, skip)
                jobs.append((lay, coded) if bands is None else (lay, coded, bands, ctx.dim))
            except CodecError as err:
                raise CodecError(str(err), index=i) from None
        out = entropy.decode_segments(self.tables, jobs)
        for i, ((ctx, _), symbols) in enumerate(zip(segments, out)):
            if (ctx.layer, KINDS.index(ctx.kind)) in self._matrices:
                check_components(symbols.escapes, i)
        return out

    def _entropy_layout(self, layer: int, kind: int, tokens: int) -> entropy.Layout:
        """CodecError if a class of the plan has no table."""
        key = (layer, kind, tokens)
        if key not in self._layouts:
            self._layouts[key] = entropy.Layout.of(self._groups[(layer, kind)], tokens, self.tables)
        return self._layouts[key]

    def decode_onto(self, segments: list[tuple[SegmentContext, bytes, torch.Tensor]]) -> None:
        """The device path of backend "triton" (kvq_ops/decode_triton.py): a batch of segments decoded straight into
        their (heads, tokens, dim) outputs on one device, in a few launches, with the values and refusals of
        entropy() followed by reconstruct()."""
        from .kvq_ops import decode_triton  # needs triton; imported only when asked for

        if not self.on_device:
            raise ValueError("decode_onto needs a decoder opened with backend triton")
        if not segments:
            return
        device = segments[0][2].device
        with self._lock:
            state = self._device_states.get(str(device))
            if state is None:
                state = self._device_states[str(device)] = decode_triton.DeviceState(self, device)
        decode_triton.decode_onto(state, segments)

    def reconstruct(self, ctx: SegmentContext, data: bytes, symbols: entropy.Symbols, out: torch.Tensor) -> None:
        """The exact sinks into out[:, :sinks], the body into out[:, sinks:]: in C for a CPU output of the file's
        dtype (dequantize_body), in torch otherwise (the triton backend decodes whole batches with decode_onto)."""
        _, skip, lim = self._layout(ctx)
        if skip:
            sink_ctx = SegmentContext(ctx.kind, ctx.layer, ctx.token_start, ctx.heads, skip, ctx.dim, ctx.dtype)
            out[:, :skip].copy_(bytes_to_tensor(bytes(data[len(data) - lim.sink_bytes :]), sink_ctx))
        if skip == ctx.tokens:
            return
        if out.device.type == "cpu" and out.dtype == ctx.torch_dtype:
            self.dequantize_body(ctx, skip, symbols, out[:, skip:])
        else:
            self.dequantize_body_ref(ctx, skip, symbols, out[:, skip:])

    def dequantize_body(self, ctx: SegmentContext, skip: int, symbols: entropy.Symbols, body: torch.Tensor) -> None:
        """Expand, dequantize (with token weights where the file has them), rotate keys and cast into body
        (heads, tokens - skip, dim), a CPU tensor of the file's dtype, in C (dequantize.reconstruct): values bit
        for bit dequantize_body_ref's; a transformed layer's M q on the way (kvq_ops/transform.c)."""
        key = (ctx.layer, KINDS.index(ctx.kind))
        center, step = self._host[key]
        matrix = self._prepared.get(key)
        if matrix is None and key in self._matrices:  # threads may both prepare it: the same values
            matrix = self._prepared[key] = transform_ops.prepare(self._matrices[key].numpy())
        dequantize.reconstruct(symbols, self.tables, center, step, self._freq(*key), ctx.token_start + skip,
                               self._token_factors(ctx, skip), body, matrix)

    def dequantize_body_ref(self, ctx: SegmentContext, skip: int, symbols: entropy.Symbols,
                            body: torch.Tensor) -> None:
        """dequantize_body in torch (dequantize.reconstruct_ref), on body's device and into any dtype."""
        key = (ctx.layer, KINDS.index(ctx.kind))
        center, step = self._tensors[key]
        dequantize.reconstruct_ref(symbols, self.tables, center, step, self._freq(*key), ctx.token_start + skip,
                                   self._token_factors(ctx, skip), body, ctx.dtype, self._matrices.get(key))


# ---------------------------------------------------------------- plan bytes


def pack_plans(plans: dict[tuple[int, int], LayerPlan], inv_freq: list[np.ndarray | None]) -> bytes:
    layers = len(plans) // 2
    parts = [struct.pack("<I", layers)]
    for layer in range(layers):
        for kind in range(2):
            p = plans[(layer, kind)]
            heads, dim = p.center.shape
            freq = inv_freq[layer] if kind == 0 and layer < len(inv_freq) else None
            parts.append(struct.pack("<HHB", heads, dim, 0 if freq is None else 1))
            parts += [p.center.astype("<f2").tobytes(), p.step.astype("<f2").tobytes(), p.classes.tobytes()]
            if freq is not None:
                parts.append(np.asarray(freq, dtype="<f4").tobytes())
    return b"".join(parts)


def unpack_plans(plan: bytes) -> tuple[dict[tuple[int, int], LayerPlan], list[np.ndarray | None]]:
    plans, inv_freq = {}, []
    try:
        (layers,) = struct.unpack_from("<I", plan, 0)
        pos = 4
        for layer in range(layers):
            for kind in range(2):
                heads, dim, has_rope = struct.unpack_from("<HHB", plan, pos)
                pos += 5
                n = heads * dim
                if pos + 5 * n > len(plan) or has_rope > 1 or (has_rope and kind == 1):
                    raise CodecError(f"plan of layer {layer} is truncated or invalid")
                center = np.frombuffer(plan, "<f2", n, pos).astype(np.float16).reshape(heads, dim)
                step = np.frombuffer(plan, "<f2", n, pos + 2 * n).astype(np.float16).reshape(heads, dim)
                classes = np.frombuffer(plan, np.int8, n, pos + 4 * n).reshape(heads, dim)
                pos += 5 * n
                if not (np.isfinite(step).all() and (step > 0).all() and np.isfinite(center).all()):
                    raise CodecError(f"layer {layer}: steps must be finite and positive, centers finite")
                if n and (classes.min() < entropy.MIN_CLASS or classes.max() > entropy.MAX_CLASS):
                    raise CodecError(f"layer {layer}: channel class out of range")
                plans[(layer, kind)] = LayerPlan(center, step, classes)
                if kind == 0:
                    freq = None
                    if has_rope:
                        if dim % 2 or pos + 2 * dim > len(plan):
                            raise CodecError(f"layer {layer}: bad rotary table")
                        freq = np.frombuffer(plan, "<f4", dim // 2, pos).astype(np.float32)
                        pos += 2 * dim
                        if not np.isfinite(freq).all():
                            raise CodecError(f"layer {layer}: rotary frequencies must be finite")
                    inv_freq.append(freq)
    except struct.error:
        raise CodecError("plan is truncated") from None
    if pos != len(plan):
        raise CodecError("plan has trailing bytes")
    return plans, inv_freq


EXPONENT_MASKS = {"float32": ("<u4", 0x7F800000), "float16": ("<u2", 0x7C00), "bfloat16": ("<u2", 0x7F80)}


# ---------------------------------------------------------------- token weight bytes


def pack_tokens(tokens: dict[tuple[int, int], TokenWeights]) -> bytes:
    parts = [struct.pack("<I", len(tokens))]
    for (layer, kind), w in sorted(tokens.items()):
        heads, count = w.exponents.shape
        parts.append(struct.pack("<IBHII", layer, kind, heads, w.first, count))
        parts.append(np.ascontiguousarray(w.exponents, dtype=np.int8).tobytes())
    return b"".join(parts)


def unpack_tokens(data: bytes, plans: dict[tuple[int, int], LayerPlan]) -> dict[tuple[int, int], TokenWeights]:
    """The kvq.tokens entries, every check of docs/codec.md ("Token weights") done; CodecError otherwise."""
    tokens: dict[tuple[int, int], TokenWeights] = {}
    try:
        (count,) = struct.unpack_from("<I", data, 0)
        pos, last = 4, None
        for _ in range(count):
            layer, kind, heads, first, n = struct.unpack_from("<IBHII", data, pos)
            pos += 15
            if last is not None and (layer, kind) <= last:
                raise CodecError("kvq.tokens entries must be in increasing (layer, kind) order, each once")
            last = (layer, kind)
            plan = plans.get((layer, kind)) if kind < 2 else None
            if plan is None or plan.center.shape[0] != heads:
                raise CodecError(f"kvq.tokens has weights for layer {layer} kind {kind} with {heads} heads, which "
                                 "no plan has")
            if pos + heads * n > len(data):
                raise CodecError("kvq.tokens is truncated")
            e = np.frombuffer(data, np.int8, heads * n, pos).reshape(heads, n)
            pos += heads * n
            if e.size and int(np.abs(e.astype(np.int16)).max()) > TOKEN_EXPONENT_LIMIT:
                raise CodecError(f"kvq.tokens exponents must lie in [-{TOKEN_EXPONENT_LIMIT}, {TOKEN_EXPONENT_LIMIT}]")
            tokens[(layer, kind)] = TokenWeights(first, e)
    except struct.error:
        raise CodecError("kvq.tokens is truncated") from None
    if pos != len(data):
        raise CodecError(f"kvq.tokens has {len(data) - pos} trailing bytes")
    return tokens


def check_components(escapes: np.ndarray, index: int) -> None:
    """CodecError unless a transformed segment's escaped integers lie in (-MAX_COMPONENT, MAX_COMPONENT), which
    keeps the decoder's M q exact in float64 (the others lie in [-255, 255])."""
    if escapes.size and int(np.abs(escapes.astype(np.int64)).max()) >= MAX_COMPONENT:
        raise CodecError("a transformed segment holds a component integer beyond +-2^30", index=index)


def _check_dictionary(sha, version: int) -> str:
    """The param `dictionary`: 64 lowercase hex digits, in a version-4 file only."""
    if version != 4:
        raise CodecError(f"kvq version {version} takes no dictionary (only version 4 does)")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise CodecError(f"kvq dictionary must be a SHA-256 as 64 lowercase hex digits, got {sha!r}")
    return sha


def has_nonfinite(raw: bytes, dtype: str) -> bool:
    """Whether little-endian elements of `dtype` include NaN or infinity (all exponent bits set)."""
    kind, mask = EXPONENT_MASKS[dtype]
    bits = np.frombuffer(raw, kind)
    return bool(((bits & mask) == mask).any())


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))
