"""kvq's per-head transform, learned on the calibration texts (issue 20; docs/codec.md, "Calibration and profiles").

Version 4 may code each (layer, K/V, head) in the eigenbasis of its values' covariance in kvq's own quantization
space, the unit-step space u = (x - center) / (step * g): keys with RoPE undone, the steps that the profile's
sensitivities and key-channel weights set, g the token weights from the attention each token received. Uniform
unit steps over decorrelated components are reverse water-filling at the quantizer's distortion, so the
profile's allocation holds (docs/codec.md, "Version 4 candidates, measured": KL x0.38-0.53 at equal bits).

The space is computed by the codec itself (KvqCodec._fit_one), so that the basis is fitted where the encoder will
apply it. A uniform factor per head (the preset's scale, the head's sensitivity, its RMS) does not change the
eigenvectors; the per-channel key weights and the per-token factors do, which is why the covariance is taken
under the final profile, from caches that carry their attention.
"""

from __future__ import annotations

import numpy as np
import torch

from ..codecs.kvq import TOKEN_EXPONENT_LIMIT, KvqCodec, Profile
from ..codecs.kvq_ops import quantize
from ..codecs.presets import make_codec
from ..container import dictionary
from ..modeling import inference
from ..modeling.kvcache import KVCache
from ..modeling.models import LoadedModel
from ..modeling.rope import inv_freq_per_layer
from . import quality

# The variances are given in units of this preset's steps (any preset has the same eigenvectors).
PRESET = "balanced"

Bases = dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]  # (layer, kind) -> (bases (H, D, D), variances (H, D))


def codec_for(lm: LoadedModel, profile: Profile) -> KvqCodec:
    """The codec whose unit-step space the bases are fitted in: the preset's, under `profile`, at kvq's default
    token alpha and with every token exponent. The space stays what it was when the presets' alphas and caps were
    encoder policy of their own, so a profile's dictionary does not change with them (the shipped one included),
    and leaving the texts out (kvcli/calibration/scales.py) still finds the profile's own dictionary."""
    return make_codec(PRESET, profile, inv_freq_per_layer(lm.model), token_coarsest=TOKEN_EXPONENT_LIMIT)


def unit_space(codec: KvqCodec, x: torch.Tensor, layer: int, kind: int, start: int,
               attention: torch.Tensor | None) -> torch.Tensor:
    """float64 (heads, dim, coded tokens): one layer's K or V (heads, tokens, dim) as the codec quantizes it,
    before rounding. Sinks, which kvq keeps exact, are left out."""
    plan, _, weights, _ = codec._fit_one(x, layer, kind, start, attention if codec.token_alpha > 0 else None,
                                         tables=False)
    skip = codec._skip(x.shape[1], start)
    body = quantize.to_channels(x[:, skip:].float().contiguous(), codec._freq(layer, kind, x.shape[2]),
                                start + skip).double()
    size = torch.from_numpy(plan.step.astype(np.float64))[..., None]
    if weights is not None:
        size = size * weights.factors(start + skip, x.shape[1] - skip).double()[:, None, :]
    return (body - torch.from_numpy(plan.center.astype(np.float64))[..., None]) / size


class Moments:
    """Per (layer, K/V), per head, the sum of u u^T over the coded tokens of every cache added, and their count."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], int] = {}

    def add(self, codec: KvqCodec, kv: KVCache) -> None:
        for layer in range(kv.num_layers):
            attention = kv.attention[layer] if kv.attention is not None else None
            for kind, x in enumerate((kv.keys[layer], kv.values[layer])):
                u = unit_space(codec, x.cpu(), layer, kind, kv.token_start(layer), attention)
                key = (layer, kind)
                moment = u @ u.transpose(1, 2)
                self.sums[key] = self.sums[key] + moment if key in self.sums else moment
                self.counts[key] = self.counts.get(key, 0) + u.shape[2]

    @classmethod
    def merged(cls, parts: list["Moments"]) -> "Moments":
        """The moments of every cache added to any of `parts`."""
        out = cls()
        for part in parts:
            for key, total in part.sums.items():
                out.sums[key] = out.sums[key] + total if key in out.sums else total.clone()
                out.counts[key] = out.counts.get(key, 0) + part.counts[key]
        return out

    def bases(self) -> Bases:
        """Per (layer, K/V): per head the eigenvectors of the second moment as orthonormal columns, by decreasing
        eigenvalue (the component's variance), each column's sign set so that its largest entry is positive
        (eigenvectors have no sign of their own: this makes the dictionary a function of the numbers)."""
        out: Bases = {}
        for key, total in self.sums.items():
            values, vectors = torch.linalg.eigh(total / max(self.counts[key], 1))
            values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
            rows = vectors.abs().argmax(dim=1, keepdim=True)  # (H, 1, D): per column the row of its largest entry
            sign = torch.gather(vectors, 1, rows).sign()
            vectors = vectors * torch.where(sign == 0, 1.0, sign)
            out[key] = (vectors.numpy(), values.numpy())
        return out


def learn_bases(lm: LoadedModel, profile: Profile, texts: list[tuple[str, str]], prefix: int = quality.PREFIX_TOKENS,
                progress=None) -> Bases:
    """The transform of `lm` under `profile`: each text's first `prefix` tokens prefilled (with the attention
    that sets the token weights), as calibration prefills them. One prefill per text: calibrate() gets the same
    from the caches it made anyway (Moments over its contexts)."""
    codec = codec_for(lm, profile)
    moments = Moments()
    for _, text in texts:
        moments.add(codec, quality.context(lm, inference.document_ids(lm, text), prefix)[0])
        if progress:
            progress()
    return moments.bases()


def to_dictionary(learned: Bases, model_identity: dict) -> dictionary.Dictionary | None:
    """The dictionary file holding the transform (codecs/transform.py: the bases as int16 matrices). Heads wider
    than the transform's MAX_DIM, whose exact inverse it does not guarantee, are left out (kvq codes those layers
    without a transform); None where that leaves nothing."""
    from ..codecs.transform import MAX_DIM, Transforms

    kept = {key: b for key, (b, _) in learned.items() if b.shape[-1] <= MAX_DIM}
    if not kept:
        return None
    payload = Transforms.from_bases(kept).pack()
    data = dictionary.build(payload, model_identity)
    return dictionary.parse(data, dictionary.sha_of(data), "the learned transform")
