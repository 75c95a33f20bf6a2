"""Each lossy preset's step scale for one model, chosen so that the preset meets its rate (docs/codec.md, "Presets:
a rate per model").

A preset names a size: `small` is at most 1.5 bits per element, `tiny` at most 1 (issue 20's boxes). How many bits a
step costs differs from model to model (at the same scales Gemma 3 270M's `small` came to 1.15 bits per element where
SmolLM2 135M's came to 1.27), so calibration sets the scale per model: the one at which the calibration texts' files
come to the preset's TARGET_BITS. Quality then follows from the model, not the size.

Through the transform the texts the dictionary was learned on are not a fair sample: the dictionary fits them better
than other documents (Gemma 3 coded them in 11-13% fewer bits than corpus documents at the same scale, SmolLM2 in 3%;
without the transform they predicted the corpus's bits within 1%). So each text is coded with the transform learned
on the other texts only, leave one out; with a single text there is no other, and it is coded with its own (its
scales then come out coarser than they should: the profile's details say `"held_out": false`).

The token weights' alpha (how much coarser a token's steps get for less attention, docs/codec.md "Token weights")
is the model's too: on held-out texts the least KL at equal bits came at about 0.3 on SmolLM2 135M and 0.45-0.5 on
Gemma 3 270M (docs/codec.md, "Token alpha per model"). So before the scales, each of ALPHAS is tried at ALPHA_PRESET's
target rate (its scale solved as below) and the one whose decoded texts give the continuation the least KL is kept
for every preset of TARGET_BITS.
"""

from __future__ import annotations

import math

import numpy as np

from ..codecs.presets import LOSSY_SCALES, TARGET_BITS, TRANSFORM_PRESETS, make_codec
from ..codecs.transform import Transforms
from ..container import format, kvfile
from ..modeling import inference
from ..modeling.kvcache import KVCache
from ..modeling.models import LoadedModel
from ..modeling.rope import inv_freq_per_layer
from . import bases as bases_
from . import quality

TOLERANCE = 0.005  # relative: closer than this to the target is done
MAX_TRIES = 8
# Bits per element go about as scale ** -EXPONENT near the presets (0.67-0.75 measured on both models): the first
# step's guess, before two points give the secant.
EXPONENT = 0.7
CHUNK_TOKENS = kvfile.DEFAULT_CHUNK_TOKENS
ALPHAS = (0.25, 0.35, 0.45)
ALPHA_PRESET = "small"


def held_out(lm: LoadedModel, moments: list[bases_.Moments]) -> list[tuple[Transforms, str] | None]:
    """Per text, the transform learned on every other text, with its dictionary's SHA-256 (None where that
    learns none: every head wider than the transform allows); a single text gets its own."""
    out = []
    for i in range(len(moments)):
        others = [m for j, m in enumerate(moments) if j != i] or moments
        found = bases_.to_dictionary(bases_.Moments.merged(others).bases(), lm.identity)
        out.append(None if found is None else (Transforms.unpack(found.payload), found.sha))
    return out


def _codec(lm: LoadedModel, profile, preset: str, scale: float, alpha: float | None,
           found: tuple[Transforms, str] | None):
    use = found if preset in TRANSFORM_PRESETS else None
    return make_codec(preset, profile, inv_freq_per_layer(lm.model), transforms=use[0] if use else None,
                      dictionary=use[1] if use else None, base_scale=scale, token_alpha=alpha)


def bits_per_element(lm: LoadedModel, profile, preset: str, scale: float, caches: list[KVCache],
                     transforms: list[tuple[Transforms, str] | None], alpha: float | None = None) -> float:
    """What the texts' files come to at `scale`: bytes of whole files (header and tables included), 8 bits each, per
    stored element."""
    total_bytes = elements = 0
    for kv, found in zip(caches, transforms):
        codec = _codec(lm, profile, preset, scale, alpha, found)
        meta, parts = kvfile.encode(kv, lm.identity, codec, CHUNK_TOKENS)
        total_bytes += len(format.build_header(meta, parts)) + sum(len(p.data) for p in parts)
        elements += sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))
    return 8 * total_bytes / elements


def solve(bits, start: float, target: float) -> tuple[float, float]:
    """(scale, bits there) with bits(scale) within TOLERANCE of `target`, or the closest of MAX_TRIES tries:
    secant steps in log-log, where bits(scale) is nearly a line."""
    tried = [(start, bits(start))]
    scale = start * (tried[0][1] / target) ** (1 / EXPONENT)
    while abs(tried[-1][1] / target - 1) > TOLERANCE and len(tried) < MAX_TRIES:
        tried.append((scale, bits(scale)))
        (s0, b0), (s1, b1) = tried[-2], tried[-1]
        slope = (math.log(b1) - math.log(b0)) / (math.log(s1) - math.log(s0)) if s1 != s0 else 0.0
        # Bits fall as the step grows; a flat or rising estimate (noise at a tiny step) falls back to the guess.
        slope = slope if slope < -0.05 else -EXPONENT
        scale = s1 * math.exp((math.log(target) - math.log(b1)) / slope)
    return min(tried, key=lambda t: abs(math.log(t[1] / target)))


def kl(lm: LoadedModel, profile, preset: str, scale: float, alpha: float, references: list[quality.Reference],
       transforms: list[tuple[Transforms, str] | None]) -> float:
    """The geometric mean over the texts of the continuation's KL with the cache decoded as the preset's file at
    `scale` and `alpha` would be."""
    logs = []
    for ref, found in zip(references, transforms):
        decoded = quality.decoded_as(ref.kv, _codec(lm, profile, preset, scale, alpha, found))
        logs.append(np.log(max(quality.compare(lm, ref, decoded).kl, 1e-12)))
    return float(np.exp(np.mean(logs)))


def choose(lm: LoadedModel, profile, contexts: list[quality.Context], transforms: list[tuple[Transforms, str] | None],
           held: bool, progress=None) -> tuple[dict[str, float], float, dict]:
    """The token alpha for this model, per preset of TARGET_BITS its scale at that alpha, and what was measured (for
    the profile's details): the KL at ALPHA_PRESET's rate per alpha tried, the texts' bits per element at each
    chosen scale. `contexts`: the calibration texts' caches (with their attention) and continuations;
    `transforms`: per text the transform it is coded with (None for none), `held` whether it was learned without
    that text."""
    caches = [kv for kv, _, _ in contexts]
    references = [quality.Reference(kv, feed, targets, inference.logits_after(lm, kv, feed).float())
                  for kv, feed, targets in contexts]
    tried, solved = {}, {}
    for alpha in ALPHAS:
        solved[alpha] = solve(lambda s: bits_per_element(lm, profile, ALPHA_PRESET, s, caches, transforms, alpha),
                              LOSSY_SCALES[ALPHA_PRESET], TARGET_BITS[ALPHA_PRESET])
        tried[alpha] = kl(lm, profile, ALPHA_PRESET, solved[alpha][0], alpha, references, transforms)
        if progress:
            progress()
    alpha = min(ALPHAS, key=tried.get)
    scales, reached = {}, {}
    for preset, target in TARGET_BITS.items():
        scale, bits = solved[alpha] if preset == ALPHA_PRESET else solve(
            lambda s: bits_per_element(lm, profile, preset, s, caches, transforms, alpha), LOSSY_SCALES[preset], target)
        scales[preset], reached[preset] = scale, round(bits, 4)
        if progress:
            progress()
    return scales, alpha, {"target_bits": TARGET_BITS, "calibration_bits": reached, "held_out": held,
                           "alpha_kl": {f"{a:g}": float(f"{k:.6g}") for a, k in tried.items()}}
