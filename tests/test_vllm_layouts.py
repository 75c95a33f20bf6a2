"""The connector's paged-KV addressing against the layouts vLLM 0.32 documents for its attention backends, on
synthetic paged tensors (no vLLM needed): what the connector writes is what each backend's own reading finds.

- every backend sees one logical (blocks, kv_heads, block_size, key_dim + value_dim) view per layer, over one of
  several physical orders (KVCacheLayout: LBHNC is [B, H, N, C] in memory, LBNHC is [B, N, H, C]);
- FLASH_ATTN reads `kv.transpose(1, 2).split(D, dim=-1)`: (B, N, H, D) keys and values;
- FLASHINFER permutes to the physical order (`kv.permute(*layout.layer_view_order)`) and splits the last axis;
- CPU_ATTN (AVX-512 "vec" kernels) splits `kv.view(B, H, 2N, D).chunk(2, dim=2)`: each (block, head) holds its
  keys dimension-major, (D, N), then its values token-major, (N, D) (found by comparing a vLLM-saved cache with
  transformers' keys, see kvcli/integrations/vllm/paged.py).
"""

from __future__ import annotations

import pytest
import torch

from kvcli.integrations.vllm import paged

BLOCKS, HEADS, N, D = 6, 3, 16, 8


def logical_view(physical: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed backing tensor in `physical` memory order and the logical (B, H, N, 2D) view vLLM hands a layer."""
    if physical == "LBHNC":
        raw = torch.zeros(BLOCKS, HEADS, N, 2 * D)
        return raw, raw
    raw = torch.zeros(BLOCKS, N, HEADS, 2 * D)  # LBNHC
    return raw, raw.permute(0, 2, 1, 3)


def flash_attn_reads(kv: torch.Tensor, slot: int):
    keys, values = kv.transpose(1, 2).split(D, dim=-1)  # (B, N, H, D)
    return keys[slot // N, slot % N], values[slot // N, slot % N]


def flashinfer_reads(kv: torch.Tensor, slot: int, physical: str):
    order = (0, 1, 2, 3) if physical == "LBHNC" else (0, 2, 1, 3)  # KVCacheLayout.layer_view_order
    keys, values = kv.permute(*order).split(D, dim=-1)
    if physical == "LBHNC":
        return keys[slot // N, :, slot % N], values[slot // N, :, slot % N]
    return keys[slot // N, slot % N], values[slot // N, slot % N]


def cpu_reads(kv: torch.Tensor, slot: int):
    keys, values = kv.view(BLOCKS, HEADS, 2 * N, D).chunk(2, dim=2)
    block, offset = slot // N, slot % N
    return keys[block].reshape(HEADS, D, N)[:, :, offset], values[block, :, offset]


def request(tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(HEADS, tokens, D, generator=gen), torch.randn(HEADS, tokens, D, generator=gen)


BLOCK_IDS = [4, 1, 5]  # a request's blocks, out of order as vLLM hands them out


@pytest.mark.parametrize("backend, physical", [("FLASH_ATTN", "LBNHC"), ("FLASH_ATTN", "LBHNC"),
                                               ("FLASHINFER", "LBHNC"), ("FLASHINFER", "LBNHC"),
                                               ("CPU_ATTN", "LBHNC")])
def test_written_tokens_are_where_the_backend_reads_them(backend, physical):
    raw, kv = logical_view(physical)
    layout = paged.layout_of(backend)
    start, end = 5, 40
    keys, values = request(end)
    where = paged.slots(BLOCK_IDS, N, start, end, N)
    paged.write_tokens(kv, layout, where, keys[:, start:end], values[:, start:end])
    for t in range(start, end):
        slot = BLOCK_IDS[t // N] * N + t % N
        if backend == "FLASH_ATTN":
            k, v = flash_attn_reads(kv, slot)
        elif backend == "FLASHINFER":
            k, v = flashinfer_reads(kv, slot, physical)
        else:
            k, v = cpu_reads(kv, slot)
        assert torch.equal(k, keys[:, t]) and torch.equal(v, values[:, t]), t
    # nothing else was touched: exactly the written elements are non-zero
    assert int((raw != 0).sum()) == 2 * (end - start) * HEADS * D
    got_k, got_v = paged.read_tokens(kv, layout, where, D, D)
    assert torch.equal(got_k, keys[:, start:end]) and torch.equal(got_v, values[:, start:end])


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "CPU_ATTN"])
def test_kernel_blocks_smaller_than_the_manager_block(backend):
    """vLLM may split each manager block into equal kernel blocks: the view's block axis is then the kernel one."""
    raw, kv = logical_view("LBHNC")  # 6 kernel blocks of 16 = 3 manager blocks of 32
    layout = paged.layout_of(backend)
    keys, values = request(60, seed=1)
    where = paged.slots([2, 0], 32, 0, 60, N)
    paged.write_tokens(kv, layout, where, keys, values)
    for t in range(60):
        slot = [2, 0][t // 32] * 32 + t % 32  # manager slot; kernel block slot // 16, offset slot % 16
        k, v = flash_attn_reads(kv, slot) if backend == "FLASH_ATTN" else cpu_reads(kv, slot)
        assert torch.equal(k, keys[:, t]) and torch.equal(v, values[:, t]), t


def test_refusals():
    with pytest.raises(paged.LayoutError, match="not supported"):
        paged.layout_of("FLEX_ATTENTION")
    with pytest.raises(paged.LayoutError, match="do not fit"):
        paged.slots([0, 1], N, 0, 2 * N + 1, N)
    with pytest.raises(paged.LayoutError, match="does not divide"):
        paged.slots([0], 24, 0, 8, N)
    with pytest.raises(paged.LayoutError, match="cannot hold"):
        paged.check_shape(torch.zeros(BLOCKS, HEADS, N, 2 * D), HEADS + 1, D, D)
