"""kvq's encode path: fit quantizes each element once and the encoder codes from those integers; the C
helpers it uses (joint symbols, channel spread) against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvcli.codecs import entropy
from kvcli.codecs.base import CodecError, SegmentContext
from kvcli.codecs.kvq import KvqCodec

from kvcli.container import kvfile
from kvcli.modeling.kvcache import KVCache

IDENT = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}


def cache(tokens: int = 40, heads: int = 2, dim: int = 8, layers: int = 2, seed: int = 0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, tokens, dim, generator=g) * 3 for _ in range(layers)]
    values = [torch.randn(heads, tokens, dim, generator=g) for _ in range(layers)]
    return KVCache(list(range(tokens)), keys, values)


def codec() -> KvqCodec:
    return KvqCodec(0.5, 1, None, [1.0 / 10000 ** (np.arange(0, 8, 2, dtype=np.float32) / 8)] * 2)


def test_segments_fit_did_not_see_encode_to_the_same_bytes():
    """Copies of the same values are quantized afresh; the bytes equal those coded from fit's integers."""
    kv = cache()
    encoder = codec().fit(kv.keys, kv.values, [0, 0])
    jobs = []
    for start in (0, 16, 32):
        for layer in range(2):
            for kind, t in (("k", kv.keys), ("v", kv.values)):
                n = min(16, 40 - start)
                jobs.append((t[layer][:, start : start + n], SegmentContext(kind, layer, start, 2, n, 8, "float32")))
    views = encoder.encode_many(jobs)
    copies = encoder.encode_many([(x.clone(), ctx) for x, ctx in jobs])
    assert views == copies


def test_fitted_integers_only_for_slices_of_the_fitted_tensor():
    kv = cache()
    encoder = codec().fit(kv.keys, kv.values, [0, 0])
    fitted = encoder.fitted[(1, 0)]
    x = kv.keys[1]
    assert torch.equal(fitted.rows(x[:, 16:32], 16, 0), fitted.q[:, :, 15:31])
    assert fitted.rows(x[:, 0:16], 0, 1).shape[2] == 15  # the sink is not among the integers
    assert fitted.rows(x[:, 16:32].clone(), 16, 0) is None
    assert fitted.rows(x[:, 16:32], 17, 0) is None  # claims another position than the slice has
    assert fitted.rows(kv.keys[0][:, 16:32], 16, 0) is None  # another layer's tensor
    assert fitted.rows(x[:, 16:32].transpose(1, 2).contiguous().transpose(1, 2), 16, 0) is None
    assert fitted.q.dtype == torch.int16


def test_large_integers_keep_32_bits_and_round_trip():
    kv = cache(tokens=20)
    kv.keys[0][1, 5, 3] = 1e12  # the step is capped at 60000: about 2^24 steps from the channel's center
    encoder = codec().fit(kv.keys, kv.values, [0, 0])
    assert encoder.fitted[(0, 0)].q.dtype == torch.int32 and encoder.fitted[(1, 0)].q.dtype == torch.int16
    meta, parts = kvfile.encode(kv, IDENT, codec(), 8)
    from kvcli.container import format

    src = format.BytesSource(format.build_header(meta, parts) + b"".join(p.data for p in parts))
    out = kvfile.decode(src, format.read_header(src))
    assert abs(float(out.keys[0][1, 5, 3]) - 1e12) <= 30000 + 1e12 * 2**-23


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_sinks_are_refused(bad):
    kv = cache()
    kv.keys[1][0, 0, 2] = bad  # token 0 is the sink
    with pytest.raises(CodecError, match="non-finite values .* in its sink tokens"):
        kvfile.encode(kv, IDENT, codec(), 16)


def test_values_whose_mean_overflows_are_beyond_the_range_not_non_finite():
    kv = cache()
    kv.values[0][1, 3:20, 4] = 3e38  # finite, but their float32 sum is not
    with pytest.raises(CodecError, match="beyond kvq's range"):
        kvfile.encode(kv, IDENT, codec(), 16)


def tuples_ref(rows: np.ndarray, half: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """docs/codec.md's joint symbols, one tuple at a time."""
    n, tokens = rows.shape
    symbols, escapes = [], []
    for r in range(n):
        for i in range(0, tokens, m):
            t = [int(v) for v in rows[r, i : i + m]] + [0] * max(0, i + m - tokens)
            if all(-half <= v <= half for v in t):
                symbols.append(sum((v + half) * (2 * half + 1) ** (m - 1 - j) for j, v in enumerate(t)))
            else:
                symbols.append((2 * half + 1) ** m)
                escapes += t
    return np.array(symbols, np.int32), np.array(escapes, np.int32)


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
@pytest.mark.parametrize("half, m", [(1, 4), (5, 2), (255, 1)])
def test_to_tuples_matches_the_spec(dtype, half, m):
    rng = np.random.default_rng(half)
    rows = rng.integers(-half - 2, half + 3, (3, 13)).astype(dtype)
    rows[0, 0] = np.iinfo(dtype).min
    got = entropy.to_tuples(rows, half, m)
    want = tuples_ref(rows, half, m)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_channel_classes_use_the_exact_population_std():
    rng = np.random.default_rng(3)
    q = rng.integers(-40, 41, (2, 3, 50)).astype(np.int32)
    q[0, 0] = rng.choice([-(2**30), 2**30 - 1], 50)  # squares whose int64 sum would overflow
    want = entropy.class_of(q.astype(np.float64).std(axis=-1))
    assert np.array_equal(entropy.classes_of(q), want)
    assert np.array_equal(entropy.classes_of(q[..., :1]), entropy.class_of(np.abs(q[..., 0]).astype(np.float64)))
