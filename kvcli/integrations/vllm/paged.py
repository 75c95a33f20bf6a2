"""Where vLLM's paged KV tensors keep each token's key and value, per attention backend.

vLLM 0.32 hands every attention layer one logical view (blocks, kv_heads, block_size, key_dim + value_dim),
whatever the physical order (its KVCacheLayout: [B, H, N, C], [B, N, H, C], ...); indexing that view is correct
for every physical order. What differs between backends is how they read the content axis:
- "split" (FLASH_ATTN, FLASHINFER, TRITON_ATTN): per token, the first key_dim elements are the key and the
  rest the value: `kv.transpose(1, 2).split(key_dim, dim=-1)` gives (B, N, H, D) keys and values;
- "cpu" (CPU_ATTN with its AVX-512 kernels, ISA "vec"): per (block, head), the block's N * (key_dim + value_dim)
  contiguous elements hold the keys first, dimension-major (D, N): element d of token t at d * N + t, then the
  values token-major (N, D) (`kv.view(B, H, 2N, D).chunk(2, dim=2)` splits the halves). Measured: a key read
  token-major disagreed with transformers' (relative error 1.4) while the values agreed to 4e-7; read as (D, N)
  the keys agreed to 3e-7. The CPU backend's other kernels (amx, vec16, neon...) may lay keys out otherwise and
  are refused (cpu_isa_supported).

Token t of a request sits in slot block_ids[t // manager_block] * manager_block + t % manager_block; a kernel
block size smaller than the manager's (vLLM splits each manager block into equal kernel blocks) is the view's
block axis, so a slot is found as (slot // N, slot % N) with N the view's block axis length.
"""

from __future__ import annotations

import torch

# vLLM's backend names (AttentionBackend.get_name()) and how each reads the content axis.
BACKEND_LAYOUTS = {"CPU_ATTN": "cpu", "FLASH_ATTN": "split", "FLASHINFER": "split", "TRITON_ATTN": "split"}
LAYOUTS = ("cpu", "split")


class LayoutError(ValueError):
    """A paged tensor this module cannot address (an unknown backend, a shape that does not fit the model)."""


CPU_ISAS = ("vec",)  # the CPU kernels whose key layout is the one above (measured)


def layout_of(backend_name: str) -> str:
    try:
        return BACKEND_LAYOUTS[backend_name]
    except KeyError:
        raise LayoutError(f"attention backend {backend_name} is not supported by the kvcli connector "
                          f"(supported: {', '.join(sorted(BACKEND_LAYOUTS))})") from None


def slots(block_ids: list[int], manager_block: int, start: int, end: int, kernel_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel block index, offset) of tokens [start, end) of a request whose manager blocks are block_ids."""
    if not 0 <= start <= end <= len(block_ids) * manager_block:
        raise LayoutError(f"tokens [{start}, {end}) do not fit {len(block_ids)} blocks of {manager_block}")
    if manager_block % kernel_block:
        raise LayoutError(f"kernel block {kernel_block} does not divide the block size {manager_block}")
    t = torch.arange(start, end)
    ids = torch.tensor(block_ids, dtype=torch.int64)
    slot = ids[t // manager_block] * manager_block + t % manager_block
    return slot // kernel_block, slot % kernel_block


def check_shape(kv_layer: torch.Tensor, kv_heads: int, key_dim: int, value_dim: int) -> None:
    if kv_layer.dim() != 4 or kv_layer.shape[1] != kv_heads or kv_layer.shape[3] != key_dim + value_dim:
        raise LayoutError(f"a paged layer of shape {tuple(kv_layer.shape)} cannot hold {kv_heads} heads of key "
                          f"width {key_dim} and value width {value_dim}")


def _halves(kv_layer: torch.Tensor, layout: str, key_dim: int, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, key_dim) and (B, H, N, value_dim) views of the layer's keys and values."""
    if layout == "split":
        return kv_layer[..., :key_dim], kv_layer[..., key_dim:]
    if layout == "cpu":
        if key_dim != value_dim:
            raise LayoutError("the CPU backend keeps keys and values of one width")
        blocks, heads, n, _ = kv_layer.shape
        rows = kv_layer.view(blocks, heads, 2 * n, key_dim)  # a view: writes land in the paged tensor
        keys = rows[:, :, :n].view(blocks, heads, key_dim, n).transpose(2, 3)  # stored (D, N), seen as (N, D)
        return keys, rows[:, :, n:]
    raise LayoutError(f"unknown paged layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def read_tokens(kv_layer: torch.Tensor, layout: str, where: tuple[torch.Tensor, torch.Tensor], key_dim: int,
                value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the keys (heads, tokens, key_dim) and values (heads, tokens, value_dim) at `where` (slots())."""
    keys, values = _halves(kv_layer, layout, key_dim, value_dim)
    blocks, offsets = (w.to(kv_layer.device) for w in where)
    # Advanced indices on axes 0 and 2 around a slice put the token axis first: (tokens, heads, dim).
    return keys[blocks, :, offsets].transpose(0, 1).contiguous(), values[blocks, :, offsets].transpose(0, 1).contiguous()


def write_tokens(kv_layer: torch.Tensor, layout: str, where: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor,
                 values: torch.Tensor) -> None:
    """Keys (heads, tokens, key_dim) and values (heads, tokens, value_dim) into the paged layer at `where`."""
    key_view, value_view = _halves(kv_layer, layout, keys.shape[-1], values.shape[-1])
    blocks, offsets = (w.to(kv_layer.device) for w in where)
    key_view[blocks, :, offsets] = keys.transpose(0, 1).to(kv_layer.device, kv_layer.dtype)
    value_view[blocks, :, offsets] = values.transpose(0, 1).to(kv_layer.device, kv_layer.dtype)
