"""Whatever the writer writes, the reader reads back within the documented error bound (docs/codec.md).

Property tests over the cases that broke the writer/reader agreement before (issue 6): short segments, 1-3
token tails, escape-heavy data (25+ sigma outliers, constant channels, huge values), at every lossy preset,
sink count 0, 1 and 4, and kvq bitstream versions 3 and 4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvcli.codecs.presets import LOSSY_SCALES, make_codec
from kvcli.codecs.kvq_ops.rope import rope_tables, unrotate_keys

from kvcli.container import format, kvfile
from kvcli.modeling.kvcache import KVCache

IDENT = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def inv_freq(layers: int, dim: int) -> list[np.ndarray]:
    return [(1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32) for _ in range(layers)]


def roundtrip(kv: KVCache, preset: str, sinks: int, chunk: int, rope: bool, version: int = 3):
    freqs = inv_freq(kv.num_layers, kv.keys[0].shape[2]) if rope else None
    meta, parts = kvfile.encode(kv, IDENT, make_codec(preset, None, freqs, 1.0, sinks, version), chunk)
    src = format.BytesSource(format.build_header(meta, parts) + b"".join(p.data for p in parts))
    header = format.read_header(src)
    assert kvfile.verify(src, header)["ok"]
    return kvfile.decode(src, header), kvfile.open_decoder(src, header)[1], freqs


def assert_within_bound(kv: KVCache, out: KVCache, decoder, freqs, sinks: int, dtype: str) -> None:
    """Every non-sink element within step * token factor / 2 of the original (docs/codec.md, "Error bound")."""
    for layer in range(kv.num_layers):
        start = kv.token_start(layer)
        skip = max(0, sinks - start)
        for kind, (x, y) in enumerate(((kv.keys[layer], out.keys[layer]), (kv.values[layer], out.values[layer]))):
            assert y.shape == x.shape and y.dtype == x.dtype
            assert torch.equal(x[:, :skip], y[:, :skip])
            if skip >= x.shape[1]:
                continue
            plan = decoder.plans[(layer, kind)]
            step = torch.from_numpy(plan.step.astype(np.float32))[:, None, :]
            weights = decoder.tokens.get((layer, kind))
            if weights is not None:
                step = step * weights.factors(start + skip, x.shape[1] - skip)[:, :, None]
            center = torch.from_numpy(plan.center.astype(np.float32)).abs()[:, None, :]
            a, b = x[:, skip:].float(), y[:, skip:].float()
            if kind == 0 and freqs is not None:  # the bound holds before RoPE; rotation keeps pair lengths
                cos, sin = rope_tables(torch.from_numpy(freqs[layer]), start + skip, a.shape[1])
                a, b = (unrotate_keys(t.transpose(1, 2), cos, sin).transpose(1, 2) for t in (a, b))
                scale = (a.abs().amax() + b.abs().amax() + center.amax()) * torch.ones_like(a)
            else:
                scale = a.abs() + b.abs() + center
            # step/2, plus float32 arithmetic and one rounding to the cache dtype, relative to the magnitudes
            slack = (4 * EPS[dtype] + 2.0**-20) * scale + 1e-30
            assert ((a - b).abs() <= step / 2 * (1 + 1e-6) + slack).all()


def cache(seed: int, layers: int, heads: int, tokens: int, dim: int, dtype: str, outliers: float,
          constant: bool, huge: float, window: int | None, attention: bool = False) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for layer in range(layers):
        held = tokens if window is None or layer % 2 == 0 else min(tokens, window)
        pair = []
        for _ in range(2):
            x = torch.randn(heads, held, dim, generator=g) * torch.rand(1, 1, dim, generator=g) * 4
            if outliers:
                x[:, -1] += outliers * x.std(dim=1, correction=0).clamp_min(1e-3)  # the last token far out
            if constant:
                x[:, :, 0] = 0.75
            if huge:
                x[0, held // 2, -1] = huge
            pair.append(x.to(DTYPES[dtype]))
        keys.append(pair[0])
        values.append(pair[1])
    # Attention received spanning 2^-16..2^16: token weights over their whole range, both ends clipped.
    received = [torch.exp2(torch.randn(heads, k.shape[1], generator=g) * 6) for k in keys] if attention else None
    return KVCache(list(range(tokens)), keys, values, received)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(preset=st.sampled_from(sorted(LOSSY_SCALES)), sinks=st.sampled_from([0, 1, 4]),
       chunk=st.integers(1, 16), tail=st.integers(1, 3), full_chunks=st.integers(0, 3),
       layers=st.integers(1, 2), heads=st.integers(1, 3), dim=st.sampled_from([2, 4, 8]),
       dtype=st.sampled_from(sorted(DTYPES)), outliers=st.sampled_from([0.0, 25.0, 60.0]), constant=st.booleans(),
       huge=st.sampled_from([0.0, 3e4, -1e9]), rope=st.booleans(), window=st.none() | st.integers(1, 6),
       attention=st.booleans(), version=st.sampled_from([3, 4]), seed=st.integers(0, 2**31))
def test_whatever_the_writer_writes_the_reader_reads_within_the_bound(
        preset, sinks, chunk, tail, full_chunks, layers, heads, dim, dtype, outliers, constant, huge, rope, window,
        attention, version, seed):
    if dtype == "float16" and abs(huge) > 6e4:
        huge = 3e4  # float16 holds no larger value
    tokens = full_chunks * chunk + tail
    kv = cache(seed, layers, heads, tokens, dim, dtype, outliers, constant, huge, window, attention)
    out, decoder, freqs = roundtrip(kv, preset, sinks, chunk, rope, version)
    assert_within_bound(kv, out, decoder, freqs, sinks, dtype)


@pytest.mark.parametrize("preset", sorted(LOSSY_SCALES))
@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_issue_6_a_258_token_cache_with_a_25_sigma_last_token(preset, sinks):
    """The file `encode --quality small` wrote and `decode` refused: 256-token chunks leave a 2-token tail."""
    g = torch.Generator().manual_seed(6)
    keys = [torch.randn(3, 258, 64, generator=g) for _ in range(2)]
    values = [torch.randn(3, 258, 64, generator=g) for _ in range(2)]
    for x in keys + values:
        x[:, 257] = x.mean(dim=1) + 25 * x.std(dim=1)
    kv = KVCache(list(range(258)), keys, values)
    out, decoder, freqs = roundtrip(kv, preset, sinks, 256, True)
    assert_within_bound(kv, out, decoder, freqs, sinks, "float32")
