"""The lossy kvq codec: documented error bound, exact sinks, any shape and dtype, and clean failure on garbage."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvcli.codecs.base import CodecError
from kvcli.codecs.kvq import KvqCodec, Profile
from kvcli.codecs.lossless import ZstdCodec
from kvcli.codecs.raw import RawCodec
from kvcli.codecs.kvq_ops.rope import rope_tables, unrotate_keys

from kvcli.container import format, kvfile
from kvcli.errors import FormatError, KvcliError
from kvcli.modeling.kvcache import KVCache

IDENT = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REL = {"float32": 1e-6, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def synthetic_cache(seed, layers, heads, tokens, dim, dtype, window=None):
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for i in range(layers):
        held = tokens if window is None or i % 2 == 0 else min(tokens, window)
        drift = torch.randn(heads, 1, dim, generator=g) * 4  # outlier channels with large means
        keys.append((torch.randn(heads, held, dim, generator=g) + drift).to(dtype))
        values.append(torch.randn(heads, held, dim, generator=g).to(dtype))
    return KVCache(list(range(tokens)), keys, values)


def build(meta, parts) -> bytes:
    return format.build_header(meta, parts) + b"".join(p.data for p in parts)


def encode_decode(kv, codec, chunk):
    data = build(*kvfile.encode(kv, IDENT, codec, chunk))
    src = format.BytesSource(data)
    return data, kvfile.decode(src, format.read_header(src))


def file_plans(data: bytes):
    """The plans the file itself stores (what the decoder uses)."""
    src = format.BytesSource(data)
    return kvfile.open_decoder(src, format.read_header(src))[1].plans


def inv_freq(layers, dim):
    return [1.0 / (10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim)) for _ in range(layers)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), tokens=st.integers(1, 70), dim=st.sampled_from([2, 4, 8, 16]),
       dtype=st.sampled_from(sorted(DTYPES)), chunk=st.integers(1, 40), scale=st.floats(0.05, 4.0),
       sinks=st.integers(0, 6), rope=st.booleans(), window=st.none() | st.integers(1, 20), seed=st.integers(0, 2**31))
def test_error_bound_and_exact_sinks(layers, heads, tokens, dim, dtype, chunk, scale, sinks, rope, window, seed):
    kv = synthetic_cache(seed, layers, heads, tokens, dim, DTYPES[dtype], window)
    freqs = inv_freq(layers, dim) if rope else None
    codec = KvqCodec(scale, sinks, None, freqs)
    data, out = encode_decode(kv, codec, chunk)
    plans = file_plans(data)
    for layer in range(layers):
        start = kv.token_start(layer)
        skip = max(0, sinks - start)
        for kind, (x, y) in enumerate(((kv.keys[layer], out.keys[layer]), (kv.values[layer], out.values[layer]))):
            assert y.shape == x.shape and y.dtype == x.dtype
            assert torch.equal(x[:, :skip], y[:, :skip])  # sinks are bit-exact
            if skip >= x.shape[1]:
                continue
            step = torch.from_numpy(plans[(layer, kind)].step.astype(np.float32))[:, None, :]
            a, b = x[:, skip:].float(), y[:, skip:].float()
            if kind == 0 and rope:  # the bound holds where quantization happened: before RoPE
                cos, sin = rope_tables(torch.from_numpy(freqs[layer]), start + skip, a.shape[1])
                a, b = (unrotate_keys(t.transpose(1, 2), cos, sin).transpose(1, 2) for t in (a, b))
                slack = 4 * REL[dtype] * (a.abs().amax() + b.abs().amax()) + 1e-5
            else:
                slack = REL[dtype] * b.abs() + 1e-6
            assert ((a - b).abs() <= step / 2 * (1 + 1e-5) + slack).all()


def test_finer_steps_mean_smaller_error_and_larger_files():
    kv = synthetic_cache(0, 2, 2, 300, 16, torch.float32)
    sizes, errors = [], []
    for scale in (0.1, 0.5, 2.0):
        data, out = encode_decode(kv, KvqCodec(scale, 4, None, inv_freq(2, 16)), 64)
        sizes.append(len(data))
        errors.append(max((a - b).abs().max().item() for a, b in zip(kv.values, out.values)))
    assert sizes[0] > sizes[1] > sizes[2]
    assert errors[0] < errors[1] < errors[2]


def test_profile_shapes_steps():
    kv = synthetic_cache(1, 2, 2, 100, 8, torch.float32)
    sens = np.array([[1e-4, 1e-4], [1e-2, 1e-4]])  # layer 1 K is 100x more sensitive
    encoder = KvqCodec(1.0, 0, Profile("t", sens, None), None).fit(kv.keys, kv.values, [0, 0])
    rms = [float((k - k.mean(1, keepdim=True)).pow(2).mean().sqrt()) for k in kv.keys]
    ratio = (encoder.plans[(1, 0)].step.astype(np.float64).mean() / rms[1]) / (encoder.plans[(0, 0)].step.astype(np.float64).mean() / rms[0])
    assert ratio == pytest.approx(0.1, rel=0.01)


def test_header_records_the_codec_settings():
    kv = synthetic_cache(2, 1, 1, 10, 4, torch.float16)
    data, _ = encode_decode(kv, KvqCodec(0.5, 2, None, None, {"quality": "balanced"}), 8)
    header = format.read_header(format.BytesSource(data))
    assert header.codec == {"name": "kvq", "params": {"version": 3, "scale": 0.5, "sinks": 2, "quality": "balanced"}}


KV = synthetic_cache(3, 2, 2, 40, 8, torch.float16)
META, PARTS = kvfile.encode(KV, IDENT, KvqCodec(0.4, 2, None, inv_freq(2, 8)), 16)
GOOD = build(META, PARTS)


def with_params(**params) -> bytes:
    meta = {**META, "codec": {"name": "kvq", "params": {**META["codec"]["params"], **params}}}
    return build(meta, PARTS)


@pytest.mark.parametrize("params, message", [
    ({"version": 1}, "kvq bitstream version 1 is not supported"),
    ({"version": "2"}, "param 'version' has the wrong type"),
    ({"scale": -1.0}, "step scale must be finite and positive"),
    ({"scale": True}, "param 'scale' has the wrong type"),
    ({"sinks": 1.5}, "param 'sinks' has the wrong type"),
    ({"sinks": -1}, "sinks must be in"),
    ({"colour": "red"}, "unknown params"),
])
def test_bad_params_are_refused_by_decode_and_verify(params, message):
    for run in (kvfile.decode, kvfile.verify):
        src = format.BytesSource(with_params(**params), "t.kvc")
        with pytest.raises(FormatError, match=f"t.kvc: codec: .*{re.escape(message)}"):
            run(src, format.read_header(src))


def test_unknown_codec_is_refused():
    meta = {**META, "codec": {"name": "kvq9", "params": {}}}
    src = format.BytesSource(build(meta, PARTS), "t.kvc")
    with pytest.raises(FormatError, match="unknown codec 'kvq9'"):
        kvfile.verify(src, format.read_header(src))


def replace_segment(index: int, data: bytes) -> bytes:
    parts = list(PARTS)
    p = parts[index]
    parts[index] = format.SegmentData(p.kind, p.layer, p.token_start, p.token_count, data, p.name)
    return build(META, parts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_garbage_behind_valid_checksums_is_refused_or_decodes_as_verify_says(data):
    """Any mutation of a segment's bytes: decode and verify both refuse it with a KvcliError, or both accept it
    and the values are finite. Never another exception."""
    index = data.draw(st.integers(0, len(PARTS) - 1))
    blob = bytearray(PARTS[index].data)
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    bad = replace_segment(index, bytes(blob))
    outcome = []
    for run in (kvfile.verify, kvfile.decode):
        src = format.BytesSource(bad)
        try:
            result = run(src, format.read_header(src))
            outcome.append("ok")
        except KvcliError:
            outcome.append("refused")
            continue
        if run is kvfile.decode:
            assert all(torch.isfinite(t).all() for t in result.keys + result.values)
    assert outcome[0] == outcome[1]


def test_threads_decode_equals_one_thread():
    src = format.BytesSource(GOOD)
    header = format.read_header(src)
    serial = kvfile.decode(src, header, threads=1)
    threaded = kvfile.decode(src, header, threads=2)
    for a, b in zip(serial.keys + serial.values, threaded.keys + threaded.values):
        assert torch.equal(a, b)


@pytest.mark.parametrize("index", range(2, 14))
@pytest.mark.parametrize("threads", [1, 2])
def test_a_bad_segment_is_named(index, threads):
    """An absurd lane count in any one segment: one FormatError naming that segment, however decoding is split."""
    header = format.read_header(format.BytesSource(GOOD))
    seg = header.segments[index]
    data = replace_segment(index, (0xFFFFFFF).to_bytes(4, "little") + PARTS[index].data[4:])
    src = format.BytesSource(data)
    with pytest.raises(FormatError, match=re.escape(f"{seg.label()}: cannot decode")):
        kvfile.decode(src, format.read_header(src), threads=threads)


def test_non_finite_values_are_refused_at_encode_time():
    for bad in (float("nan"), float("inf"), float("-inf")):
        kv = synthetic_cache(4, 2, 2, 20, 8, torch.float32)
        kv.values[1][1, 7, 3] = bad
        with pytest.raises(CodecError, match="non-finite"):
            kvfile.encode(kv, IDENT, KvqCodec(0.75, 1, None, None), 16)


def test_values_beyond_the_range_are_refused_at_encode_time_and_large_ones_round_trip():
    kv = synthetic_cache(5, 1, 1, 20, 4, torch.float32)
    kv.keys[0][0, 5, 1] = 1e15
    with pytest.raises(CodecError, match="beyond kvq's range"):
        kvfile.encode(kv, IDENT, KvqCodec(0.75, 0, None, None), 8)
    kv.keys[0][0, 5, 1] = 1e12
    data, out = encode_decode(kv, KvqCodec(0.75, 0, None, None), 8)
    step = float(file_plans(data)[(0, 0)].step[0, 1])
    assert abs(float(out.keys[0][0, 5, 1]) - 1e12) <= step / 2 + 1e12 * 2**-23


def test_token_weights_give_way_where_finer_steps_would_leave_the_integer_range():
    """1e13 from its channel mean fits kvq's range at uniform token steps but not at 1/8 of them: that layer and
    kind is coded without token weights rather than refused."""
    g = torch.Generator().manual_seed(9)
    keys = [torch.randn(1, 32, 4, generator=g).bfloat16() for _ in range(2)]
    values = [torch.randn(1, 32, 4, generator=g).bfloat16() for _ in range(2)]
    values[1][0, 5, 0] = 1e13
    attention = [torch.exp2(torch.randn(1, 32, generator=g) * 8) for _ in range(2)]
    kv = KVCache(list(range(32)), keys, values, attention)
    meta, parts = kvfile.encode(kv, IDENT, KvqCodec(0.5, 1, None, None), 8)
    src = format.BytesSource(format.build_header(meta, parts) + b"".join(p.data for p in parts))
    decoder = kvfile.open_decoder(src, format.read_header(src))[1]
    assert set(decoder.tokens) == {(0, 0), (0, 1), (1, 0)}
    out = kvfile.decode(src, format.read_header(src))
    assert abs(float(out.values[1][0, 5, 0]) - 1e13) < 1e13 * 0.01


def test_the_backend_is_chosen_once_when_a_codec_is_opened():
    kv = synthetic_cache(3, 1, 2, 12, 8, torch.float32)
    for codec in (KvqCodec(0.5), ZstdCodec(), RawCodec()):
        with pytest.raises(ValueError, match="backend"):
            codec.fit(kv.keys, kv.values, [0], backend="cuda")
        with pytest.raises(ValueError, match="backend"):
            codec.open({}, 1, backend="cuda")
    encoder = KvqCodec(0.5).fit(kv.keys, kv.values, [0], backend="triton")
    assert encoder.backend == "triton" and "backend" not in type(encoder).__dict__
    data = build(*kvfile.encode(kv, IDENT, KvqCodec(0.5), 5))
    src = format.BytesSource(data)
    decoder = kvfile.open_decoder(src, format.read_header(src))[1]
    assert decoder.backend == "torch" and not decoder.on_device
    with pytest.raises(ValueError, match="opened with backend triton"):  # its device path is the triton backend's
        decoder.decode_onto([])
    assert kvfile.open_decoder(src, format.read_header(src), "triton")[1].on_device
