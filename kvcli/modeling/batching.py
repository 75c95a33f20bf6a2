"""Several short documents in one forward pass, each leaving the cache it would leave alone.

Documents are right-padded to the longest. Causal attention never lets a real token see a later position, so
pads after a document change nothing it computes and need no attention mask; position ids count from 0 for
every row, as they do for a document prefilled alone. Only the padded keys and values are cut off afterwards,
and sliding-window layers keep each document's own last window - 1 tokens.
"""

from __future__ import annotations

import torch

from . import importance, inference
from .kvcache import KVCache
from .models import LoadedModel, cache_argument, layer_windows, logits_argument

# RoPE variants whose rotation depends on the length of the sequence passed in: a padded batch would rotate a
# short document as if it were as long as the batch, so such models prefill one document at a time.
LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def rope_types(config) -> set[str]:
    """Every rope_type named in the config's rotary settings (per layer type where the model has several)."""
    found: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, dict):
            kind = node.get("rope_type", node.get("type"))
            if isinstance(kind, str):
                found.add(kind)
            for value in node.values():
                visit(value)

    text = config.get_text_config(decoder=True)
    visit(getattr(text, "rope_parameters", None))
    visit(getattr(text, "rope_scaling", None))
    return found


def batchable(lm: LoadedModel) -> bool:
    return not rope_types(lm.model.config) & LENGTH_DEPENDENT_ROPE


@torch.inference_mode()
def prefill_batch(lm: LoadedModel, docs: list[list[int]], windows: list[int | None] | None = None,
                  attention: bool = False) -> list[KVCache]:
    """One forward pass over `docs`; the i-th cache equals inference.prefill(lm, docs[i], attention) up to float
    rounding."""
    from transformers import DynamicCache

    if len(docs) == 1:
        return [inference.prefill(lm, docs[0], attention)]
    for ids in docs:
        inference.check_length(lm, len(ids), "the document")
    windows = layer_windows(lm) if windows is None else windows
    width = max(len(ids) for ids in docs)
    device = next(lm.model.parameters()).device
    # Any valid id serves as a pad: no real token attends to it.
    inputs = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in docs], dtype=torch.long, device=device)
    # Full-attention layers everywhere, so each document's sliding window can be cut from its own tokens below.
    cache = DynamicCache()
    with importance.recording(lm, [len(ids) for ids in docs] if attention else []) as rows:
        lm.model(input_ids=inputs, use_cache=True, **{cache_argument(lm.model): cache}, **logits_argument(lm.model, True))
    if len(cache.layers) != len(windows):
        raise RuntimeError(f"the model filled {len(cache.layers)} cache layers, its config names {len(windows)}")
    out = []
    for row, ids in enumerate(docs):
        n = len(ids)
        keys, values = [], []
        for layer, window in zip(cache.layers, windows):
            start = n - min(n, window - 1) if window else 0
            keys.append(layer.keys[row, :, start:n].clone())
            values.append(layer.values[row, :, start:n].clone())
        kv = KVCache(list(ids), keys, values)
        if attention:
            kv.attention = importance.held(rows[row] if rows else None, keys)
        out.append(kv)
    return out


def plan_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of documents grouped so that each group's padded size (count x longest) stays within `budget`
    tokens. Documents are taken in order of length, which keeps padding small; a document longer than the
    budget goes alone. A budget below 2 documents' worth means one document per pass."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
