"""One parity test per operation of kvq's arithmetic (codecs/kvq_ops/): every form of it, torch (the reference),
C and Triton where the operation has them, gives the same bits.

Triton runs under TRITON_INTERPRET=1 on the CPU (set in conftest), compiled on CUDA with `pytest --gpu`. The crafted
edge cases of each form (casts, clamps, refusals) stay with its own tests: tests/test_fast_decode.py,
tests/test_fast_encode.py, tests/test_kernels*.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvcli.codecs import entropy
from kvcli.codecs.kvq_ops import dequantize, quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 2), (3, 7, 6), (2, 65, 64), (1, 130, 10), (2, 3, 128)]  # (heads, tokens, dim)


def inv_freq(dim: int) -> torch.Tensor:
    return torch.from_numpy(1.0 / (10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim)))


def triton_forms():
    """The Triton modules, or None where triton is not installed (the CPU-only install)."""
    try:
        from kvcli.codecs.kvq_ops import dequantize_triton, quantize_triton
    except ImportError:
        return None
    return quantize_triton, dequantize_triton


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("dim", [10, 16])  # blocks of 4 x 4 where a half is a multiple of 4, else scalar only
def test_to_channels(rope, dim):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, dim, generator=g) * 7
    every_other = torch.randn(3, 50, 2 * dim, generator=g)[:, :, ::2]  # channels not contiguous
    freq = inv_freq(dim) if rope else None
    views = (x[:, 3:41], x.transpose(0, 1).contiguous().transpose(0, 1)[:, 1:], x[:, 7:8], every_other[:, 2:40])
    for view in views:
        assert torch.equal(quantize.to_channels(view, freq, 5), quantize.to_channels_ref(view, freq, 5))


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), 3e38])
def test_deviations(bad):
    g = torch.Generator().manual_seed(1)
    body = torch.randn(3, 4, 33, generator=g) * 100
    center = body.mean(dim=2).half().float()
    factor = torch.exp2(torch.randint(-24, 25, (3, 33), generator=g).float() / 8)
    if bad is not None:
        body[1, 2, 7] = bad
    for f in (None, factor):
        spread, squares = quantize.deviations(body, center, f)
        spread_ref, squares_ref = quantize.deviations_ref(body, center, f)
        assert torch.equal(spread.nan_to_num(-1.0), spread_ref.nan_to_num(-1.0))
        assert torch.equal(squares.nan_to_num(-1.0), squares_ref.nan_to_num(-1.0))


def test_quantize_classes():
    """Values on exact ties (n + 1/2 steps from the center), near 2^23 steps, at 2^15 and signed zeros."""
    g = torch.Generator().manual_seed(0)
    heads, dim, tokens = 2, 5, 64
    center = (torch.randn(heads, dim, generator=g) * 4).half().float()
    step = torch.exp2(torch.randint(-6, 4, (heads, dim), generator=g).float())
    n = torch.randint(-40, 40, (heads, dim, tokens), generator=g).float()
    n[0, 0, :8] = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, -0.0, 0.0])
    n[1, 1, :6] = torch.tensor([2.0**23 - 0.5, -(2.0**23) + 1.5, 2.0**23 + 2, 32767.5, -32768.5, 2.0**24])
    body = center[..., None] + n * step[..., None]
    factor = torch.exp2(torch.randint(-3, 4, (heads, tokens), generator=g).float())  # powers of two keep the ties
    for f in (None, factor):
        x = body if f is None else center[..., None] + n * step[..., None] * f[:, None, :]
        q, classes = quantize.quantize_classes(x, center, step, f)
        q_ref, classes_ref = quantize.quantize_classes_ref(x, center, step, f)
        assert q.dtype == q_ref.dtype == torch.int32 and torch.equal(q, q_ref)
        assert np.array_equal(classes, classes_ref)
    small = body[:, :, 10:]
    small = center[..., None] + (small - center[..., None]).clamp(-30, 30)
    q, classes = quantize.quantize_classes(small, center, step, None)
    q_ref, classes_ref = quantize.quantize_classes_ref(small, center, step, None)
    assert q.dtype == q_ref.dtype == torch.int16 and torch.equal(q, q_ref) and np.array_equal(classes, classes_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,tokens,dim", SHAPES)
@pytest.mark.parametrize("rope", [False, True])
def test_quantize_segment(device, dtype, heads, tokens, dim, rope):
    """A segment in the cache's own layout (a strided slice of a (tokens, heads, dim) buffer), with token weights,
    its values on ties of the rounding where they are exactly representable."""
    g = torch.Generator().manual_seed(heads * 1000 + tokens * 10 + dim)
    center = (torch.randn(heads, dim, generator=g) * 3).half().float()
    step = torch.exp2(torch.randint(-8, 2, (heads, dim), generator=g).float())
    halves = torch.randint(-600, 600, (heads, dim, tokens), generator=g).float() / 2  # n + 1/2 steps: ties
    x = (center[..., None] + halves * step[..., None]).transpose(1, 2).to(dtype)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # (heads, tokens, dim) view of a (tokens, heads, dim) buffer
    factor = torch.exp2(torch.randint(-24, 25, (heads, tokens), generator=g).float() / 8)
    freq = inv_freq(dim) if rope else None
    for f in (None, factor):
        want = quantize.quantize_segment_ref(x, center, step, freq, 1234, f)
        assert torch.equal(quantize.quantize_segment(x, center, step, freq, 1234, f), want)
        forms = triton_forms()
        if forms is not None:
            got = forms[0].quantize_unrotate(x.to(device), center.to(device), step.to(device), freq, 1234,
                                             f.to(device) if f is not None else None)
            assert torch.equal(got.cpu(), want)


def as_symbols(q: np.ndarray) -> tuple[entropy.Symbols, entropy.ClassTables]:
    """Integers q (heads, dim, tokens) of any value as a decoded segment: one group of class 16 (m = 1, K = 255)
    whose every symbol is the escape, so each integer comes from the escapes as it is."""
    heads, dim, tokens = q.shape
    tables = entropy.tables_of({16: np.ones(entropy.alphabet(16), np.int64)})
    layout = entropy.Layout.of([entropy.Group(16, np.arange(heads * dim, dtype=np.int64))], tokens, tables)
    symbols = np.full(heads * dim * tokens, entropy.alphabet(16) - 1, np.uint16)
    return entropy.Symbols(layout, symbols, np.ascontiguousarray(q, dtype=np.int32).reshape(-1)), tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,tokens,dim", SHAPES)
@pytest.mark.parametrize("rope", [False, True])
def test_dequantize(device, dtype, heads, tokens, dim, rope):
    """Wide-ranging integers, centres and steps, with and without token weights, into channel-major storage, a
    plain (heads, tokens, dim) tensor (strided writes) and a slice in the middle of a larger one."""
    rng = np.random.default_rng(heads * 1000 + tokens * 10 + dim)
    q = (rng.standard_normal((heads, dim, tokens)) * 10.0 ** rng.integers(0, 6, (heads, dim, 1))).astype(np.int32)
    center = torch.from_numpy(rng.standard_normal((heads, dim)).astype(np.float32) * 100).half().float()
    step = torch.from_numpy(np.exp(rng.uniform(-12, 4, (heads, dim))).astype(np.float32)).half().float()
    factor = torch.from_numpy(np.float32(2.0 ** (rng.integers(-24, 25, (heads, tokens)) / 8)))
    freq = inv_freq(dim) if rope else None
    symbols, tables = as_symbols(q)
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]

    def outputs(where):
        channel_major = torch.full((heads, dim, tokens + 9), float("nan"), dtype=dtype, device=where).transpose(1, 2)
        return (channel_major[:, :tokens], torch.full((heads, tokens, dim), float("nan"), dtype=dtype, device=where),
                channel_major[:, 4 : 4 + tokens])

    for f in (None, factor):
        want = torch.empty((heads, tokens, dim), dtype=dtype)
        dequantize.reconstruct_ref(symbols, tables, center, step, freq, 1234, f, want, name)
        for out in outputs("cpu"):
            dequantize.reconstruct(symbols, tables, center.reshape(-1).numpy(), step.reshape(-1).numpy(), freq, 1234, f,
                                   out)
            assert torch.equal(bits(out), bits(want))
        forms = triton_forms()
        for out in outputs(device) if forms is not None else ():
            forms[1].dequantize_rotate(torch.from_numpy(q).to(device), center.to(device), step.to(device), freq, 1234,
                                       out, f.to(device) if f is not None else None)
            assert torch.equal(bits(out.cpu()), bits(want))


def transform_case(rng: np.random.Generator, heads: int, tokens: int, dim: int, wide):
    """int16 matrices M (heads, dim, dim) and integers q (heads, dim, tokens) int32 in one of the C form's regimes
    (transform.c), by the bound B = max|q| times M's largest row sum of |M|:
    - False: rounded orthonormal columns times 2^10 (what calibration writes) and integers of kvq's usual spread,
      many pairs of rows zero over 16-token tiles (B < 2^24 and |q| < 2^15: int16 pairs with AVX-512 VNNI, else
      float32);
    - "mid": entries of M in {-1, 0, 1} and |q| from 2^15 to 60,000 (B < 2^24 but q past int16: float32);
    - True ("wide"): any int16 and |q| up to 2^30 - 1 (M q up to 2^53 for dim 256: int64)."""
    if wide == "mid":
        matrix = rng.integers(-1, 2, (heads, dim, dim)).astype(np.int16)
        q = rng.integers(-60000, 60001, (heads, dim, tokens)).astype(np.int32)
        q[..., 0] = 1 << 15
    elif wide:
        matrix = rng.integers(-(1 << 15), 1 << 15, (heads, dim, dim)).astype(np.int16)
        q = rng.integers(-(1 << 30) + 1, 1 << 30, (heads, dim, tokens)).astype(np.int32)
    else:
        basis = np.linalg.qr(rng.standard_normal((heads, dim, dim)))[0]
        matrix = np.rint(basis * 1024).astype(np.int16)
        q = np.rint(rng.standard_normal((heads, dim, tokens)) * 10.0 ** rng.integers(0, 3, (heads, dim, 1)))
        q = q.astype(np.int32)
        # Pairs of components zero over whole 16-token tiles, as trailing components mostly are: transform.c's
        # VNNI path skips those.
        for h, k, t in zip(*(rng.integers(0, n, 4 * dim) for n in (heads, (dim + 1) // 2, tokens // 16 + 1))):
            q[h, 2 * k : 2 * k + 2, 16 * t : 16 * t + 16] = 0
    return matrix, q


def float32_components(body, center, step, factor, inverse) -> np.ndarray:
    """round(inverse @ u) with everything in float32 and nothing redone: what quantize_components would write
    without its float64 fallback."""
    size = step.numpy()[..., None] if factor is None else step.numpy()[..., None] * factor.numpy()[:, None, :]
    u = (body.numpy() - center.numpy()[..., None]) / size
    return np.rint(np.asarray(inverse, np.float32) @ u).astype(np.int64)


@pytest.mark.parametrize("heads,tokens,dim", SHAPES + [(1, 40, 1), (2, 37, 256), (1, 2, 200)])
def test_quantize_components(heads, tokens, dim):
    """The encoder's component integers and classes in C (float32, redone in float64 where its bound says so)
    against the float64 reference, on calibration-like matrices (rounded orthonormal bases, Transforms.inverse) and
    values up to thousands of steps, where float32 alone rounds many components the other way."""
    from kvcli.codecs.kvq_ops import transform
    from kvcli.codecs.transform import Transforms

    rng = np.random.default_rng(heads * 1000 + tokens * 10 + dim)
    basis = np.linalg.qr(rng.standard_normal((heads, dim, dim)))[0]
    inverse = Transforms.from_bases({(0, 0): basis}).inverse((0, 0))
    center = torch.from_numpy(rng.standard_normal((heads, dim)).astype(np.float32) * 10).half().float()
    step = torch.from_numpy(np.exp(rng.uniform(-6, 1, (heads, dim))).astype(np.float32)).half().float()
    spread = 10.0 ** rng.uniform(-1, 3.5, (heads, dim, 1))  # per component, in steps
    u = basis @ (rng.standard_normal((heads, dim, tokens)) * spread)
    body = torch.from_numpy((u * step.numpy()[..., None] + center.numpy()[..., None]).astype(np.float32))
    factor = torch.from_numpy(np.float32(2.0 ** (rng.integers(-24, 25, (heads, tokens)) / 8)))
    differs = 0
    for f in (None, factor):
        q, classes = transform.quantize_components(body, center, step, f, inverse)
        q_ref, classes_ref = transform.quantize_components_ref(body, center, step, f, inverse)
        assert q.dtype == q_ref.dtype and torch.equal(q, q_ref) and np.array_equal(classes, classes_ref)
        differs += int((float32_components(body, center, step, f, inverse) != q_ref.numpy()).sum())
    if heads * tokens * dim > 10_000:
        assert differs  # float32 alone would not have passed


def test_quantize_components_boundaries():
    """Components within a hair of a half-integer, where float32 rounds the other way: a matrix entry float32
    cannot hold (1 +- 2^-30), an integer past 2^23 (no fraction bits in float32) and past int16, a difference x -
    center exact only in float64 (the smallest float16 center). Each head is one case: (inverse, center, step,
    values)."""
    from kvcli.codecs.kvq_ops import _kvq, transform

    cases = [(1 + 2.0**-30, 0.0, 1.0, [0.5, 2.5, -2.5, 4.5, 1000.5, -7.5, 3.0, -0.5]),
             (1 - 2.0**-30, 0.0, 1.0, [1.5, -1.5, 5.5, 0.5, -1000.5, 2.0, 7.5, -3.5]),
             (2.0**10 * (1 + 2.0**-40), -(2.0**-14), 2.0**-3, [2.0**10, -(2.0**10), 2.0**9, 1.0, 3.0, 0.0, 5.0, 7.0]),
             (1.0, -(2.0**-24), 1.0, [2.5, 4.5, 0.5, 6.5, 100.5, 8.5, -1.5, -3.5])]
    inverse = np.array([[[a]] for a, *_ in cases])
    center = torch.tensor([[c] for _, c, _, _ in cases], dtype=torch.float32)
    step = torch.tensor([[s] for _, _, s, _ in cases], dtype=torch.float32)
    body = torch.tensor([[x] for *_, x in cases], dtype=torch.float32)
    q, _ = transform.quantize_components(body, center, step, None, inverse)
    q_ref, _ = transform.quantize_components_ref(body, center, step, None, inverse)
    assert q.dtype == q_ref.dtype == torch.int32 and torch.equal(q, q_ref)
    assert int(q_ref[2, 0, 0]) == 2**23 + 1  # 2^23 + 1/2 and a hair
    naive = float32_components(body, center, step, None, inverse)
    assert (naive != q_ref.numpy()).sum() >= 8  # the cases have teeth
    redone = _kvq.quantize_components(body.numpy(), center.numpy(), step.numpy(), None, inverse, len(cases),
                                      torch.empty(body.shape, dtype=torch.int32).numpy(), np.empty((len(cases), 1)))
    assert redone >= (naive != q_ref.numpy()).sum()
    # Outside the bound's proof (a step times factor not a normal float32, or not finite): refused, not guessed.
    for tiny_step, factor in ((2.0**-70, 2.0**-60), (1.0, float("inf")), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="steps times token factors"):
            _kvq.quantize_components(body.numpy(), center.numpy(), np.full(step.shape, tiny_step, np.float32),
                                     np.full((len(cases), 8), factor, np.float32), inverse, len(cases),
                                     torch.empty(body.shape, dtype=torch.int32).numpy(), np.empty((len(cases), 1)))


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("heads,tokens,dim", SHAPES + [(1, 5, 256)])
def test_untransform(device, heads, tokens, dim, wide):
    """M q exact, rounded once to float32, times 2^-10: the torch reference and the Triton form (its dot product in
    float32, or for wide integers its float64 fallback) against int64 arithmetic. (The C form runs inside
    reconstruct: test_reconstruct_transformed.)"""
    from kvcli.codecs.kvq_ops import transform

    rng = np.random.default_rng(heads * 1000 + tokens * 10 + dim + wide)
    matrix, q = transform_case(rng, heads, tokens, dim, wide)
    exact = np.einsum("hij,hjt->hit", matrix.astype(np.int64), q.astype(np.int64))
    want = torch.from_numpy(exact.astype(np.float32) * np.float32(2.0**-10))  # int64 -> float32: one rounding
    assert torch.equal(bits(transform.untransform_ref(torch.from_numpy(q), torch.from_numpy(matrix))), bits(want))
    if triton_forms() is not None:
        from kvcli.codecs.kvq_ops import transform_triton

        largest = int(np.abs(q.astype(np.int64)).max())
        assert (largest * transform_triton.row_sum(torch.from_numpy(matrix)) < transform_triton.FLOAT32_EXACT) != wide
        got = transform_triton.untransform(torch.from_numpy(q).to(device), torch.from_numpy(matrix).to(device), largest)
        assert torch.equal(bits(got.cpu()), bits(want))


@pytest.mark.parametrize("heads,dim", [(1, 1), (2, 7), (3, 10), (1, 64), (2, 256)])
def test_prepare(heads, dim):
    """transform.prepare, what transform.c's product reads: each row's int16 pairs (M[i][2k], M[i][2k + 1]) in one
    int32 (low half first), rows padded with zeros to a multiple of 8 (an odd dim's last pair with a zero), the
    matrix's own bytes where dim is a multiple of 8; and the largest row sum of |M|, which with max |q| bounds the
    product's int32 sums."""
    from kvcli.codecs.kvq_ops import transform

    rng = np.random.default_rng(heads * 1000 + dim)
    matrix = rng.integers(-(1 << 15), 1 << 15, (heads, dim, dim)).astype(np.int16)
    prepared = transform.prepare(matrix)
    rows, pairs = -(-dim // 8) * 8, (dim + 1) // 2
    wide = np.zeros((heads, rows, 2 * pairs), np.int64)
    wide[:, :dim, :dim] = matrix
    want = (wide[..., 0::2] & 0xFFFF) | (wide[..., 1::2] << 16)
    assert prepared.pairs.shape == (heads, rows, pairs) and prepared.pairs.dtype == np.int32
    assert np.array_equal(prepared.pairs.astype(np.int64) & 0xFFFFFFFF, want & 0xFFFFFFFF)
    assert prepared.row_sum == int(np.abs(matrix.astype(np.int64)).sum(axis=2).max())
    assert np.shares_memory(prepared.pairs, prepared.matrix) == (dim % 8 == 0)


def test_reconstruct_transformed_int32_bound():
    """transform.c's VNNI product sums in int32, so it takes integers only where max |q| times M's largest row sum
    of |M| stays below 2^31: with every entry 32767 and dim 64, at most 1023. At 1023 the product runs (its sums
    reach 2^31 - 2^21.04); at 1025, below 2^15 still, a token's sums pass 2^31 and must go through the wider loops.
    Both against the torch reference."""
    heads, dim, tokens = 1, 64, 20
    matrix = np.full((heads, dim, dim), 32767, np.int16)
    center, step = torch.zeros((heads, dim)), torch.ones((heads, dim))
    for top in (1023, 1025):
        q = np.ones((heads, dim, tokens), np.int32)
        q[..., 3] = top  # a token whose every component is the largest
        q[0, 5, 7] = -top
        symbols, tables = as_symbols(q)
        want = torch.empty((heads, tokens, dim))
        dequantize.reconstruct_ref(symbols, tables, center, step, None, 0, None, want, "float32",
                                   torch.from_numpy(matrix))
        assert (float(want[0, 3, 0]) * 1024 >= 2**31) == (top == 1025)  # M q itself, times 2^-10
        out = torch.full((heads, dim, tokens), float("nan")).transpose(1, 2)
        dequantize.reconstruct(symbols, tables, center.reshape(-1).numpy(), step.reshape(-1).numpy(), None, 0,
                               None, out, matrix)
        assert torch.equal(bits(out), bits(want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rope", [False, True])
def test_reconstruct_transformed_rounding(dtype, rope):
    """The casts of transform.c's direct path (16 lanes) at their edges, against the torch reference: with M = 2^10 I
    the values are q * step exactly (then a centre of 1/2 on one channel), so odd integers past 2^11 and 2^8 are
    float16 and bfloat16 ties, steps of 2^-24 and 2^-25 put integers among float16 subnormals and their ties, and a
    step of 4 takes values past 65504, where float16 clamps. 40 tokens: a partial last tile."""
    heads, dim, tokens = 1, 16, 40
    matrix = np.eye(dim, dtype=np.int16)[None] * np.int16(1 << 10)
    t = np.arange(tokens)
    rows = [2049 + 2 * t, t - 20, 2 * t - 39, 16370 + t, 4097 + 2 * t, 500 * t + 1, 2 * t + 1, 257 + 2 * t]
    q = np.array(rows + [-r for r in rows], np.int32)[None]
    step = torch.tensor([[1.0, 2.0**-24, 2.0**-25, 4.0, 1.0, 2.0**-20, 0.75, 1.0] * 2], dtype=torch.float32)
    center = torch.zeros((heads, dim), dtype=torch.float32)
    center[0, 4] = 0.5
    symbols, tables = as_symbols(q)
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    freq = inv_freq(dim) if rope else None
    want = torch.empty((heads, tokens, dim), dtype=dtype)
    dequantize.reconstruct_ref(symbols, tables, center, step, freq, 0, None, want, name, torch.from_numpy(matrix))
    for out in (torch.full((heads, dim, tokens), float("nan"), dtype=dtype).transpose(1, 2),
                torch.empty((heads, tokens, dim), dtype=dtype)):
        dequantize.reconstruct(symbols, tables, center.reshape(-1).numpy(), step.reshape(-1).numpy(), freq, 0, None,
                               out, matrix)
        assert torch.equal(bits(out), bits(want))
    if dtype == torch.float16 and not rope:  # the edges are there
        values = want.float().abs()
        assert values.max() == 65504 and ((values < 2.0**-14) & (values > 0)).any()


@pytest.mark.parametrize("wide", [False, "mid", True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,tokens,dim,rope", [(*shape, rope) for shape in SHAPES + [(2, 37, 256)]
                                                    for rope in (False, True)] + [(2, 21, 7, False)])
def test_reconstruct_transformed(dtype, heads, tokens, dim, rope, wide):
    """A transformed segment's reconstruction in C (dequantize.reconstruct with the matrices: transform.c's M q in
    each of its regimes, transform_case) against the torch reference, into the output layouts of test_dequantize.
    Channel-major outputs take transform.c's direct path with AVX-512 VNNI (its rotation in paired row blocks
    where dim is a multiple of 8, the last 16-token tile partial for most shapes, an odd dim's matrix padded), the
    others its float32 buffer. (Keys rotate pairs of channels: an odd dim has no rotation.)"""
    rng = np.random.default_rng(heads * 1000 + tokens * 10 + dim + 7 + (wide is True) + 2 * (wide == "mid"))
    matrix, q = transform_case(rng, heads, tokens, dim, wide)
    center = torch.from_numpy(rng.standard_normal((heads, dim)).astype(np.float32) * 100).half().float()
    step = torch.from_numpy(np.exp(rng.uniform(-12, 4, (heads, dim))).astype(np.float32)).half().float()
    if wide:  # values that stay finite in every dtype
        step = torch.full((heads, dim), 2.0**-40 if wide is True else 2.0**-4)
    factor = torch.from_numpy(np.float32(2.0 ** (rng.integers(-24, 25, (heads, tokens)) / 8)))
    freq = inv_freq(dim) if rope else None
    symbols, tables = as_symbols(q)
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    channel_major = torch.full((heads, dim, tokens + 9), float("nan"), dtype=dtype).transpose(1, 2)
    for f in (None, factor):
        want = torch.empty((heads, tokens, dim), dtype=dtype)
        dequantize.reconstruct_ref(symbols, tables, center, step, freq, 1234, f, want, name, torch.from_numpy(matrix))
        for out in (channel_major[:, :tokens], torch.empty((heads, tokens, dim), dtype=dtype),
                    channel_major[:, 4 : 4 + tokens]):
            dequantize.reconstruct(symbols, tables, center.reshape(-1).numpy(), step.reshape(-1).numpy(), freq, 1234, f,
                                   out, matrix)
            assert torch.equal(bits(out), bits(want))
