"""Which cached tokens a document's own last queries attend to, measured during its prefill.

Per (layer, KV head, held token): the root mean square, over the last QUERIES positions of the prefill and the
query heads that share the KV head, of the attention weight the token receives. Few tokens carry most of the
attention (MiKV, KVCrush), and the queries that will read the cache next resemble the document's last ones, so
the lossy codec gives tokens that receive little attention coarser steps (docs/codec.md, "Token weights").

The weights are computed from the model's own queries by hooks on its attention modules while the prefill runs:
the last QUERIES hidden states are projected again and scored against the layer's keys as the cache holds them
(for a sliding-window layer, whose cache keeps only its last keys, the keys its window needs are projected
again too). A model whose attention modules lack what this needs (q_proj, layer_idx, rotate-half position
embeddings over the whole head passed as a keyword) gets no weights, and the codec uniform token steps: the
measurement is optional, so it never fails a prefill.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .models import LoadedModel, layer_windows

QUERIES = 256
SCORES = 1 << 18  # float32 scores at once (1 MiB, cache-sized: 1.4x faster than 64 MiB blocks): queries in blocks that fit


def _modules(lm: LoadedModel) -> list | None:
    layers = getattr(getattr(lm.model, "model", None), "layers", None)
    mods = [getattr(layer, "self_attn", None) for layer in layers] if layers is not None else []
    if not mods or any(m is None or not hasattr(m, "q_proj") or not hasattr(m, "k_proj")
                       or not hasattr(m, "layer_idx") or not hasattr(m, "scaling") for m in mods):
        return None
    return mods


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def _project(proj, norm, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int | None):
    """(heads, positions, dim) float32 after a projection, its norm if any, and RoPE."""
    x = proj(hidden).view(hidden.shape[0], -1 if heads is None else heads, cos.shape[-1])
    if norm is not None:
        x = norm(x)
    x = x.transpose(0, 1).float()
    return x * cos.float() + _rotate_half(x) * sin.float()


def _received(module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, n: int,
              window: int | None) -> torch.Tensor:
    """(kv_heads, held) RMS attention weight each held key receives from the queries of `hidden`, the last rows of
    the n positions; keys (kv_heads, held, dim) after RoPE, those of the last `held` positions."""
    kv_heads, held, _ = keys.shape
    nq = hidden.shape[0]
    q = _project(module.q_proj, getattr(module, "q_norm", None), hidden, cos, sin, None)  # (heads, nq, dim)
    group = q.shape[0] // kv_heads
    kpos = torch.arange(n - held, n, device=keys.device)[None, :]
    keys_t = keys.float().transpose(1, 2)  # once, not per block: a copy for half-precision models
    squares = torch.zeros(kv_heads, held, dtype=torch.float32, device=keys.device)
    step = max(1, SCORES // max(1, group * held))
    # Without a window every query sees all keys but the ones after it, among the last nq: only those columns
    # need a mask (and no query is left without a key, so no softmax of -inf everywhere).
    tail = 0 if window else max(0, held - nq)
    for start in range(0, nq, step):  # a softmax is per query, so blocks of queries add up exactly
        qpos = torch.arange(n - nq + start, n - nq + min(nq, start + step), device=keys.device)[:, None]
        hidden_mask = kpos[:, tail:] > qpos
        if window:
            hidden_mask |= qpos - kpos >= window
        for h in range(kv_heads):
            block = q[h * group : (h + 1) * group, start : start + step]
            scores = torch.matmul(block, keys_t[h]).mul_(module.scaling)
            scores[..., tail:].masked_fill_(hidden_mask, float("-inf"))
            weights = scores.softmax(-1)
            if window:
                weights.nan_to_num_(0.0)  # a query whose window holds no cached key
            squares[h] += weights.mul_(weights).sum(dim=(0, 1))
    return squares.div_(group * nq).sqrt_()


@contextmanager
def recording(lm: LoadedModel, lengths: list[int], start: int = 0):
    """Record the weights of a prefill of len(lengths) right-padded rows with these true lengths, run inside the
    block. Yields a list per row; after the block each holds (kv_heads, held) per layer (None for a layer that
    could not be measured), or None when there are no rows or the model cannot be measured. `start`: the prefill
    runs positions from there on after a cache of the ones before (it must run at least the last QUERIES)."""
    mods = _modules(lm) if lengths else None
    if mods is None:
        yield None
        return
    windows = layer_windows(lm)
    rows: list[list] = [[None] * len(mods) for _ in lengths]
    hooks = []

    def hook(module, args, kwargs, _output):
        try:
            measure(module, args, kwargs)
        except Exception:  # noqa: BLE001 - an optional measurement must never fail the prefill it watches
            for row in rows:
                row[module.layer_idx] = None

    def measure(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        embeddings = kwargs.get("position_embeddings")
        cache = next((kwargs[k] for k in ("past_key_values", "past_key_value", "cache") if kwargs.get(k) is not None),
                     None)  # the keyword differs between transformers versions
        if (hidden is None or cache is None or not isinstance(embeddings, tuple) or len(embeddings) != 2
                or module.layer_idx >= len(windows)):
            return
        cos, sin = embeddings
        layer = cache.layers[module.layer_idx]
        if cos.shape[-1] != layer.keys.shape[-1]:  # partial rotary: not measured
            return
        window = windows[module.layer_idx]
        for row, n in enumerate(lengths):
            lo = max(0, n - QUERIES)
            if lo < start:
                return
            pick = min(row, cos.shape[0] - 1)
            if layer.keys.shape[2] >= n:  # every position cached (batched prefills are right-padded)
                keys = layer.keys[row, :, :n]
            elif window and not start:  # a sliding window's cache: the keys its window needs, from the layer's own
                first = max(0, lo - window + 1)  # projection of hidden states only a prefill from 0 has
                keys = _project(module.k_proj, getattr(module, "k_norm", None), hidden[row, first:n],
                                cos[pick, first:n], sin[pick, first:n], layer.keys.shape[1])
            else:
                return
            rows[row][module.layer_idx] = _received(module, hidden[row, lo - start : n - start],
                                                    cos[pick, lo - start : n - start],
                                                    sin[pick, lo - start : n - start], keys, n, window)

    for m in mods:
        hooks.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        yield rows
    finally:
        for h in hooks:
            h.remove()


def held(rows_of_doc: list | None, kv_keys: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """One document's weights cut to the tokens each layer's cache holds (a sliding window keeps the last ones),
    on the CPU; None if any layer was not measured."""
    if rows_of_doc is None or len(rows_of_doc) != len(kv_keys):
        return None
    out = []
    for a, keys in zip(rows_of_doc, kv_keys):
        kept = keys.shape[1]
        if a is None or a.shape != (keys.shape[0], a.shape[1]) or a.shape[1] < kept:
            return None
        out.append(a[:, a.shape[1] - kept :].cpu())
    return out
