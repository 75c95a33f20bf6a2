"""The quality protocol shared by calibration and the benchmarks: teacher-forced continuation after a prefix.

A prefix of a document is the cached context; the tokens after it are fed with the exact cache and with a
decoded one, and their next-token distributions are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling import inference
from ..modeling.kvcache import KVCache
from ..modeling.models import LoadedModel

PREFIX_TOKENS = 2048
CONTINUATION_TOKENS = 128


def decoded_as(kv: KVCache, codec) -> KVCache:
    """Every layer's K and V as a file of kvq `codec` decodes them, with the token weights that encoding derives
    from kv.attention (KvqCodec.fit's per-layer fit), without entropy coding."""
    out: tuple[list, list] = ([], [])
    for layer in range(kv.num_layers):
        attention = kv.attention[layer] if kv.attention is not None else None
        for kind, x in enumerate((kv.keys[layer], kv.values[layer])):
            out[kind].append(codec.roundtrip(x, layer, kind, kv.token_start(layer), attention))
    return KVCache(kv.token_ids, *out)


@dataclass
class Reference:
    kv: KVCache  # exact cache of the prefix
    feed: list[int]  # continuation tokens fed after the prefix
    targets: torch.Tensor  # the token each fed position should predict
    logits: torch.Tensor  # float32 logits with the exact cache


Context = tuple[KVCache, list[int], torch.Tensor]  # the prefix's cache, the tokens fed after it, their targets


def context(lm: LoadedModel, ids: list[int], prefix: int = PREFIX_TOKENS,
            continuation: int = CONTINUATION_TOKENS) -> Context:
    """Exact cache of ids[:prefix] (with the attention its tokens receive, which lossy encoding weighs them by),
    the next `continuation` tokens to feed after it and the token each should predict."""
    limit = lm.max_tokens() or len(ids)
    prefix = min(prefix, len(ids) - continuation - 1, limit - continuation)
    if prefix < 16:
        raise ValueError(f"document of {len(ids)} tokens is too short for a {continuation}-token continuation")
    kv = inference.prefill(lm, ids[:prefix], attention=True)
    return kv, ids[prefix : prefix + continuation], torch.tensor(ids[prefix + 1 : prefix + continuation + 1])


def reference(lm: LoadedModel, ids: list[int], prefix: int = PREFIX_TOKENS,
              continuation: int = CONTINUATION_TOKENS) -> Reference:
    """Exact cache of ids[:prefix] and the logits of the next `continuation` positions."""
    kv, feed, targets = context(lm, ids, prefix, continuation)
    return Reference(kv, feed, targets, inference.logits_after(lm, kv, feed).float())


@dataclass
class Agreement:
    top1: float  # fraction of positions whose argmax matches the exact cache's
    dnll: float  # mean NLL difference (decoded minus exact), nats
    kl: float  # mean KL(exact || decoded), nats


def compare(lm: LoadedModel, ref: Reference, kv: KVCache) -> Agreement:
    logits = inference.logits_after(lm, kv, ref.feed).float()
    top1 = (logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    nll = F.cross_entropy(logits, ref.targets, reduction="none") - F.cross_entropy(ref.logits, ref.targets, reduction="none")
    kl = F.kl_div(logits.log_softmax(-1), ref.logits.log_softmax(-1), log_target=True, reduction="batchmean")
    return Agreement(top1, nll.mean().item(), kl.item())


def greedy_continuation(lm: LoadedModel, ref: Reference, kv: KVCache, tokens: int = 64) -> list[int]:
    """`tokens` greedy tokens after the prefix, starting from the first continuation token."""
    return inference.greedy_tokens(lm, kv, ref.feed[:1], tokens)


def first_divergence(exact: list[int], other: list[int]) -> int:
    """Index of the first position where two greedy continuations differ; their length if they never do."""
    return next((i for i, (a, b) in enumerate(zip(exact, other)) if a != b), min(len(exact), len(other)))
