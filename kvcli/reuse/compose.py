"""Several document caches joined into one context, as if the documents had been concatenated, and the
selective recomputation that recovers part of the cross-document attention their separate prefills never saw.

The recomputation follows CacheBlend (Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with
Cached Knowledge Fusion", EuroSys 2025); docs/compose.md states the criterion and its limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError, ModelMismatchError, UsageError
from ..modeling import inference
from ..modeling.kvcache import KVCache
from ..container.format import LayerShape
from ..modeling.models import LoadedModel, cache_argument, expected_layers
from ..modeling.rope import inv_freq_per_layer, shift_keys

# Architectures whose every layer applies rotate-half RoPE to the whole key (the layout shift_keys undoes) and
# whose decoder layers recompute() drives directly; each one is exercised by tests/test_compose.py.
COMPOSABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
# Rope types whose frequencies do not depend on the context length, so a rotation by an offset is exact.
# "dynamic" and "longrope" change frequencies with the sequence length and are refused.
SHIFTABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# CacheBlend's default: layer 0 is recomputed for every token, layer 1 picks the tokens to recompute from there on.
CHECK_LAYER = 1
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # those that honour an explicit additive mask


@dataclass(frozen=True)
class Piece:
    """Where one cache lands in the composed context."""

    skip: int  # leading tokens of the cache left out: a repeated BOS
    shift: int  # composed position minus the position in its own cache, for every token kept


@dataclass(frozen=True)
class Plan:
    """A composition, decided from the caches' tokens before any is decoded: what compose_caches carries out."""

    pieces: list[Piece]  # per cache, in order
    token_ids: list[int]  # the composed context
    freqs: list[torch.Tensor]  # per layer, the inverse frequencies that move keys (rope_frequencies)
    layers: list[LayerShape]  # the composed context's layout, as the model's own prefill of it leaves it


@dataclass
class Blend:
    kv: KVCache
    recomputed: list[int]  # composed positions whose K and V were recomputed from CHECK_LAYER on


def rope_frequencies(lm: LoadedModel) -> list[torch.Tensor]:
    """Per layer, the float32 inverse frequencies that place keys; refuses models whose keys cannot be moved."""
    config = lm.model.config.get_text_config(decoder=True)
    freqs = inv_freq_per_layer(lm.model)
    if freqs is None:
        raise ModelMismatchError(f"{lm.name}: no rotary position embedding (RoPE), so cached keys cannot be moved "
                                 "to new positions; compose caches only for RoPE models")
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_type = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    for p in per_type:
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in SHIFTABLE_ROPE_TYPES:
            raise ModelMismatchError(f"{lm.name}: rope scaling {kind!r} ties rotary frequencies to the context length, "
                                     "so cached keys cannot be moved exactly; composition handles "
                                     f"{', '.join(SHIFTABLE_ROPE_TYPES)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for i, f in enumerate(freqs):
        if f is None or 2 * len(f) != head_dim:
            rotated = 0 if f is None else 2 * len(f)
            raise ModelMismatchError(f"{lm.name}: layer {i} rotates {rotated} of {head_dim} key dimensions (partial "
                                     "rotary), which composition does not handle")
    check_architecture(lm)
    return [torch.from_numpy(f) for f in freqs]


def check_architecture(lm: LoadedModel) -> None:
    kind = lm.model.config.get_text_config(decoder=True).model_type
    if kind not in COMPOSABLE_MODEL_TYPES:
        raise ModelMismatchError(f"{lm.name}: composing caches is supported for {', '.join(COMPOSABLE_MODEL_TYPES)} "
                                 f"models, whose RoPE layout it knows; this is a {kind} model")


def leading_bos(lm: LoadedModel) -> int | None:
    """The token the tokenizer puts in front of every document, if it puts one."""
    bos = lm.tokenizer.bos_token_id
    return bos if bos is not None and inference.document_ids(lm, "a")[:1] == [bos] else None


def plan_composition(lm: LoadedModel, token_ids: list[list[int]], names: list[str]) -> Plan:
    """Where each cache goes and the composed tokens, refused when the model's keys cannot be moved
    (rope_frequencies) or the tokens cannot fit its context.

    Every document after the first loses its leading BOS (when the tokenizer adds one), with that BOS's K and V:
    the composed tokens are those of the documents' token sequences concatenated with one BOS in front, which is
    also what the reference prefill sees.
    """
    freqs = rope_frequencies(lm)
    bos = leading_bos(lm)
    pieces, ids = [], []
    for j, (doc, name) in enumerate(zip(token_ids, names)):
        skip = 1 if j > 0 and bos is not None and doc[:1] == [bos] else 0
        if skip >= len(doc):
            raise InputError(f"{name}: holds only a BOS token; nothing to compose")
        pieces.append(Piece(skip, len(ids) - skip))
        ids.extend(doc[skip:])
    inference.check_length(lm, len(ids), f"the context composed of {len(token_ids)} caches")
    return Plan(pieces, ids, freqs, expected_layers(lm, len(ids)))


def compose_caches(lm: LoadedModel, caches: list[KVCache], names: list[str], plan: Plan | None = None) -> KVCache:
    """One cache for the documents of `caches` in order, keys moved to their composed positions: by `plan`, the
    plan_composition of these caches' tokens (made here when not given).

    Sliding-window layers keep the last window - 1 composed tokens, as the model's own prefill would; the caches
    hold enough of them, since each keeps its own last window - 1 (or all of its tokens).
    """
    if len(caches) == 1:
        return caches[0]
    plan = plan or plan_composition(lm, [c.token_ids for c in caches], names)
    ids = plan.token_ids
    if len(plan.pieces) != len(caches) or ids != [t for c, p in zip(caches, plan.pieces) for t in c.token_ids[p.skip:]]:
        raise ValueError("the plan was made for other caches than these")
    keys, values = [], []
    for i, layer in enumerate(plan.layers):
        k_parts, v_parts = [], []
        for cache, piece in zip(caches, plan.pieces):
            drop = max(0, piece.skip - cache.token_start(i))
            k_parts.append(shift_keys(cache.keys[i][:, drop:], plan.freqs[i], piece.shift))
            v_parts.append(cache.values[i][:, drop:])
        held = len(ids) - layer.token_start
        keys.append(torch.cat(k_parts, dim=1)[:, -held:].contiguous())
        values.append(torch.cat(v_parts, dim=1)[:, -held:].contiguous())
    return KVCache(ids, keys, values)


class _ScatterCache:
    """What a decoder layer's attention sees as its cache during recomputation: the rows being recomputed are
    written at their positions in the composed cache, and attention gets the whole, partly updated, layer."""

    def __init__(self, kv: KVCache, device: torch.device):
        self.keys = [k.unsqueeze(0).to(device, copy=True) for k in kv.keys]
        self.values = [v.unsqueeze(0).to(device, copy=True) for v in kv.values]
        self.rows = torch.arange(kv.num_tokens, device=device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.rows, key_states)
        self.values[layer_idx].index_copy_(2, self.rows, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def to_kv(self, token_ids: list[int]) -> KVCache:
        return KVCache(list(token_ids), [k[0] for k in self.keys], [v[0] for v in self.values])


def check_recomputable(lm: LoadedModel) -> None:
    from transformers import DynamicCache

    check_architecture(lm)
    if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=lm.model.config).layers):
        raise UsageError(f"--recompute-fraction: {lm.name} has sliding-window layers, whose cache keeps only the "
                         "last tokens that recomputation would need for every token; compose without it")
    impl = lm.model.config._attn_implementation
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise UsageError(f"--recompute-fraction needs {' or '.join(ATTENTION_IMPLEMENTATIONS)} attention, not {impl}")


def key_deviation(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cached: torch.Tensor) -> torch.Tensor:
    """Per token, the squared L2 distance between its fresh keys at `layer` and its cached keys, summed over the
    key-value heads: (tokens,). hidden (1, tokens, hidden_size), cached (1, kv_heads, tokens, head_dim)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    k = attn.k_proj(x).view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2)
    half = k.shape[-1] // 2
    turned = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    fresh = k * cos.unsqueeze(1) + turned * sin.unsqueeze(1)
    return (fresh.float() - cached.float()).pow(2).sum(dim=(0, 1, 3))


def causal_mask(rows: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, rows, tokens) additive mask: each row attends to the composed positions up to its own."""
    allowed = torch.arange(tokens, device=rows.device)[None, :] <= rows[:, None]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


@torch.inference_mode()
def recompute_tokens(lm: LoadedModel, kv: KVCache, fraction: float, check_layer: int = CHECK_LAYER) -> Blend:
    """CacheBlend's selective recomputation of a composed cache.

    Layers below `check_layer` are recomputed for every token. At `check_layer` the fresh keys of every token are
    compared with the composed ones, and the ceil(fraction * tokens) tokens that deviate most are recomputed
    through the remaining layers at their composed positions, attending to the whole cache; every other token
    keeps its cached K and V there. fraction 0 returns `kv` untouched; fraction 1 is a full prefill.
    """
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"--recompute-fraction must be between 0 and 1, not {fraction}")
    if fraction == 0.0:
        return Blend(kv, [])
    check_recomputable(lm)
    base = lm.model.model
    device = next(lm.model.parameters()).device
    n = kv.num_tokens
    cache = _ScatterCache(kv, device)
    arg = cache_argument(base)
    hidden = base.embed_tokens(torch.tensor([kv.token_ids], device=device))

    def run(layer, hidden):
        rows = cache.rows
        out = layer(hidden, attention_mask=causal_mask(rows, n, hidden.dtype), position_ids=rows[None],
                    position_embeddings=base.rotary_emb(hidden, position_ids=rows[None]), use_cache=True,
                    **{arg: cache})
        return out[0] if isinstance(out, tuple) else out

    layers = base.layers
    for layer in layers[:check_layer]:
        hidden = run(layer, hidden)
    cos, sin = base.rotary_emb(hidden, position_ids=cache.rows[None])
    deviation = key_deviation(layers[check_layer], hidden, cos, sin, cache.keys[check_layer])
    chosen = deviation.topk(min(n, math.ceil(fraction * n))).indices.sort().values
    cache.rows = chosen
    hidden = hidden[:, chosen]
    for layer in layers[check_layer:]:
        hidden = run(layer, hidden)
    return Blend(cache.to_kv(kv.token_ids), chosen.tolist())
