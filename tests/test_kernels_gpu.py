"""Triton kernels against their references, bit for bit: the rANS decoder against codecs/rans.py, the fused
quantize and dequantize against their torch forms in codecs/kvq_ops/.

On CPU they run under TRITON_INTERPRET=1 (set in conftest) on small shapes: the interpreter takes tens of
milliseconds per decoder step, so multi-lane streams are tested with a shorter lane length (the same decoder,
STEPS_PER_LANE lowered for encoder, reference and kernel alike). With `--gpu` (tests/conftest_gpu.py) the same
tests run compiled on CUDA, plus streams at the real lane length and larger tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from coder_inputs import random_streams  # noqa: E402
from kvcli.codecs import entropy, rans  # noqa: E402
from kvcli.codecs.kvq import KvqCodec  # noqa: E402
from kvcli.codecs.kvq_ops.dequantize import dequantize_rotate_ref  # noqa: E402
from kvcli.kernels import rans_decode  # noqa: E402
from kvcli.codecs.kvq_ops.dequantize_triton import dequantize_rotate  # noqa: E402
from kvcli.codecs.kvq_ops.quantize import quantize_segment_ref  # noqa: E402
from kvcli.codecs.kvq_ops.quantize_triton import quantize_unrotate  # noqa: E402

from kvcli.container import format, kvfile  # noqa: E402
from kvcli.modeling.kvcache import KVCache  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def freq_tables(rng) -> rans.Tables:
    """Skewed, flat and extreme tables: one symbol at frequency 1 beside one at 2^16 - 2."""
    skewed = rans.normalize_counts(np.bincount(rng.geometric(0.3, 600), minlength=41))
    flat = rans.normalize_counts(np.ones(626))
    extreme = np.array([1, rans.TOTAL - 2, 1], dtype=np.uint32)
    return rans.Tables([skewed, flat, extreme])


def decode_both(tables, jobs, device):
    """(reference result or error, kernel result or error), each a list of uint16 arrays or (message, index)."""
    def run(fn):
        try:
            return fn()
        except rans.StreamError as err:
            return (str(err), err.index)

    want = run(lambda: rans.decode_streams(tables, jobs))
    dt = rans_decode.DeviceTables(tables, device)

    def kernel():
        flat = rans_decode.decode_streams(dt, jobs).cpu().numpy().view(np.uint16)
        return np.split(flat, np.cumsum([len(t) for t, _ in jobs])[:-1]) if jobs else []

    return want, run(kernel)


def assert_same(want, got):
    if isinstance(want, tuple):
        assert got == want
    else:
        assert not isinstance(got, tuple), got
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(want, got))


# ---------------------------------------------------------------- rANS


def test_rans_single_lane_streams(device, gpu):
    """Real lane length: one lane each on CPU (1 to 40 symbols, an empty stream among them)."""
    rng = np.random.default_rng(1)
    tables = freq_tables(rng)
    sizes = [1, 0, 2, 17, 40] + ([1023, 1024, 1025, 2048, 5000, 70001] if gpu else [])
    streams = random_streams(rng, tables, sizes)
    coded = rans.encode_streams(tables, streams)
    want, got = decode_both(tables, [(t, c) for (_, t), c in zip(streams, coded)], device)
    assert_same(want, got)
    assert all(np.array_equal(w, s) for w, (s, _) in zip(want, streams))


def test_rans_many_lanes(device, gpu, short_lanes):
    """Lane counts around the block sizes (1, 2, 31, 33, 67 lanes), streams of different lengths in one batch."""
    rng = np.random.default_rng(2)
    tables = freq_tables(rng)
    per = rans.STEPS_PER_LANE
    sizes = [1, per, per + 1, 31 * per, 33 * per - 1, 67 * per - 2, 5]
    if gpu:
        sizes += list(rng.integers(1, 300_000, 300))
    streams = random_streams(rng, tables, sizes)
    coded = rans.encode_streams(tables, streams)
    want, got = decode_both(tables, [(t, c) for (_, t), c in zip(streams, coded)], device)
    assert_same(want, got)
    assert all(np.array_equal(w, s) for w, (s, _) in zip(want, streams))


def damaged(rng, tables) -> list[tuple[str, list]]:
    """Batches in which the second of three streams is damaged one way; the kernel must refuse it as numpy does."""
    per = rans.STEPS_PER_LANE
    streams = random_streams(rng, tables, [5, 8 * per + 1, 4])
    coded = rans.encode_streams(tables, streams)
    tid = streams[1][1]
    st = coded[1]
    assert len(st.words) > 2

    def swap(stream):
        return [(streams[0][1], coded[0]), (tid, stream), (streams[2][1], coded[2])]

    flipped = st.words.copy()
    flipped[len(flipped) // 2] ^= 0x0101
    state = st.states.copy()
    state[-1] ^= 0x00010000
    cases = [
        ("a word flipped", swap(rans.Stream(st.states, flipped))),
        ("a word missing", swap(rans.Stream(st.states, st.words[:-1]))),
        ("a word extra", swap(rans.Stream(st.states, np.concatenate([st.words, st.words[:1]])))),
        ("a state changed", swap(rans.Stream(state, st.words))),
        ("a state too low", swap(rans.Stream(np.where(np.arange(len(state)) == 0, 5, st.states).astype(np.uint32),
                                              st.words))),
    ]
    return cases


def test_rans_refuses_what_the_reference_refuses(device, short_lanes):
    rng = np.random.default_rng(3)
    tables = freq_tables(rng)
    for what, jobs in damaged(rng, tables):
        want, got = decode_both(tables, jobs, device)
        assert isinstance(want, tuple), what  # the damage is detectable at all
        assert want[1] == 1, what
        assert got == want, what


def test_device_tables_are_the_reference_lookup(device):
    tables = freq_tables(np.random.default_rng(5))
    sym_lut, step_lut = tables.lookup()
    dt = rans_decode.DeviceTables(tables, device)
    assert np.array_equal(dt.sym_lut.cpu().numpy().view(np.uint16), sym_lut)
    assert np.array_equal(dt.step_lut.cpu().numpy().view(np.uint32), step_lut)


def test_rope_tables_on_device_equal_the_references_for_any_range(device):
    from kvcli.codecs.kvq_ops.rope import rope_tables, rope_tables_on

    freq = rope(16, True)
    for start, tokens in ((0, 3), (4000, 200), (70000, 5), (17, 1)):  # the second and third grow the table
        cos, sin = rope_tables_on(freq, start, tokens, device)
        want_cos, want_sin = rope_tables(freq, start, tokens)
        assert torch.equal(cos.cpu(), want_cos) and torch.equal(sin.cpu(), want_sin)


def test_rans_launcher_refuses_sizes_the_caller_must_check(device, short_lanes):
    """Lane and word counts are checked against the segment's limits before either decoder runs."""
    rng = np.random.default_rng(4)
    tables = freq_tables(rng)
    dt = rans_decode.DeviceTables(tables, device)
    ((sym, tid),) = random_streams(rng, tables, [4 * rans.STEPS_PER_LANE + 1])
    (st,) = rans.encode_streams(tables, [(sym, tid)])
    for bad in (rans.Stream(st.states[:-1], st.words), rans.Stream(st.states, np.zeros(len(tid) + 1, np.uint16))):
        with pytest.raises(ValueError, match="lanes and"):
            rans_decode.decode_streams(dt, [(tid, bad)])


# ---------------------------------------------------------------- kvq segments, real entropy data


def kvq_segments(seed: int, tokens: int, heads: int, dim: int, outliers: float):
    """A small kvq file's decoder and (table ids, stream) per segment; `outliers` of the values are far out,
    so many tuples escape."""
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for _ in range(2):
        k = torch.randn(heads, tokens, dim, generator=g) + torch.randn(heads, 1, dim, generator=g) * 4
        v = torch.randn(heads, tokens, dim, generator=g)
        far = torch.rand(heads, tokens, dim, generator=g) < outliers
        keys.append(torch.where(far, k * 40, k))
        values.append(torch.where(far, v * 40, v))
    kv = KVCache(list(range(tokens)), keys, values)
    freqs = [1.0 / (10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim)) for _ in range(2)]
    ident = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}
    meta, parts = kvfile.encode(kv, ident, KvqCodec(0.3, 1, None, freqs), 16)
    src = format.BytesSource(format.build_header(meta, parts) + b"".join(p.data for p in parts))
    header = format.read_header(src)
    decoder = kvfile.open_decoder(src, header)[1]
    jobs = []
    for seg, ctx in zip(*kvfile._segments(header)):
        _, skip, lim = decoder._segment(ctx)
        coded = entropy.split_segment(format.read_segment(src, header, seg), lim)
        kind = ("k", "v").index(ctx.kind)
        ids = decoder._table_ids(ctx, skip, decoder._entropy_layout(ctx.layer, kind, ctx.tokens - skip))
        if ids is None:  # before version 4: each group's class table
            ids = np.concatenate([np.full(g.tuples(ctx.tokens - skip), decoder.tables.index(g.cls), np.uint32)
                                  for g in decoder._groups[(ctx.layer, kind)]] + [np.zeros(0, np.uint32)])
        jobs.append((ids.astype(np.uint32), coded.stream))
    return decoder, jobs


@pytest.mark.parametrize("outliers", [0.0, 0.3])
def test_rans_decodes_kvq_segments(device, gpu, short_lanes, outliers):
    tokens = 300 if gpu else 40
    decoder, jobs = kvq_segments(7, tokens, 2, 8, outliers)
    assert jobs and sum(len(t) for t, _ in jobs) > 0
    want, got = decode_both(decoder.tables.coder, jobs, device)
    assert not isinstance(want, tuple)
    assert_same(want, got)
    if outliers:
        escapes = sum(int(np.count_nonzero(w == len(decoder.tables.coder.freqs[t[0]]) - 1)) for w, (t, _) in
                      zip(want, jobs) if len(t))
        assert escapes > 0


# ---------------------------------------------------------------- quantize and dequantize


def cache_view(heads: int, tokens: int, dim: int, dtype, device, g, spare: int = 3) -> torch.Tensor:
    """(heads, tokens, dim) view into a transformers-style (1, heads, capacity, dim) buffer with spare tokens."""
    buf = (torch.randn(1, heads, tokens + spare, dim, generator=g) * 3).to(dtype).to(device)
    return buf[0, :, :tokens]


def plan(heads, dim, g, device, step_scale=0.05):
    center = torch.randn(heads, dim, generator=g).half().float().to(device)
    step = (torch.rand(heads, dim, generator=g) * step_scale + 0.002).half().float().to(device)
    return center, step


def rope(dim: int, rotate: bool):
    return torch.from_numpy(1.0 / (10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))) if rotate else None


SHAPES = [(1, 1, 2), (3, 7, 6), (2, 65, 64), (1, 130, 10), (2, 3, 128)]


def test_quantize_rounds_ties_to_even_and_keeps_large_levels(device):
    center = torch.zeros(1, 6, device=device)
    step = torch.tensor([[0.5, 0.25, 1.0, 1.0, 2.0**-14, 1.0]], device=device)
    levels = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0, 2.0**22 + 0.5, -(2.0**23) - 1, 2.0**30])
    x = (levels[None, :, None] * step[0].cpu()[None, None, :]).to(device)  # (1, tokens, 6)
    got = quantize_unrotate(x, center, step, None, 0)
    want = quantize_segment_ref(x, center, step, None, 0)
    assert torch.equal(got, want)
    assert got[0, 2, :7].tolist() == [0, 2, 2, 0, -2, -2, 3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,tokens,dim", SHAPES)
@pytest.mark.parametrize("rotate", [False, True])
def test_dequantize_into_cache_matches_reference(device, dtype, heads, tokens, dim, rotate):
    g = torch.Generator().manual_seed(heads * 1000 + tokens * 10 + dim + 1)
    q = torch.randint(-300, 300, (heads, dim, tokens), generator=g, dtype=torch.int32).to(device)
    center, step = plan(heads, dim, g, device)
    freq = rope(dim, rotate)
    buf = torch.full((1, heads, tokens + 3, dim), 7.0, dtype=dtype, device=device)
    out = buf[0, :, :tokens]
    assert dequantize_rotate(q, center, step, freq, 99, out=out) is out
    ref = dequantize_rotate_ref(q.cpu(), center.cpu(), step.cpu(), freq, 99)
    if dtype == torch.float16:
        ref = ref.clamp(-65504, 65504)
    want = torch.empty((heads, tokens, dim), dtype=dtype)
    want.copy_(ref.transpose(1, 2))
    assert torch.equal(out.cpu(), want)
    assert (buf[0, :, tokens:] == 7).all()  # nothing written past the view
    plain = dequantize_rotate(q, center, step, freq, 99)  # float32 channel-major, as the reference returns
    assert torch.equal(plain.cpu(), dequantize_rotate_ref(q.cpu(), center.cpu(), step.cpu(), freq, 99))


def test_dequantize_clamps_float16_and_rounds_bfloat16_to_even(device):
    q = torch.tensor([[[1, -1, 0, 0]], [[0, 0, 1, 3]]], dtype=torch.int32, device=device).reshape(2, 1, 4)
    center = torch.tensor([[65500.0], [1.0]], device=device)
    step = torch.tensor([[30.0], [2.0**-8]], device=device)
    half_out = torch.empty(2, 4, 1, dtype=torch.float16, device=device)
    dequantize_rotate(q, center, step, None, 0, out=half_out)
    assert half_out[0, :, 0].tolist() == [65504.0, 65472.0, 65504.0, 65504.0]
    bf_out = torch.empty(2, 4, 1, dtype=torch.bfloat16, device=device)
    dequantize_rotate(q, center, step, None, 0, out=bf_out)
    want = torch.add(q.cpu().float() * step.cpu()[..., None], center.cpu()[..., None]).transpose(1, 2)
    assert torch.equal(bf_out.cpu(), want.to(torch.bfloat16))
    assert bf_out[1, 2, 0].item() == 1.0  # 1 + 2^-8 is a tie: to even, not truncated away from it by chance


def test_kernels_round_trip_within_half_a_step(device):
    g = torch.Generator().manual_seed(11)
    x = cache_view(4, 77, 32, torch.float32, device, g)
    center, step = plan(4, 32, g, device)
    freq = rope(32, True)
    out = torch.empty_like(x)
    dequantize_rotate(quantize_unrotate(x, center, step, freq, 5), center, step, freq, 5, out=out)
    bound = step.max().item() * 2**0.5 / 2 + 1e-5
    assert (out - x).abs().max().item() <= bound


def test_launchers_refuse_odd_rotary_dims_and_wrong_outputs(device):
    q = torch.zeros(1, 3, 2, dtype=torch.int32, device=device)
    ones = torch.ones(1, 3, device=device)
    with pytest.raises(ValueError, match="even head_dim"):
        dequantize_rotate(q, ones, ones, torch.ones(1), 0)
    with pytest.raises(ValueError, match="even head_dim"):
        quantize_unrotate(torch.zeros(1, 2, 3, device=device), ones, ones, torch.ones(1), 0)
    with pytest.raises(ValueError, match="out must be"):
        dequantize_rotate(q, ones, ones, None, 0, out=torch.empty(1, 3, 2, device=device))
