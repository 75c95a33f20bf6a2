"""kvq's fast encoder writes exactly the bytes of the reference path it replaced.

The fast path: to_channels, deviations and quantize_classes of codecs/kvq_ops/quantize.py in C passes, layers
fitted on two threads, table counts by _ans.count_tuples and each segment coded by one _ans.encode_rows call. The
reference path: their torch forms (to_channels_ref, deviations_ref, quantize_classes_ref), and the per-group
to_tuples + rans.encode_streams coder below. Whole files are compared for caches that reach every branch (sliding
windows, token weights, a profile, int32 integers, odd shapes, half dtypes, values on rounding ties); each C pass
against its torch form on crafted values is tests/test_kvq_ops.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from kvcli.codecs import _ans, entropy, kvq, rans
from kvcli.codecs.kvq import KvqCodec, Profile
from kvcli.codecs.kvq_ops import quantize

from kvcli.container import format, kvfile
from kvcli.modeling.kvcache import KVCache

IDENT = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}


def count_symbols_ref(cls: int, rows: np.ndarray) -> np.ndarray:
    symbols, _ = entropy.to_tuples(rows, *entropy.class_layout(cls)) if rows.size else (np.zeros(0, np.int64), None)
    return np.bincount(symbols, minlength=entropy.alphabet(cls)).astype(np.int64)


def encode_segments_ref(tables: entropy.ClassTables, segments) -> list[bytes]:
    """The coder before encode_rows: each group's joint symbols and a table index per symbol, then one batch."""
    jobs, escapes = [], []
    for lay, rows, _, *given in segments:
        symbols, ids, esc, first = [], [], [], 0
        for table, channels, half, m in lay.spec.tolist():
            s, e = entropy.to_tuples(np.asarray(rows)[lay.rows[first : first + channels]], half, m)
            first += channels
            symbols.append(s)
            ids.append(np.full(len(s), table, np.uint16))
            esc.append(e)
        if given and given[0] is not None:  # version 4: the table of each symbol, from its band
            ids = [given[0]]
        jobs.append((np.concatenate(symbols + [np.zeros(0, np.int32)]), np.concatenate(ids + [np.zeros(0, np.uint16)])))
        escapes.append(np.concatenate(esc + [np.zeros(0, np.int32)]).astype("<i4"))
    out = []
    for stream, esc in zip(rans.encode_streams(tables.coder, jobs), escapes):
        frame = zstandard.ZstdCompressor(level=3).compress(esc.tobytes()) if esc.size else b""
        out.append(entropy.HEAD.pack(len(stream.states), len(stream.words), len(frame))
                   + stream.states.astype("<u4").tobytes() + stream.words.astype("<u2").tobytes() + frame)
    return out


@pytest.fixture
def reference(monkeypatch):
    """Call it to switch the encoder to the reference path for the rest of the test."""

    def switch():
        monkeypatch.setattr(quantize, "to_channels", quantize.to_channels_ref)
        monkeypatch.setattr(quantize, "deviations", quantize.deviations_ref)
        monkeypatch.setattr(quantize, "quantize_classes", quantize.quantize_classes_ref)
        monkeypatch.setattr(entropy, "count_symbols", count_symbols_ref)
        monkeypatch.setattr(entropy, "encode_segments", encode_segments_ref)

    return switch


def file_bytes(kv: KVCache, codec: KvqCodec, chunk: int) -> bytes:
    meta, parts = kvfile.encode(kv, IDENT, codec, chunk)
    return format.build_header(meta, parts) + b"".join(p.data for p in parts)


def inv_freq(dim: int, layers: int) -> list[np.ndarray]:
    return [(1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)] * layers


def cache(tokens: int, heads: int, dim: int, held: list[int], seed: int, dtype=torch.float32,
          attention: bool = False) -> KVCache:
    """Layer i keeps the last held[i] tokens (a sliding window where fewer than `tokens`); keys of unequal
    channel scales, as real keys have, so that classes differ."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randn(heads, 1, dim, generator=g) * 2)
    keys = [(torch.randn(heads, n, dim, generator=g) * scale + 1).to(dtype) for n in held]
    values = [torch.randn(heads, n, dim, generator=g).to(dtype) for n in held]
    weights = [torch.exp2(torch.randn(heads, n, generator=g) * 6) for n in held] if attention else None
    return KVCache(list(range(tokens)), keys, values, weights)


CASES = {
    "plain": dict(tokens=37, heads=2, dim=8, held=[37, 37, 37]),
    "sliding window and token weights": dict(tokens=45, heads=2, dim=8, held=[45, 20, 45, 7], attention=True),
    "one head, odd tuples, one token": dict(tokens=6, heads=1, dim=6, held=[6, 1, 5, 2]),
    "model-sized heads, token weights": dict(tokens=300, heads=3, dim=64, held=[300, 300], attention=True),
    "float16": dict(tokens=29, heads=2, dim=8, held=[29, 29], dtype=torch.float16, attention=True),
    "bfloat16": dict(tokens=29, heads=2, dim=8, held=[29, 29], dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_files_are_the_reference_bytes(case, sinks, reference):
    spec = CASES[case]
    kv = cache(seed=len(case) + sinks, **spec)
    layers, heads, dim = len(spec["held"]), spec["heads"], spec["dim"]
    g = np.random.default_rng(sinks)
    profile = Profile("p", g.uniform(0.01, 1, (layers, 2, heads)), [g.uniform(0.1, 10, (heads, dim))] * layers)
    codecs = [KvqCodec(0.5, sinks, None, inv_freq(dim, layers)), KvqCodec(2.0, sinks, profile, inv_freq(dim, layers)),
              KvqCodec(0.05, sinks, None, None, token_alpha=1.0)]
    fast = [file_bytes(kv, c, 16) for c in codecs]
    reference()
    assert fast == [file_bytes(kv, c, 16) for c in codecs]


def test_integers_beyond_int16_are_the_reference_bytes(reference):
    kv = cache(tokens=40, heads=2, dim=8, held=[40, 40], seed=3, attention=True)
    # Steps are capped at 60000: about 2^24 steps from the channel's center, far beyond 2^15.5, so int32
    # integers and 128-bit squares.
    kv.keys[0][1, 5, 3] = 1e12
    kv.values[1][0, 9, 2] = -1e12
    codec = KvqCodec(0.5, 1, None, inv_freq(8, 2))
    fast = file_bytes(kv, codec, 16)
    fitted = codec.fit(kv.keys, kv.values, [0, 0], kv.attention).fitted
    assert [fitted[k].q.dtype for k in ((0, 0), (0, 1), (1, 1))] == [torch.int32, torch.int16, torch.int32]
    reference()
    assert fast == file_bytes(kv, codec, 16)


@pytest.mark.parametrize("rows_dtype", [np.int16, np.int32])
def test_coder_matches_the_reference_at_extreme_frequencies(rows_dtype):
    """Symbols of frequency 1 (no reciprocal: the state is its own quotient) next to one of almost 2^16, escapes,
    several lanes, and rows that are a strided view."""
    counts = {-12: np.zeros(entropy.alphabet(-12), np.int64), 0: np.ones(entropy.alphabet(0), np.int64)}
    counts[-12][40] = 10**9  # every other symbol of class -12 gets frequency 1, symbol 40 the rest
    tables = entropy.tables_of(counts)
    assert tables.coder.freqs[0].min() == 1 and tables.coder.freqs[0].max() > 65000
    g = np.random.default_rng(0)
    q = g.integers(-1, 2, (6, 4, 2001)).astype(rows_dtype)
    q[g.random(q.shape) < 0.01] = 7  # escapes in both classes
    rows = q[:, :, 3:2000].reshape(24, 1997)
    groups = entropy.groups_of(np.array([0, -12, -12, 0] * 6, np.int8).reshape(6, 4))
    lay = entropy.Layout.of(groups, 1997, tables)
    segment = (lay, rows, entropy.limits(groups, 1997, 0))
    assert segment[2].lanes > 1
    assert entropy.encode_segments(tables, [segment]) == encode_segments_ref(tables, [segment])


def test_fit_on_two_threads_raises_the_first_error_in_layer_order():
    """Layers are fitted in parallel, but the error is the one a loop over (layer, K/V) would meet first."""
    kv = cache(tokens=40, heads=2, dim=8, held=[40, 40, 40], seed=4)
    kv.values[0][1, 20, 3] = float("nan")
    kv.keys[2][0, 0, 1] = float("inf")  # a sink: refused before the layer is even quantized
    kv.keys[1][0, 9, 0] = 1e38  # beyond kvq's range
    with pytest.raises(kvq.CodecError, match="layer 0 V holds non-finite values"):
        KvqCodec(0.5, 1, None, inv_freq(8, 3)).fit(kv.keys, kv.values, [0, 0, 0])
    kv.values[0][1, 20, 3] = 0.0
    with pytest.raises(kvq.CodecError, match="layer 1 K: values up to"):
        KvqCodec(0.5, 1, None, inv_freq(8, 3)).fit(kv.keys, kv.values, [0, 0, 0])


def test_coder_refuses_a_tuple_length_no_class_has():
    """Tuples of 3 tokens fit the arithmetic of a layout but no loop of the coder: refused, not run past the rows."""
    tables = entropy.tables_of({0: np.ones(3**3 + 1, np.int64)})  # the alphabet of K = 1, m = 3, and its escape
    rows = np.zeros((1, 7), np.int16)
    symbols = -(-7 // 3)
    with pytest.raises(ValueError, match="group layout"):
        _ans.encode_rows(*tables.coder.coder_arrays, tables.reciprocals, rows, np.array([[0, 1, 1, 3]], np.int64),
                         np.zeros(1, np.int64), np.empty(1, np.uint32), np.empty(symbols, np.uint16),
                         np.empty(symbols * 3, np.int32))


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int64])
def test_coder_refuses_rows_that_are_not_int16_or_int32(dtype):
    """float32 has int32's item size and uint16 int16's: either would be coded as its bit patterns. Refused."""
    tables = entropy.tables_of({0: np.ones(2**4 + 1, np.int64)})  # K = 1, m = 4, and its escape
    rows = np.zeros((1, 8), dtype)
    with pytest.raises(ValueError, match="rows must be int16 or int32"):
        _ans.encode_rows(*tables.coder.coder_arrays, tables.reciprocals, rows, np.array([[0, 1, 1, 4]], np.int64),
                         np.zeros(1, np.int64), np.empty(1, np.uint32), np.empty(2, np.uint16), np.empty(8, np.int32))


def test_coder_refuses_a_symbol_table_of_another_alphabet():
    """Version 4's table per symbol: one whose alphabet is not the group's (or that does not exist) is refused,
    never read past; the group's own tables code."""
    tables = entropy.tables_of({(-12, 0): np.ones(3**4 + 1, np.int64), (-12, 1): np.arange(1, 3**4 + 2),
                                (0, 4): np.ones(11**2 + 1, np.int64)})
    rows = np.ones((1, 8), np.int16)
    args = [*tables.coder.coder_arrays, tables.reciprocals, rows, np.array([[0, 1, 1, 4]], np.int64),
            np.zeros(1, np.int64), np.empty(1, np.uint32), np.empty(2, np.uint16), np.empty(8, np.int32)]
    _ans.encode_rows(*args, np.array([0, 1], np.uint16))
    for bad in ([0, 2], [3, 0]):
        with pytest.raises(ValueError, match="symbol 1's table|symbol 0's table"):
            _ans.encode_rows(*args, np.array(bad, np.uint16))
    with pytest.raises(ValueError, match="one table id per symbol"):
        _ans.encode_rows(*args, np.array([0], np.uint16))
