"""`kvcli calibrate`: measure where a model is sensitive to cache loss, once, and keep it as a profile.

Two measurements on calibration text (docs/codec.md, "Calibration"):
- key channel weights: the mean squared pre-RoPE query per channel, averaged over the query heads that share
  a KV head and over both channels of a rotary pair. A key error in channel c moves attention scores by
  q_c * error, so the codec gives channel c a step proportional to weight ** -1/2.
- sensitivity per (layer, K/V, head): the KL divergence of the continuation when only that head of that
  layer's K or V is quantized coarsely (step = the head's RMS). Steps are then set proportional to
  sensitivity ** -1/2, which equalizes each place's marginal cost in KL per bit.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from . import inference, quality
from .codecs import KvqCodec, Profile
from .kvcache import KVCache
from .models import LoadedModel
from .rope import inv_freq_per_layer

COARSE_SCALE = 1.0


def default_texts() -> list[tuple[str, str]]:
    folder = resources.files("kvcli") / "data"
    return [(e.name, e.read_text()) for e in sorted(folder.iterdir(), key=lambda e: e.name)
            if e.name.startswith("calibration-") and e.name.endswith(".txt")]


def _attention_modules(lm: LoadedModel) -> list:
    layers = getattr(getattr(lm.model, "model", None), "layers", None)
    if layers is None:
        return []
    return [getattr(layer, "self_attn", None) for layer in layers]


@torch.inference_mode()
def key_weights(lm: LoadedModel, ids: list[int]) -> list[np.ndarray] | None:
    """Per layer (kv_heads, head_dim) mean squared query, or None if the model's queries cannot be reached."""
    cfg = lm.model.config.get_text_config(decoder=True)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    modules = _attention_modules(lm)
    if not modules or any(m is None or not hasattr(m, "q_proj") for m in modules):
        return None
    captured: list[torch.Tensor] = [None] * len(modules)
    hooks = []
    for i, attn in enumerate(modules):
        # Queries after their norm where the model has one (Gemma 3, Qwen 3): that is what meets the keys.
        target = getattr(attn, "q_norm", None) or attn.q_proj

        def hook(_mod, _inp, out, i=i):
            captured[i] = out.detach().float().reshape(-1, heads, dim).pow(2).mean(0)

        hooks.append(target.register_forward_hook(hook))
    try:
        inference.prefill(lm, ids)
    finally:
        for h in hooks:
            h.remove()
    weights = []
    for m2 in captured:
        per_kv = m2.reshape(kv_heads, heads // kv_heads, dim).mean(1)
        half = dim // 2
        pair = (per_kv[:, :half] + per_kv[:, half:]) / 2
        weights.append(torch.cat([pair, pair], -1).numpy().astype(np.float64))
    return weights


@torch.inference_mode()
def sensitivity(lm: LoadedModel, ref: quality.Reference, probe: KvqCodec, progress=None) -> np.ndarray:
    """(layers, 2, kv_heads): KL of the continuation with one head of one layer's K or V coarsely quantized."""
    kv = ref.kv
    heads = kv.keys[0].shape[0]
    out = np.zeros((kv.num_layers, 2, heads))
    for layer in range(kv.num_layers):
        for kind in range(2):
            exact = (kv.keys if kind == 0 else kv.values)[layer]
            coarse = probe.roundtrip(exact, layer, kind, kv.token_start(layer))
            for head in range(heads):
                keys, values = list(kv.keys), list(kv.values)
                target = keys if kind == 0 else values
                mixed = exact.clone()
                mixed[head] = coarse[head]
                target[layer] = mixed
                out[layer, kind, head] = max(quality.compare(lm, ref, KVCache(kv.token_ids, keys, values)).kl, 0.0)
                if progress:
                    progress()
    return out


def calibrate(lm: LoadedModel, texts: list[tuple[str, str]], prefix: int = quality.PREFIX_TOKENS,
              progress=None) -> tuple[Profile, dict]:
    docs = [inference.document_ids(lm, text) for _, text in texts]
    weights = None
    per_doc = []
    for ids in docs:
        ref = quality.reference(lm, ids, prefix)
        w = key_weights(lm, ref.kv.token_ids)
        weights = w if weights is None else [a + b for a, b in zip(weights, w)] if w else None
        probe = KvqCodec(COARSE_SCALE, profile=Profile("probe", np.ones((ref.kv.num_layers, 2)), w),
                         inv_freq=inv_freq_per_layer(lm.model))
        per_doc.append(sensitivity(lm, ref, probe, progress))
    if weights is not None:
        weights = [w / len(docs) for w in weights]
    profile = Profile(f"{lm.name}", np.mean(per_doc, axis=0), weights)
    details = {"texts": [name for name, _ in texts], "prefix_tokens": prefix,
               "continuation_tokens": quality.CONTINUATION_TOKENS, "coarse_scale": COARSE_SCALE}
    return profile, details
