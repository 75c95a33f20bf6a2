"""The fused dequantize kernel and the kernel file path against the torch references, bit for bit: on CPU under
TRITON_INTERPRET=1 (set in conftest), compiled on CUDA with `pytest --gpu` (tests/conftest_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from kvcli.codecs.kvq import KvqCodec  # noqa: E402
from kvcli.codecs.quantize import dequantize_rotate_ref  # noqa: E402
from kvcli.kernels.dequantize import dequantize_rotate  # noqa: E402

from kvcli.container import format, kvfile  # noqa: E402
from kvcli.modeling.kvcache import KVCache  # noqa: E402


@pytest.mark.parametrize("heads,dim,tokens", [(1, 2, 1), (3, 6, 7), (2, 64, 300), (1, 16, 257)])
@pytest.mark.parametrize("rope", [False, True])
def test_dequantize_rotate_matches_reference(device, heads, dim, tokens, rope):
    g = torch.Generator().manual_seed(heads * 1000 + dim + tokens)
    q = torch.randint(-40, 40, (heads, dim, tokens), generator=g, dtype=torch.int32)
    center = torch.randn(heads, dim, generator=g) * 3
    step = torch.rand(heads, dim, generator=g) * 0.2 + 0.01
    freq = torch.from_numpy(1.0 / (10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))) if rope else None
    start = 1234
    got = dequantize_rotate(q.to(device), center.to(device), step.to(device), freq, start)
    want = dequantize_rotate_ref(q, center, step, freq, start)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.device.type == device.type
    assert torch.equal(got.cpu(), want)


def test_kernel_decode_path_matches_cpu_path(device, short_lanes):
    g = torch.Generator().manual_seed(5)
    keys = [torch.randn(2, 40, 8, generator=g) + 2 for _ in range(2)]
    values = [torch.randn(2, 40, 8, generator=g) for _ in range(2)]
    kv = KVCache(list(range(40)), keys, values)
    freqs = [1.0 / (10000 ** (np.arange(0, 8, 2, dtype=np.float32) / 8)) for _ in range(2)]
    ident = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}
    meta, parts = kvfile.encode(kv, ident, KvqCodec(0.3, 3, None, freqs), 16)
    src = format.BytesSource(format.build_header(meta, parts) + b"".join(p.data for p in parts))
    header = format.read_header(src)
    cpu = kvfile.decode(src, header, threads=1)
    on_device = kvfile.decode(src, header, device=device, backend="triton")
    assert all(b.device.type == device.type for b in on_device.keys + on_device.values)
    for a, b in zip(cpu.keys + cpu.values, on_device.keys + on_device.values):
        assert torch.equal(a, b.cpu())
