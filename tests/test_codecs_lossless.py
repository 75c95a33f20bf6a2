"""Lossless codecs round-trip bit-exactly for any shape, dtype and token count."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcli import format, kvfile
from kvcli.codecs import RawCodec, SegmentContext, ZstdCodec
from kvcli.kvcache import KVCache

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def random_tensor(seed: int, shape, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[..., 0] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])[torch.arange(shape[1]) % 4] if shape[1] else x[..., 0]
    return x.to(dtype)


@settings(max_examples=60, deadline=None)
@given(heads=st.integers(1, 4), tokens=st.integers(1, 70), dim=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), codec=st.sampled_from([RawCodec(), ZstdCodec(), ZstdCodec(19)]),
       seed=st.integers(0, 2**31))
def test_segment_roundtrip_is_bit_exact(heads, tokens, dim, dtype, codec, seed):
    x = random_tensor(seed, (heads, tokens, dim), dtype)
    ctx = SegmentContext("k", 0, 0, heads, tokens, dim, NAMES[dtype])
    y = codec.decode(codec.encode(x, ctx), ctx)
    assert y.dtype == dtype and torch.equal(x.view(torch.uint8 if dtype != torch.float32 else torch.int32).flatten(),
                                            y.view(torch.uint8 if dtype != torch.float32 else torch.int32).flatten())


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 3), tokens=st.integers(1, 40), chunk=st.integers(1, 17),
       dtype=st.sampled_from(DTYPES), window=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_container_roundtrip_with_sliding_layers(layers, tokens, chunk, dtype, window, seed):
    held = min(tokens, window)
    keys = [random_tensor(seed + i, (2, tokens if i % 2 == 0 else held, 8), dtype) for i in range(layers)]
    values = [random_tensor(seed + 100 + i, (2, k.shape[1], 6), dtype) for i, k in enumerate(keys)]
    kv = KVCache(list(range(tokens)), keys, values)
    ident = {"architecture": "X", "config_digest": "a", "weights_digest": "b", "tokenizer_digest": "c"}
    meta, parts = kvfile.encode(kv, ident, ZstdCodec(), chunk)
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    src = format.BytesSource(data)
    out = kvfile.decode(src, format.read_header(src))
    for a, b in zip(kv.keys + kv.values, out.keys + out.values):
        assert a.shape == b.shape and torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                                  b.view(torch.int16 if b.element_size() == 2 else torch.int32))
