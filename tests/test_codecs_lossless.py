"""Lossless codecs round-trip bit-exactly for any shape, dtype and token count, and refuse what they must."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from kvcli.codecs.base import CodecError, SegmentContext
from kvcli.codecs.lossless import ZstdCodec
from kvcli.codecs.raw import RawCodec

from kvcli.container import format, kvfile
from kvcli.errors import FormatError
from kvcli.modeling.kvcache import KVCache

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
IDENT = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}


def random_tensor(seed: int, shape, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[..., 0] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])[torch.arange(shape[1]) % 4] if shape[1] else x[..., 0]
    return x.to(dtype)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


def decode_one(codec, data: bytes, ctx: SegmentContext) -> torch.Tensor:
    decoder = codec.open({}, 1)
    out = torch.empty(ctx.shape, dtype=ctx.torch_dtype)
    decoder.reconstruct(ctx, data, decoder.entropy([(ctx, data)])[0], out)
    return out


def build(meta, parts) -> bytes:
    return format.build_header(meta, parts) + b"".join(p.data for p in parts)


@settings(max_examples=60, deadline=None)
@given(heads=st.integers(1, 4), tokens=st.integers(1, 70), dim=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       codec=st.sampled_from([RawCodec(), ZstdCodec(), ZstdCodec(19), ZstdCodec(3, byte_planes=False)]),
       seed=st.integers(0, 2**31))
def test_segment_roundtrip_is_bit_exact(heads, tokens, dim, dtype, codec, seed):
    x = random_tensor(seed, (heads, tokens, dim), dtype)
    ctx = SegmentContext("k", 0, 0, heads, tokens, dim, NAMES[dtype])
    y = decode_one(codec, codec.fit([], [], []).encode(x, ctx), ctx)
    assert y.dtype == dtype and torch.equal(bits(x).flatten(), bits(y).flatten())


def test_raw_bytes_are_little_endian_elements_in_order():
    x = random_tensor(1, (2, 3, 4), torch.float32)
    ctx = SegmentContext("v", 0, 0, 2, 3, 4, "float32")
    assert RawCodec().encode(x, ctx) == x.numpy().astype("<f4").tobytes()


@pytest.mark.parametrize("planes", [True, False])
def test_zstd_honours_byte_planes_on_read(planes):
    x = random_tensor(2, (2, 5, 3), torch.float16)
    ctx = SegmentContext("k", 0, 0, 2, 5, 3, "float16")
    raw = x.numpy().astype("<f2").view(np.uint8).reshape(-1, 2)
    frame = zstandard.ZstdCompressor().compress(np.ascontiguousarray(raw.T if planes else raw).tobytes())
    codec = ZstdCodec.from_params({"level": 3, "byte_planes": planes})
    assert torch.equal(bits(decode_one(codec, frame, ctx)), bits(x))
    assert ZstdCodec(byte_planes=planes).encode(x, ctx) == frame


def test_zstd_refuses_bytes_after_its_frame():
    x = random_tensor(3, (1, 4, 4), torch.float32)
    ctx = SegmentContext("k", 0, 0, 1, 4, 4, "float32")
    data = ZstdCodec().encode(x, ctx)
    with pytest.raises(CodecError, match="bytes after the zstd frame"):
        decode_one(ZstdCodec(), data + b"\0", ctx)
    with pytest.raises(CodecError, match="truncated"):
        decode_one(ZstdCodec(), data[:-1], ctx)


@pytest.mark.parametrize("level", [-5, 1, 22, 100])
def test_zstd_level_is_informational_for_a_decoder(level):
    codec = ZstdCodec.from_params({"level": level, "byte_planes": True})
    assert codec.params()["level"] == level


@pytest.mark.parametrize("name, params, message", [
    ("zstd", {"level": "3"}, "param 'level' has the wrong type"),
    ("zstd", {"byte_planes": 1}, "param 'byte_planes' has the wrong type"),
    ("zstd", {"window": 3}, "unknown params"),
    ("zstd", [], "params must be an object"),
    ("raw", {"level": 3}, "unknown params"),
    ("lz4", {}, "unknown codec 'lz4'"),
    (7, {}, "unknown codec 7"),
])
def test_codec_params_are_validated(name, params, message):
    from kvcli.codecs.registry import codec_from_header

    with pytest.raises(CodecError, match=re.escape(message)):
        codec_from_header(name, params)


def test_writer_refuses_a_cache_beyond_the_readers_expansion_bound():
    kv = KVCache(list(range(300)), [torch.zeros(2, 300, 64)], [torch.zeros(2, 300, 64)])
    with pytest.raises(CodecError, match="maximum expansion of 64x"):
        kvfile.encode(kv, IDENT, ZstdCodec(), 300)


def test_reader_refuses_a_file_beyond_the_expansion_bound_before_allocating():
    meta, parts = kvfile.encode(KVCache([1, 2], [torch.randn(1, 2, 4)], [torch.randn(1, 2, 4)]), IDENT, ZstdCodec(), 2)
    zeros = zstandard.ZstdCompressor().compress(bytes(1024 * 300 * 128 * 4))
    meta["token_ids"] = list(range(300))
    meta["layers"] = [{"kv_heads": 1024, "key_dim": 128, "value_dim": 128, "token_start": 0}]
    meta["chunk_tokens"] = 300
    parts = [format.SegmentData(kind, 0, 0, 300, zeros) for kind in ("k", "v")]
    src = format.BytesSource(build(meta, parts), "bomb.kvc")
    header = format.read_header(src)
    for run in (kvfile.decode, kvfile.verify):
        with pytest.raises(FormatError, match=r"bomb.kvc: 314572800 decoded bytes from \d+ stored bytes exceeds "
                                              r"codec zstd's maximum expansion of 64x"):
            run(src, header)


def test_reader_refuses_a_cache_larger_than_available_memory():
    kv = KVCache(list(range(10)), [random_tensor(4, (2, 10, 8), torch.float32)], [random_tensor(5, (2, 10, 8), torch.float32)])
    src = format.BytesSource(build(*kvfile.encode(kv, IDENT, RawCodec(), 4)), "big.kvc")
    header = format.read_header(src)
    kvfile.check_decoded_size(header, RawCodec(), "big.kvc", 1 << 20)
    with pytest.raises(FormatError, match=r"big.kvc: the decoded cache needs 1280 bytes, more than 90% of the 1000 "):
        kvfile.check_decoded_size(header, RawCodec(), "big.kvc", 1000)


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 3), tokens=st.integers(1, 40), chunk=st.integers(1, 17),
       dtype=st.sampled_from(DTYPES), window=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_container_roundtrip_with_sliding_layers(layers, tokens, chunk, dtype, window, seed):
    held = min(tokens, window)
    keys = [random_tensor(seed + i, (2, tokens if i % 2 == 0 else held, 8), dtype) for i in range(layers)]
    values = [random_tensor(seed + 100 + i, (2, k.shape[1], 6), dtype) for i, k in enumerate(keys)]
    kv = KVCache(list(range(tokens)), keys, values)
    data = build(*kvfile.encode(kv, IDENT, ZstdCodec(), chunk))
    src = format.BytesSource(data)
    out = kvfile.decode(src, format.read_header(src))
    for a, b in zip(kv.keys + kv.values, out.keys + out.values):
        assert a.shape == b.shape and torch.equal(bits(a), bits(b))
