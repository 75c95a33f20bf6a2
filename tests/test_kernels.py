"""The kernel file path against the CPU path, bit for bit: on CPU under TRITON_INTERPRET=1 (set in conftest),
compiled on CUDA with `pytest --gpu` (tests/conftest_gpu.py). Each kernel against its torch form:
tests/test_kvq_ops.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from kvcli.codecs.kvq import KvqCodec  # noqa: E402

from kvcli.container import format, kvfile  # noqa: E402
from kvcli.modeling.kvcache import KVCache  # noqa: E402


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


def test_kernel_decode_path_reads_version_4(device, preset="small"):
    """Version 4's tables per (class, token band): the golden files (token weights, a sliding-window layer,
    3-token tails) decode on the kernel path to the CPU path's bits."""
    from pathlib import Path

    data = (Path(__file__).parent / "golden" / f"v4-tiny-kvq-{preset}.kvc").read_bytes()
    src = format.BytesSource(data)
    header = format.read_header(src)
    assert header.codec["params"]["version"] == 4
    cpu = kvfile.decode(src, header, threads=1)
    on_device = kvfile.decode(src, header, device=device, backend="triton")
    for a, b in zip(cpu.keys + cpu.values, on_device.keys + on_device.values):
        assert torch.equal(a, b.cpu())
