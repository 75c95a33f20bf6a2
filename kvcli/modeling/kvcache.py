"""The decoded KV cache in memory, and its passage to and from transformers cache objects."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError, ModelMismatchError


@dataclass
class KVCache:
    """Per layer: keys (kv_heads, held, key_dim) and values (kv_heads, held, value_dim), as the model holds them.

    `held` is the number of trailing tokens the layer keeps: all of them for full attention, the last
    window-1 for a sliding-window layer. token_starts[i] = num_tokens - held.
    """

    token_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    # Per layer (kv_heads, held) attention each token received from the prefill's last queries (kvcli/modeling/importance.py);
    # None when not measured (a cache decoded from a file or imported). Lossy codecs use it, nothing else does.
    attention: list[torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def token_start(self, layer: int) -> int:
        return self.num_tokens - self.keys[layer].shape[1]


def from_model_cache(cache, token_ids: list[int]) -> KVCache:
    """Copy the tensors out of a transformers cache after prefill of `token_ids` (batch size 1)."""
    keys, values = [], []
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        if k is None or k.dim() != 4 or k.shape[0] != 1:
            raise ModelMismatchError(f"layer {i}: unsupported cache layout {type(layer).__name__}")
        keys.append(k[0].detach().contiguous())
        values.append(v[0].detach().contiguous())
    return KVCache(list(token_ids), keys, values)


def to_model_cache(kv: KVCache, model):
    """A DynamicCache holding `kv`, laid out the way the model's own prefill would have left it."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if len(cache.layers) != kv.num_layers:
        raise ModelMismatchError(f"the cache has {kv.num_layers} layers, the model {len(cache.layers)}")
    device = next(model.parameters()).device
    for i, layer in enumerate(cache.layers):
        k = kv.keys[i].unsqueeze(0).to(device)
        v = kv.values[i].unsqueeze(0).to(device)
        sliding = getattr(layer, "is_sliding", False)
        if kv.token_start(i) > 0 and not sliding:
            raise ModelMismatchError(f"layer {i} holds a sliding window in the cache but full attention in the model")
        layer.update(k, v)
        if sliding:
            # update() counted only the tokens we handed over; the layer has seen the whole document.
            layer.cumulative_length = kv.num_tokens
    return cache


def to_tensor_dict(kv: KVCache) -> dict[str, torch.Tensor]:
    out = {"input_ids": torch.tensor(kv.token_ids, dtype=torch.int64)}
    for i in range(kv.num_layers):
        out[f"keys.{i}"] = kv.keys[i].contiguous()
        out[f"values.{i}"] = kv.values[i].contiguous()
    return out


def from_tensor_dict(tensors: dict[str, torch.Tensor], where: str) -> KVCache:
    if "input_ids" not in tensors:
        raise FormatError(f"{where}: no tensor named input_ids")
    ids = tensors["input_ids"]
    if ids.dim() != 1 or ids.dtype != torch.int64 or ids.numel() == 0:
        raise FormatError(f"{where}: input_ids must be a non-empty int64 vector")
    n = ids.numel()
    layers = sum(1 for name in tensors if name.startswith("keys."))
    keys, values = [], []
    for i in range(layers):
        if f"keys.{i}" not in tensors or f"values.{i}" not in tensors:
            raise FormatError(f"{where}: layer {i} needs both keys.{i} and values.{i}")
        k, v = tensors[f"keys.{i}"], tensors[f"values.{i}"]
        if k.dim() != 3 or v.dim() != 3 or k.shape[:2] != v.shape[:2] or not 1 <= k.shape[1] <= n:
            raise FormatError(f"{where}: layer {i} has shapes {tuple(k.shape)} and {tuple(v.shape)}, "
                              f"expected (kv_heads, tokens<= {n}, head_dim) for both")
        if k.dtype != v.dtype or k.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FormatError(f"{where}: layer {i} dtype must be float32, float16 or bfloat16 for K and V alike")
        keys.append(k.contiguous())
        values.append(v.contiguous())
    if not keys:
        raise FormatError(f"{where}: no keys.0 tensor")
    if len({k.dtype for k in keys}) != 1:
        raise FormatError(f"{where}: layers have different dtypes")
    return KVCache(ids.tolist(), keys, values)
