"""kvq version 4's per-head transform (codecs/transform.py, codecs/kvq_ops/transform.py): the matrices' bytes and
their refusals, the header param `dictionary`, the codec's refusals without the transform, and files coded with
one decoding bit for bit as the independent reference decoder (tests/kvq_reference.py) computes them.

The bases are fitted here, on the test's own cache: the eigenvectors of each head's covariance in kvq's unit-step
space, what calibration learns on its texts."""

from __future__ import annotations

import hashlib
import struct

import kvq_reference
import numpy as np
import pytest
import torch
import zstandard
from kvcli.codecs.base import CodecError, SegmentContext
from kvcli.codecs.kvq import KvqCodec
from kvcli.codecs.kvq_ops import quantize
from kvcli.codecs.registry import codec_from_header
from kvcli.codecs.transform import MAX_DIM, SCALE_BITS, Transforms
from kvcli.container import format, kvfile
from kvcli.errors import FormatError
from kvcli.modeling.kvcache import KVCache

IDENT = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYERS, HEADS, TOKENS, DIM = 2, 2, 150, 16


def inv_freq(dim: int) -> np.ndarray:
    return 1.0 / (10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def correlated_cache(seed: int, dtype=torch.float32, tokens: int = TOKENS, dim: int = DIM) -> KVCache:
    """Channels that mix a few strong and many weak sources per head: what a transform decorrelates."""
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for _ in range(LAYERS):
        for out in (keys, values):
            mix = torch.randn(HEADS, dim, dim, generator=g)
            sources = torch.randn(HEADS, tokens, dim, generator=g) * torch.logspace(1, -2, dim)
            out.append((sources @ mix.transpose(1, 2) + torch.randn(HEADS, 1, dim, generator=g) * 3).to(dtype))
    return KVCache(list(range(tokens)), keys, values)


def attention(kv: KVCache, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(k.shape[0], k.shape[1], generator=g) ** 4 + 1e-4 for k in kv.keys]


def fitted_bases(codec: KvqCodec, kv: KVCache) -> dict[tuple[int, int], np.ndarray]:
    """Per (layer, kind) the eigenvectors of each head's covariance of u = (x - center) / step (keys pre-RoPE),
    by decreasing variance."""
    bases = {}
    for layer in range(kv.num_layers):
        for kind, x in enumerate((kv.keys[layer], kv.values[layer])):
            plan = codec._fit_one(x, layer, kind, 0, None, tables=False)[0]
            skip = codec._skip(x.shape[1], 0)
            body = quantize.to_channels_ref(x[:, skip:], codec._freq(layer, kind, x.shape[2]), skip).double()
            u = (body - torch.from_numpy(plan.center.astype(np.float64))[..., None]) / \
                torch.from_numpy(plan.step.astype(np.float64))[..., None]
            vectors = torch.linalg.eigh(u @ u.transpose(1, 2))[1]
            bases[(layer, kind)] = vectors.flip(2).numpy()
    return bases


def codecs_for(kv: KVCache, scale: float = 0.5, sinks: int = 1) -> tuple[KvqCodec, KvqCodec, Transforms]:
    """(plain version 4, version 4 with a transform fitted on kv, the transform)."""
    freqs = [inv_freq(kv.keys[0].shape[2])] * kv.num_layers
    plain = KvqCodec(scale, sinks, None, freqs, version=4)
    xf = Transforms.from_bases(fitted_bases(plain, kv))
    sha = hashlib.sha256(xf.pack()).hexdigest()
    return plain, KvqCodec(scale, sinks, None, freqs, version=4, transforms=xf, dictionary=sha), xf


def build(kv: KVCache, codec: KvqCodec, chunk: int = 64, attn=None) -> bytes:
    if attn is not None:
        kv = KVCache(kv.token_ids, kv.keys, kv.values, attn)
    meta, parts = kvfile.encode(kv, IDENT, codec, chunk)
    return format.build_header(meta, parts) + b"".join(p.data for p in parts)


def decode(data: bytes, transforms: Transforms | None, backend: str = "torch", device="cpu") -> KVCache:
    """The file through the codec's own interface (the container's resolution of dictionaries is not this
    module's): the codec from the header, the transform attached, every segment's entropy and reconstruct."""
    src = format.BytesSource(data)
    header = format.read_header(src)
    codec = codec_from_header(header.codec["name"], header.codec["params"])
    if transforms is not None:
        codec.attach(transforms)
    aux = {s.name: format.read_segment(src, header, s) for s in header.segments if s.kind == "aux"}
    decoder = codec.open(aux, len(header.layers), backend)
    dtype = DTYPES[header.dtype]
    out = {(layer, kind): torch.full((shape.kv_heads, header.num_tokens - shape.token_start,
                                      shape.key_dim if kind == "k" else shape.value_dim), float("nan"), dtype=dtype,
                                     device=device)
           for layer, shape in enumerate(header.layers) for kind in "kv"}
    for seg in header.segments:
        if seg.kind == "aux":
            continue
        shape = header.layers[seg.layer]
        target = out[(seg.layer, seg.kind)]
        ctx = SegmentContext(seg.kind, seg.layer, seg.token_start, shape.kv_heads, seg.token_count, target.shape[2],
                             header.dtype)
        raw = format.read_segment(src, header, seg)
        lo = seg.token_start - shape.token_start
        decoder.reconstruct(ctx, raw, decoder.entropy([(ctx, raw)])[0], target[:, lo : lo + seg.token_count])
    layers = range(len(header.layers))
    return KVCache(header.token_ids, [out[(i, "k")].cpu() for i in layers], [out[(i, "v")].cpu() for i in layers])


def bits_of(t: torch.Tensor) -> np.ndarray:
    wide = t.element_size() == 4
    return t.contiguous().view(torch.int32 if wide else torch.int16).numpy().view(np.uint32 if wide else np.uint16)


def orthonormal(seed: int, heads: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.linalg.qr(rng.standard_normal((heads, dim, dim)))[0]


# ---------------------------------------------------------------- the matrices' bytes


def test_transform_bytes_round_trip():
    xf = Transforms.from_bases({(3, 1): orthonormal(0, 2, 8), (0, 0): orthonormal(1, 1, 4)})
    assert list(xf.matrices) == [(0, 0), (3, 1)]
    data = xf.pack()
    assert len(data) == 4 + 9 + 2 * 16 + 9 + 2 * 2 * 64
    assert struct.unpack_from("<IBHH", data, 4) == (0, 0, 1, 4)
    back = Transforms.unpack(data)
    assert back.matrices.keys() == xf.matrices.keys()
    for key, m in xf.matrices.items():
        assert back.matrices[key].dtype == np.int16 and np.array_equal(back.matrices[key], m)
    # The basis vectors times 2^10, rounded: columns are components.
    basis = orthonormal(0, 2, 8)
    assert np.array_equal(xf.matrices[(3, 1)], np.rint(basis * (1 << SCALE_BITS)).astype(np.int16))


def entry(layer: int, kind: int, heads: int, dim: int, fill: int = 1) -> bytes:
    return struct.pack("<IBHH", layer, kind, heads, dim) + struct.pack(f"<{heads * dim * dim}h",
                                                                       *[fill] * (heads * dim * dim))


MALFORMED = {
    "empty": b"",
    "no entries": struct.pack("<I", 0),
    "count beyond the entries": struct.pack("<I", 2) + entry(0, 0, 1, 2),
    "truncated entry head": struct.pack("<I", 1) + entry(0, 0, 1, 2)[:5],
    "truncated matrix": struct.pack("<I", 1) + entry(0, 0, 1, 2)[:-1],
    "trailing byte": struct.pack("<I", 1) + entry(0, 0, 1, 2) + b"\0",
    "kind 2": struct.pack("<I", 1) + entry(0, 2, 1, 2),
    "no heads": struct.pack("<I", 1) + entry(0, 0, 0, 2),
    "dim 0": struct.pack("<I", 1) + entry(0, 0, 1, 0),
    f"dim {MAX_DIM + 1}": struct.pack("<I", 1) + struct.pack("<IBHH", 0, 0, 1, MAX_DIM + 1),
    "out of order": struct.pack("<I", 2) + entry(1, 0, 1, 2) + entry(0, 1, 1, 2),
    "twice": struct.pack("<I", 2) + entry(0, 1, 1, 2) + entry(0, 1, 1, 2),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_transform_bytes_are_refused(case):
    with pytest.raises(CodecError):
        Transforms.unpack(MALFORMED[case])


def test_well_formed_neighbours_of_the_malformed_cases_are_read():
    """The refusals above are for the flaw named, not for the shape of the bytes around it."""
    assert Transforms.unpack(struct.pack("<I", 2) + entry(0, 1, 1, 2) + entry(1, 0, 1, 2)).shape((1, 0)) == (1, 2)
    assert Transforms.unpack(struct.pack("<I", 1) + entry(7, 1, 3, MAX_DIM, 0)).shape((7, 1)) == (3, MAX_DIM)


@pytest.mark.parametrize("bad", ["not orthonormal", "not square", "nan"])
def test_bases_that_are_not_orthonormal_are_refused(bad):
    b = orthonormal(2, 2, 4)
    b = {"not orthonormal": b * 1.01, "not square": b[:, :, :3], "nan": np.where(b > 0.5, np.nan, b)}[bad]
    with pytest.raises(CodecError):
        Transforms.from_bases({(0, 0): b})


# ---------------------------------------------------------------- the codec


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("weights", [False, True])
def test_transformed_files_decode_as_the_reference_decoder_does(dtype, weights):
    """Keys rotated, sinks, token weights or none, chunks that cut the layers: kvcli's decoder gives the
    reference decoder's bits, and the values the transform was fitted for (within the quantizer's error)."""
    kv = correlated_cache(1, DTYPES[dtype], tokens=60)
    plain, codec, xf = codecs_for(kv, sinks=3)
    attn = attention(kv, 2) if weights else None
    data = build(kv, codec, 25, attn)
    header = format.read_header(format.BytesSource(data))
    assert header.codec["params"]["dictionary"] == codec.dictionary and header.codec["params"]["version"] == 4
    ours, theirs = decode(data, xf), kvq_reference.decode_file(data, xf.pack())
    unchanged = decode(build(kv, plain, 40, attn), None)
    for layer in range(LAYERS):
        for kind, got in (("k", ours.keys[layer]), ("v", ours.values[layer])):
            assert np.array_equal(bits_of(got), theirs[(layer, kind)]), (layer, kind)
            want = (kv.keys if kind == "k" else kv.values)[layer]
            assert torch.equal(got[:, :3], want[:, :3])  # sinks exact
            # Rounding an orthogonal transform's components errs by at most version 4's 1/12 step^2 per element
            # (less where components are quieter than a step): never much more than version 4 without one.
            base = (unchanged.keys if kind == "k" else unchanged.values)[layer]
            error, base_error = ((t.float() - want.float()).pow(2).mean() for t in (got, base))
            assert error < 1.2 * base_error, (layer, kind, float(error), float(base_error))


def test_components_are_quantized_within_half_a_step():
    """In the transform's space every decoded component lies within 1/2 (plus float32 rounding) of the encoder's
    exact one: the integers are round(M^-1 u 2^10), not of anything else."""
    kv = correlated_cache(3)
    _, codec, xf = codecs_for(kv, sinks=0)
    out = decode(build(kv, codec), xf)
    for layer in range(LAYERS):
        for kind, (x, y) in enumerate(((kv.keys[layer], out.keys[layer]), (kv.values[layer], out.values[layer]))):
            plan = codec._fit_one(x, layer, kind, 0, None, tables=False)[0]
            center = torch.from_numpy(plan.center.astype(np.float64))[..., None]
            step = torch.from_numpy(plan.step.astype(np.float64))[..., None]
            inverse = torch.from_numpy(xf.inverse((layer, kind)))
            freq = codec._freq(layer, kind, DIM)
            c_x, c_y = (inverse @ ((quantize.to_channels_ref(t, freq, 0).double() - center) / step) for t in (x, y))
            err = (c_x - c_y).abs().max()
            assert 0.45 < err < 0.5 + 1e-3, (layer, kind, float(err))


def test_transform_codes_correlated_channels_in_fewer_bits():
    kv = correlated_cache(4)
    plain, codec, _ = codecs_for(kv)
    assert len(build(kv, codec)) < 0.8 * len(build(kv, plain))


def test_roundtrip_gives_the_files_values():
    """KvqCodec.roundtrip, which calibration measures the codec's error with, applies the transform as a file does."""
    kv = correlated_cache(5)
    _, codec, xf = codecs_for(kv, sinks=2)
    out = decode(build(kv, codec, 1000), xf)
    for layer in range(LAYERS):
        for kind, (x, y) in enumerate(((kv.keys[layer], out.keys[layer]), (kv.values[layer], out.values[layer]))):
            assert torch.equal(codec.roundtrip(x, layer, kind, 0), y)


def decode_on_device(data: bytes, transforms: Transforms, device) -> dict:
    """(layer, kind) -> tensor: every segment through the triton backend's device decoder (decode_onto)."""
    src = format.BytesSource(data)
    header = format.read_header(src)
    read = codec_from_header(header.codec["name"], header.codec["params"]).attach(transforms)
    aux = {s.name: format.read_segment(src, header, s) for s in header.segments if s.kind == "aux"}
    decoder = read.open(aux, len(header.layers), "triton")
    assert decoder.on_device
    outs = {(layer, kind): torch.full((shape.kv_heads, header.num_tokens, shape.key_dim), float("nan"),
                                      dtype=DTYPES[header.dtype], device=device)
            for layer, shape in enumerate(header.layers) for kind in "kv"}
    jobs = []
    for seg in header.segments:
        if seg.kind != "aux":
            shape = header.layers[seg.layer]
            ctx = SegmentContext(seg.kind, seg.layer, seg.token_start, shape.kv_heads, seg.token_count,
                                 shape.key_dim, header.dtype)
            out = outs[(seg.layer, seg.kind)][:, seg.token_start : seg.token_start + seg.token_count]
            jobs.append((ctx, format.read_segment(src, header, seg), out))
    decoder.decode_onto(jobs)
    return outs


def test_triton_backend_decodes_transformed_files_to_the_same_bits(device):
    """The device decoder (decode_onto: rANS kernel, transform_triton, dequantize_triton) against the CPU's, on a
    file with token weights, sinks and segments that run on from one another."""
    pytest.importorskip("triton")
    kv = correlated_cache(6, torch.bfloat16, tokens=40)
    _, codec, xf = codecs_for(kv, sinks=2)
    data = build(kv, codec, 16, attention(kv, 3))
    want, outs = decode(data, xf), decode_on_device(data, xf, device)
    for layer in range(LAYERS):
        for kind, cpu in (("k", want.keys[layer]), ("v", want.values[layer])):
            assert np.array_equal(bits_of(outs[(layer, kind)].cpu()), bits_of(cpu)), (layer, kind)


# ---------------------------------------------------------------- params and refusals


def test_a_file_naming_a_dictionary_needs_its_transform():
    kv = correlated_cache(7)
    _, codec, xf = codecs_for(kv)
    data = build(kv, codec)
    src = format.BytesSource(data)
    header = format.read_header(src)
    read = codec_from_header(header.codec["name"], header.codec["params"])
    assert read.dictionary == codec.dictionary and read.transforms is None
    aux = {s.name: format.read_segment(src, header, s) for s in header.segments if s.kind == "aux"}
    with pytest.raises(CodecError, match=f"needs dictionary {codec.dictionary}"):
        read.open(aux, LAYERS)
    # The container looks for it (the file is a stream: no beside; the user's cache, kvcli's shipped ones).
    with pytest.raises(FormatError, match=f"its dictionary {codec.dictionary} is missing: looked in .*/dicts, "
                                          "kvcli's shipped dictionaries"):
        kvfile.decode(src, header)
    assert read.attach(xf) is read and read.open(aux, LAYERS).transforms is xf


def test_files_without_a_dictionary_name_none():
    kv = correlated_cache(8)
    plain, _, _ = codecs_for(kv)
    header = format.read_header(format.BytesSource(build(kv, plain)))
    assert "dictionary" not in header.codec["params"]
    read = codec_from_header("kvq", header.codec["params"])
    assert read.dictionary is None
    with pytest.raises(CodecError, match="names no dictionary"):
        read.attach(Transforms.from_bases({(0, 0): orthonormal(0, HEADS, DIM)}))


@pytest.mark.parametrize("sha", ["A" * 64, "a" * 63, "a" * 65, "g" * 64, 7])
def test_dictionary_param_must_be_64_lowercase_hex(sha):
    params = {"version": 4, "scale": 0.5, "sinks": 1, "dictionary": sha}
    with pytest.raises(CodecError):
        codec_from_header("kvq", params)
    good = "0123456789abcdef" * 4
    assert codec_from_header("kvq", {**params, "dictionary": good}).dictionary == good


@pytest.mark.parametrize("version", [2, 3])
def test_only_version_4_names_a_dictionary(version):
    with pytest.raises(CodecError, match="takes no dictionary"):
        codec_from_header("kvq", {"version": version, "scale": 0.5, "sinks": 1, "dictionary": "a" * 64})
    xf = Transforms.from_bases({(0, 0): orthonormal(0, HEADS, DIM)})
    if version == 3:
        with pytest.raises(CodecError, match="takes no dictionary"):
            KvqCodec(0.5, version=3, transforms=xf, dictionary="a" * 64)


def test_a_transform_needs_its_dictionarys_name():
    with pytest.raises(CodecError, match="SHA-256 of its dictionary"):
        KvqCodec(0.5, version=4, transforms=Transforms.from_bases({(0, 0): orthonormal(0, HEADS, DIM)}))


def test_a_transform_must_fit_the_cache_and_the_files_plans():
    kv = correlated_cache(9)
    _, codec, xf = codecs_for(kv)
    wrong = Transforms.from_bases({**{k: np.linalg.qr(m.astype(np.float64))[0] for k, m in xf.matrices.items()},
                                   (1, 1): orthonormal(3, HEADS + 1, DIM)})
    with pytest.raises(CodecError, match="layer 1 V has"):
        KvqCodec(0.5, 1, None, None, version=4, transforms=wrong, dictionary="a" * 64).fit(kv.keys, kv.values, [0, 0])
    beyond = Transforms.from_bases({(LAYERS, 0): orthonormal(3, HEADS, DIM)})
    with pytest.raises(CodecError, match="no such layer"):
        decode(build(kv, codec), beyond)
    with pytest.raises(CodecError, match="layer 1 V has"):
        decode(build(kv, codec), wrong)


def with_escape(data: bytes, value: int) -> bytes:
    """The file with the first escape value of its first segment that has any set to `value`."""
    src = format.BytesSource(data)
    header = format.read_header(src)
    meta = {k: getattr(header, k) for k in ("model", "dtype", "token_ids", "chunk_tokens", "codec")}
    meta |= {"layers": [vars(s) for s in header.layers], "created_by": "test"}
    parts, done = [], False
    for seg in header.segments:
        raw = format.read_segment(src, header, seg)
        if seg.kind != "aux" and not done:
            lanes, words, size = struct.unpack_from("<III", raw, 0)
            at = 12 + 4 * lanes + 2 * words
            if size:
                values = np.frombuffer(zstandard.ZstdDecompressor().decompress(raw[at : at + size]), "<i4").copy()
                values[0] = value
                frame = zstandard.ZstdCompressor().compress(values.tobytes())
                raw = struct.pack("<III", lanes, words, len(frame)) + raw[12 : at] + frame + raw[at + size :]
                done = True
        parts.append(format.SegmentData(seg.kind, seg.layer, seg.token_start, seg.token_count, raw, seg.name))
    assert done
    return format.build_header(meta, parts) + b"".join(p.data for p in parts)


def test_component_integers_must_lie_within_2_to_the_30():
    """Beyond, M q could leave float64's exact integers: every decoder refuses the segment; up to 2^30 - 1 it
    decodes, and as the reference decoder does."""
    kv = correlated_cache(10, tokens=40)
    kv.values[0][0, 5] *= 300  # an outlier token: escapes
    _, codec, xf = codecs_for(kv, sinks=0)
    data = build(kv, codec)
    edge = with_escape(data, (1 << 30) - 1)
    ours, theirs = decode(edge, xf), kvq_reference.decode_file(edge, xf.pack())
    for layer in range(LAYERS):
        for kind, got in (("k", ours.keys[layer]), ("v", ours.values[layer])):
            assert np.array_equal(bits_of(got), theirs[(layer, kind)]), (layer, kind)
    for value in (1 << 30, -(1 << 30), -(1 << 31)):
        with pytest.raises(CodecError, match="beyond"):
            decode(with_escape(data, value), xf)
        with pytest.raises(kvq_reference.Invalid):
            kvq_reference.decode_file(with_escape(data, value), xf.pack())


def test_the_device_decoder_refuses_component_integers_beyond_2_to_the_30(device):
    pytest.importorskip("triton")
    kv = correlated_cache(10, tokens=40)
    kv.values[0][0, 5] *= 300
    _, codec, xf = codecs_for(kv, sinks=0)
    with pytest.raises(CodecError, match="beyond"):
        decode_on_device(with_escape(build(kv, codec), 1 << 30), xf, device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_segments_fit_did_not_see_encode_to_the_same_transformed_bytes(backend):
    """Copies of the cache's values are transformed and quantized afresh (on the CPU with either backend); the bytes
    equal those coded from fit's integers."""
    if backend == "triton":
        pytest.importorskip("triton")
    kv = correlated_cache(11, tokens=48)
    _, codec, _ = codecs_for(kv, sinks=1)
    encoder = codec.fit(kv.keys, kv.values, [0] * LAYERS, backend=backend)
    jobs = [(t[layer][:, start : start + 16], SegmentContext(kind, layer, start, HEADS, 16, DIM, "float32"))
            for start in (0, 16, 32) for layer in range(LAYERS) for kind, t in (("k", kv.keys), ("v", kv.values))]
    assert encoder.encode_many(jobs) == encoder.encode_many([(x.clone(), ctx) for x, ctx in jobs])


def test_a_singular_transform_cannot_encode():
    """A dictionary whose matrix has no inverse (no calibration writes one) decodes, but nothing can be coded with it."""
    kv = correlated_cache(12, tokens=20)
    matrices = {(layer, kind): np.repeat(np.eye(DIM, dtype=np.int16)[None] * 1024, HEADS, 0)
                for layer in range(LAYERS) for kind in range(2)}
    matrices[(1, 0)][1, 3] = matrices[(1, 0)][1, 4]  # two equal rows
    codec = KvqCodec(0.5, 1, None, None, version=4, transforms=Transforms(matrices), dictionary="a" * 64)
    with pytest.raises(CodecError, match="layer 1 kind 0 is singular"):
        codec.fit(kv.keys, kv.values, [0] * LAYERS)
