"""kvq's fused CPU reconstruction (_kvq.reconstruct, KvqDecoder.dequantize_body) against the torch reference
(dequantize_body_ref, dequantize_rotate_ref): whole files, the float16 clamp and round-to-nearest-even casts at
their edges, outputs it must refuse, and the GIL released while it runs (random values in every dtype, shape and
layout: tests/test_kvq_ops.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from coder_inputs import fit_tables, ticks_during
from kvcli.codecs.kvq import KvqCodec
from kvcli.codecs.kvq_ops import _kvq, transform
from kvcli.codecs.kvq_ops.dequantize import FLOAT16_MAX, HOST_DTYPES
from kvcli.codecs.kvq_ops.rope import rope_tables, rotate_keys

from kvcli.container import format, kvfile
from kvcli.modeling.kvcache import KVCache

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
IDENT = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that comparisons are exact (and -0.0 differs from 0.0)."""
    return x.contiguous().view({4: torch.int32, 2: torch.int16}[x.element_size()])


# ---------------------------------------------------------------- whole files, real plans


def cache(seed: int, tokens: int, dtype: torch.dtype, heads: int = 2, dim: int = 8) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(heads, 1, dim, generator=g) * 4
    keys = [(torch.randn(heads, tokens, dim, generator=g) * 3 + drift).to(dtype) for _ in range(2)]
    values = [torch.randn(heads, tokens, dim, generator=g).to(dtype) for _ in range(2)]
    return KVCache(list(range(tokens)), keys, values)


def decoded_both_ways(kv: KVCache, codec: KvqCodec, chunk: int):
    """Every segment of the file decoded by reconstruct (the C path for these CPU outputs) and by the torch
    reference, each into a fresh channel-major output as kvfile allocates them."""
    meta, parts = kvfile.encode(kv, IDENT, codec, chunk)
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    src = format.BytesSource(data)
    header = format.read_header(src)
    _, decoder = kvfile.open_decoder(src, header)
    segs, ctxs = kvfile._segments(header)
    datas = [format.read_segment(src, header, s) for s in segs]
    symbols = decoder.entropy(list(zip(ctxs, datas)))
    checked = 0
    for ctx, data, sym in zip(ctxs, datas, symbols):
        fast = torch.full((ctx.heads, ctx.dim, ctx.tokens), float("nan"), dtype=kv.dtype).transpose(1, 2)
        ref = torch.full_like(fast, float("nan"))
        decoder.reconstruct(ctx, data, sym, fast)
        skip = decoder._layout(ctx)[1]
        ref[:, :skip] = fast[:, :skip]
        if skip < ctx.tokens:
            decoder.dequantize_body_ref(ctx, skip, sym, ref[:, skip:])
            checked += 1
        assert torch.equal(bits(fast), bits(ref)), ctx
    return checked, kvfile.decode(src, header)


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("tokens, chunk", [(37, 5), (1, 4), (19, 19)])
def test_segments_match_the_torch_reference(dtype, tokens, chunk):
    """Odd token counts, a 1-token cache, keys with and without RoPE (layer 1 has none), every dtype."""
    inv = 1.0 / (10000 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
    codec = KvqCodec(0.5, sinks=0, inv_freq=[inv, None])
    checked, kv = decoded_both_ways(cache(tokens, tokens, dtype), codec, chunk)
    assert checked == 2 * 2 * -(-tokens // chunk)
    assert all(torch.isfinite(k.float()).all() for k in kv.keys + kv.values)


def test_all_sink_segments_and_a_segment_that_starts_with_sinks():
    """With 6 sinks and chunks of 4: one segment all sinks, the next 2 sinks and 2 coded tokens."""
    codec = KvqCodec(0.5, sinks=6, inv_freq=[1.0 / (100 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))] * 2)
    kv = cache(3, 13, torch.float16)
    checked, decoded = decoded_both_ways(kv, codec, 4)
    assert checked == 2 * 2 * 3  # of 4 segments per layer and kind, only the first is all sinks
    for got, want in zip(decoded.keys + decoded.values, kv.keys + kv.values):
        assert torch.equal(bits(got[:, :6]), bits(want[:, :6]))


# ---------------------------------------------------------------- the C function on chosen values


def escaped(q: np.ndarray):
    """_kvq.reconstruct's leading arguments for integers q (heads, dim, tokens) of any value: one group of class
    16 (m = 1, K = 255) whose every symbol is the escape, so each integer comes from the escapes as it is."""
    heads, dim, tokens = q.shape
    tables = fit_tables({16: [np.zeros((1, 4), np.int32)]})
    channels = heads * dim
    spec = np.array([[0, channels, 255, 1]], np.int64)
    symbols = np.full(channels * tokens, 511, np.uint16)
    return (symbols, spec, np.arange(channels, dtype=np.int64), tokens, *tables.digits,
            np.ascontiguousarray(q, dtype=np.int32).reshape(-1))


def fused_args(q, center, step, rope, out: torch.Tensor, place=None, factor=None) -> tuple:
    """_kvq.reconstruct's arguments for q (heads, dim, tokens) into out (heads, tokens, dim); rope: (cos, sin)
    or None; factor: token weights (heads, tokens) or None."""
    heads, dim, _ = q.shape
    storage = torch.empty(0, dtype=torch.uint8).set_(out.untyped_storage()).numpy()
    if place is None:
        place = [out.storage_offset(), heads, dim, *out.stride()]
    cos, sin = (t.numpy() for t in rope) if rope is not None else (None, None)
    return (*escaped(q), center.reshape(-1).numpy(), step.reshape(-1).numpy(),
            factor.numpy() if factor is not None else None, cos, sin, storage, np.array(place, np.int64),
            HOST_DTYPES[out.dtype])


def fused(*args, **kwargs) -> None:
    _kvq.reconstruct(*fused_args(*args, **kwargs))


def reference(q, center, step, rope, dtype, factor=None) -> torch.Tensor:
    """docs/codec.md "Reconstruction" in torch: (heads, tokens, dim) of dtype."""
    x = torch.mul(torch.from_numpy(q), step[..., None])
    if factor is not None:
        x.mul_(factor[:, None, :])
    x.add_(center[..., None])
    if rope is not None:
        x = rotate_keys(x, *rope)
    if dtype == torch.float16:
        x = x.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return x.to(dtype).transpose(1, 2)


def channel_major(heads, tokens, dim, dtype) -> torch.Tensor:
    return torch.full((heads, dim, tokens), float("nan"), dtype=dtype).transpose(1, 2)


def test_float16_clamps_to_its_largest_finite_value():
    """Values just past ±65504 (which would round to infinity) and far past it are clamped first."""
    q = np.array([[[15, 17, 1000, -15, -17, -10**6, 0]]], np.int32)
    center, step = torch.tensor([[65504.0]]), torch.tensor([[1.0]])
    q[0, 0, 3:6] -= 2 * 65504  # centre + q lands below -65504
    out = channel_major(1, 7, 1, torch.float16)
    fused(q, center, step, None, out)
    want = reference(q, center, step, None, torch.float16)
    assert torch.equal(bits(out), bits(want))
    assert out.float().reshape(-1).tolist() == [65504.0] * 3 + [-65504.0] * 3 + [65504.0]


@pytest.mark.parametrize("dtype, center, step, expected", [
    # bfloat16 keeps 8 significant bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
    (torch.bfloat16, 1.0, 2.0**-8, [1.0, 1.0 + 2.0**-6, -1.0, 1.0 + 2.0**-7]),
    # float16 subnormals (unit 2^-24): 2^-25 and 3 * 2^-25 are halfway; ties go to the even neighbour.
    (torch.float16, 0.0, 2.0**-25, [0.0, 2.0**-23, -0.0, 2.0**-24]),
    # float16 normals (10 fraction bits): 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
    (torch.float16, 1.0, 2.0**-11, [1.0, 1.0 + 2.0**-9, 1.0, 1.0 + 2.0**-10]),
])
def test_casts_round_ties_to_even(dtype, center, step, expected):
    q = np.array([[[1, 3, 0, 2]]], np.int32)
    if center == 1.0 and dtype == torch.bfloat16:
        q[0, 0, 2] = -2**9  # 1 - 2^9 * 2^-8 = -1
    if center == 0.0:
        q[0, 0, 2] = -1  # -2^-25 rounds to -0.0
    c, s = torch.tensor([[center]]), torch.tensor([[step]])
    out = channel_major(1, 4, 1, dtype)
    fused(q, c, s, None, out)
    assert torch.equal(bits(out), bits(reference(q, c, s, None, dtype)))
    assert out.float().reshape(-1).tolist() == expected
    assert torch.equal(bits(out[0, 2]), bits(torch.tensor([expected[2]], dtype=dtype)))  # the sign of zero


def test_outputs_outside_or_overlapping_their_storage_are_refused():
    """Caller bugs are ValueError before anything is written."""
    q = np.arange(2 * 4 * 5, dtype=np.int32).reshape(2, 4, 5)
    center, step = torch.zeros(2, 4), torch.ones(2, 4)
    out = channel_major(2, 5, 4, torch.float32)
    fused(q, center, step, None, out)
    before = out.clone()
    base = [out.storage_offset(), 2, 4, *out.stride()]  # (0, 2, 4, 20, 1, 5)
    for place in ([1] + base[1:],  # one element past the end
                  [0, 2, 4, 20, 1, 4],  # channels overlap tokens
                  [0, 2, 4, 5, 1, 5],  # heads overlap channels
                  [0, 2, 4, 0, 1, 5],  # heads on the same elements
                  [-1] + base[1:],
                  [0, 2, 4, 20, 1, 5, 0]):
        with pytest.raises(ValueError, match="place|leave its buffer or overlap"):
            fused(q, center, step, None, out, place)
    with pytest.raises(ValueError, match="leave its buffer or overlap"):  # a broadcast view: heads share memory
        fused(q, center, step, None, torch.zeros(1, 5, 4).expand(2, 5, 4))
    with pytest.raises(ValueError, match="do not match"):  # steps for another shape
        fused(q, center, torch.ones(2, 3), None, out)
    with pytest.raises(ValueError, match="do not match"):  # centres for another shape
        fused(q, torch.zeros(2, 3), step, None, out)
    with pytest.raises(ValueError, match="do not match"):  # token weights for other tokens
        fused(q, center, step, None, out, factor=torch.ones(2, 4))
    with pytest.raises(ValueError, match="do not match"):  # rotary tables for other tokens
        fused(q, center, step, rope_tables(torch.ones(2), 0, 4), out)
    assert torch.equal(bits(out), bits(before))


def test_a_layout_that_does_not_cover_every_channel_is_refused():
    args = list(escaped(np.zeros((1, 4, 3), np.int32)))
    out = channel_major(1, 3, 4, torch.float32)
    storage = torch.empty(0, dtype=torch.uint8).set_(out.untyped_storage()).numpy()
    tail = [np.zeros(4, np.float32), np.ones(4, np.float32), None, None, None, storage,
            np.array([0, 1, 4, 12, 1, 3], np.int64), 0]
    _kvq.reconstruct(*args, *tail)
    args[2] = np.array([0, 1, 1, 3], np.int64)  # channel 1 twice, channel 2 never
    with pytest.raises(ValueError, match="cover every channel"):
        _kvq.reconstruct(*args, *tail)
    args[2] = np.array([0, 1, 2, 4], np.int64)  # a channel past the output
    with pytest.raises(ValueError, match="group layout"):
        _kvq.reconstruct(*args, *tail)


def test_a_transform_must_be_one_matrix_per_head_of_the_output():
    args = list(escaped(np.ones((2, 4, 3), np.int32)))
    out = channel_major(2, 3, 4, torch.float32)
    storage = torch.empty(0, dtype=torch.uint8).set_(out.untyped_storage()).numpy()
    tail = [np.zeros(8, np.float32), np.ones(8, np.float32), None, None, None, storage,
            np.array([0, 2, 4, 12, 1, 3], np.int64), 0]
    _kvq.reconstruct(*args, *tail, *transform.prepare(np.eye(4, dtype=np.int16)[None].repeat(2, 0) * 1024))
    assert torch.equal(out, torch.ones_like(out))  # 1024 q, times 2^-10
    right = transform.prepare(np.eye(4, dtype=np.int16)[None].repeat(2, 0))
    for wrong in (transform.prepare(np.eye(4, dtype=np.int16)[None]),
                  transform.prepare(np.eye(3, dtype=np.int16)[None].repeat(2, 0)),
                  right._replace(pairs=right.pairs[:1]), right._replace(pairs=None)):
        out.fill_(7)
        with pytest.raises(ValueError, match="matrices do not match|matrix and pairs"):
            _kvq.reconstruct(*args, *tail, *wrong)
        assert torch.equal(out, torch.full_like(out, 7))


def test_escapes_must_be_exactly_those_the_symbols_use():
    args = list(escaped(np.zeros((1, 2, 3), np.int32)))
    out = channel_major(1, 3, 2, torch.float32)
    storage = torch.empty(0, dtype=torch.uint8).set_(out.untyped_storage()).numpy()
    tail = [np.zeros(2, np.float32), np.ones(2, np.float32), None, None, None, storage,
            np.array([0, 1, 2, 6, 1, 3], np.int64), 0]
    args[6] = np.zeros(5, np.int32)  # one short
    with pytest.raises(ValueError, match="escapes"):
        _kvq.reconstruct(*args, *tail)


def test_reconstruction_releases_the_gil():
    """As the C decoder's test: a thread that only runs while the GIL is free advances during one large call."""
    rng = np.random.default_rng(1)
    heads, dim, tokens = 4, 64, 30_000
    q = rng.integers(-50, 50, (heads, dim, tokens), dtype=np.int32)
    center, step = torch.zeros(heads, dim), torch.full((heads, dim), 0.25)
    rope = rope_tables(torch.from_numpy(1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).float(), 0, tokens)
    out = channel_major(heads, tokens, dim, torch.float16)
    args = fused_args(q, center, step, rope, out)
    during = ticks_during(lambda: _kvq.reconstruct(*args))
    assert torch.equal(bits(out), bits(reference(q, center, step, rope, torch.float16)))
    assert during >= 10, during


def test_kvfile_decode_matches_the_reference_path_end_to_end():
    """A whole file decoded by kvfile (C path) equals every segment rebuilt by the torch reference."""
    inv = 1.0 / (10000 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
    kv = cache(9, 300, torch.bfloat16)
    codec = KvqCodec(1.0, sinks=1, inv_freq=[inv, inv])
    meta, parts = kvfile.encode(kv, IDENT, codec, 64)
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    src = format.BytesSource(data)
    header = format.read_header(src)
    fast = kvfile.decode(src, header, threads=2)
    _, decoder = kvfile.open_decoder(src, header)
    segs, ctxs = kvfile._segments(header)
    for seg, ctx in zip(segs, ctxs):
        raw = format.read_segment(src, header, seg)
        sym = decoder.entropy([(ctx, raw)])[0]
        skip = decoder._layout(ctx)[1]
        got = (fast.keys if ctx.kind == "k" else fast.values)[ctx.layer][:, ctx.token_start : ctx.token_start + ctx.tokens]
        if skip < ctx.tokens:
            want = torch.empty(ctx.heads, ctx.tokens - skip, ctx.dim, dtype=torch.bfloat16)
            decoder.dequantize_body_ref(ctx, skip, sym, want)
            assert torch.equal(bits(got[:, skip:]), bits(want))
