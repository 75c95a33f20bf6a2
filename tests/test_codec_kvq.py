"""The lossy kvq codec: documented error bound, exact sinks, any shape and dtype, and clean failure on garbage."""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcli import format, kvfile
from kvcli.codecs import KvqCodec, Profile
from kvcli.codecs.quantize import rope_tables, unrotate_keys
from kvcli.errors import KvcliError
from kvcli.kvcache import KVCache

IDENT = {"architecture": "X", "config_digest": "a", "weights_digest": "b", "tokenizer_digest": "c"}
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


def encode_decode(kv, codec, chunk):
    meta, parts = kvfile.encode(kv, IDENT, codec, chunk)
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    src = format.BytesSource(data)
    return data, kvfile.decode(src, format.read_header(src))


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
    _, out = encode_decode(kv, codec, chunk)
    for layer in range(layers):
        start = kv.token_start(layer)
        skip = max(0, sinks - start)
        for kind, (x, y) in enumerate(((kv.keys[layer], out.keys[layer]), (kv.values[layer], out.values[layer]))):
            assert y.shape == x.shape and y.dtype == x.dtype
            assert torch.equal(x[:, :skip], y[:, :skip])  # sinks are bit-exact
            if skip >= x.shape[1]:
                continue
            step = torch.from_numpy(codec.plans[(layer, kind)].step.astype(np.float32))[:, None, :]
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
    codec = KvqCodec(1.0, 0, Profile("t", sens, None), None)
    codec.fit(kv.keys, kv.values, [0, 0])
    rms = [float((k - k.mean(1, keepdim=True)).pow(2).mean().sqrt()) for k in kv.keys]
    ratio = (codec.plans[(1, 0)].step.astype(np.float64).mean() / rms[1]) / (codec.plans[(0, 0)].step.astype(np.float64).mean() / rms[0])
    assert ratio == pytest.approx(0.1, rel=0.01)


def test_header_records_the_codec_settings():
    kv = synthetic_cache(2, 1, 1, 10, 4, torch.float16)
    data, _ = encode_decode(kv, KvqCodec(0.5, 2, None, None, {"quality": "balanced"}), 8)
    header = format.read_header(format.BytesSource(data))
    assert header.codec == {"name": "kvq", "params": {"version": 1, "scale": 0.5, "sinks": 2, "quality": "balanced"}}


def reseal(data: bytes, mutate) -> bytes:
    """Apply `mutate` to the data section, then fix every checksum so only the codec can notice."""
    header = format.read_header(format.BytesSource(data))
    body = bytearray(data[header.data_offset :])
    mutate(body)
    doc = json.loads(data[format.PREAMBLE_SIZE : header.data_offset])
    for row in doc["aux"]:
        row[3] = zlib.crc32(bytes(body[row[1] : row[1] + row[2]]))
    for row in doc["segments"]:
        row[6] = zlib.crc32(bytes(body[row[4] : row[4] + row[5]]))
    raw = json.dumps(doc).encode()
    return format.PREAMBLE.pack(format.MAGIC, 1, 0, len(raw), zlib.crc32(raw)) + raw + bytes(body)


GOOD = encode_decode(synthetic_cache(3, 2, 2, 40, 8, torch.float16), KvqCodec(0.4, 2, None, inv_freq(2, 8)), 16)[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_garbage_behind_valid_checksums(data):
    size = len(GOOD) - format.read_header(format.BytesSource(GOOD)).data_offset

    def mutate(body):
        for _ in range(data.draw(st.integers(1, 6))):
            pos = data.draw(st.integers(0, size - 1))
            body[pos] = data.draw(st.integers(0, 255))

    bad = reseal(GOOD, mutate)
    try:
        src = format.BytesSource(bad)
        out = kvfile.decode(src, format.read_header(src))
        assert all(k.shape[1] <= 40 for k in out.keys)
    except KvcliError:
        pass


def test_two_process_decode_equals_one_thread():
    src = format.BytesSource(GOOD)
    header = format.read_header(src)
    assert len([s for s in header.segments if s.kind != "aux"]) >= 8  # enough segments for the forked path
    serial = kvfile.decode(src, header, threads=1)
    forked = kvfile.decode(src, header, threads=2)
    for a, b in zip(serial.keys + serial.values, forked.keys + forked.values):
        assert torch.equal(a, b)


@pytest.mark.parametrize("index", range(12))
def test_a_bad_segment_is_named_whichever_process_decodes_it(index):
    """Garbage behind a valid checksum in any one segment: one FormatError naming that segment."""
    from kvcli.errors import FormatError

    header = format.read_header(format.BytesSource(GOOD))
    seg = [s for s in header.segments if s.kind != "aux"][index]

    def mutate(body):
        body[seg.offset : seg.offset + 4] = (0xFFFFFFF).to_bytes(4, "little")  # an absurd word count

    src = format.BytesSource(reseal(GOOD, mutate))
    with pytest.raises(FormatError, match=re.escape(f"{seg.label()}: cannot decode")):
        kvfile.decode(src, format.read_header(src), threads=2)
