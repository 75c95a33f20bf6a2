"""The kvq bitstream is pinned and fully specified: golden files, an independent reference decoder, and one
refusal test per integrity check of the decoder (docs/codec.md, "Every check a kvq decoder performs")."""

from __future__ import annotations

import hashlib
import re
import struct
import sys
from pathlib import Path

import kvq_reference
import numpy as np
import pytest
import torch
import zstandard

from kvcli.codecs import entropy
from kvcli.container import format, kvfile
from kvcli.errors import FormatError

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden_kvq  # noqa: E402

PRESETS = list(make_golden_kvq.PRESETS)
HEAD = struct.Struct("<III")


def kvcli_bits(data: bytes) -> dict:
    src = format.BytesSource(data)
    kv = kvfile.decode(src, format.read_header(src), threads=1)
    out = {}
    for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
        for kind, t in (("k", k), ("v", v)):
            wide = t.element_size() == 4
            arr = t.contiguous().view(torch.int32 if wide else torch.int16).numpy()
            out[(layer, kind)] = arr.view(np.uint32 if wide else np.uint16)
    return out


VERSIONS = make_golden_kvq.VERSIONS


def golden(preset: str, version: int = 3) -> bytes:
    return (GOLDEN / VERSIONS[version].format(preset)).read_bytes()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("preset", PRESETS)
def test_reference_decoder_matches_kvcli_bit_for_bit(preset, version):
    data = golden(preset, version)
    assert format.read_header(format.BytesSource(data)).codec["params"]["version"] == version
    ours, theirs = kvcli_bits(data), kvq_reference.decode_file(data)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].shape == theirs[key].shape
        assert np.array_equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("preset", PRESETS)
def test_writer_reproduces_the_golden_bytes(preset, version):
    assert make_golden_kvq.golden_bytes(preset, version) == golden(preset, version)


@pytest.mark.parametrize("preset", PRESETS)
def test_version_4_changes_only_the_entropy_tables(preset):
    """Same integers, other tables: versions 3 and 4 of a cache decode to the same bits, and version 4's tables
    are per (class, band), with more than one band where the cache has token weights."""
    v3, v4 = kvcli_bits(golden(preset, 3)), kvcli_bits(golden(preset, 4))
    assert v3.keys() == v4.keys()
    for key, bits in v4.items():
        assert np.array_equal(bits, v3[key]), key
    tables = entropy.unpack_tables(aux_payload(golden(preset, 4), "kvq.tables"), banded=True)
    assert len(set(tables.bands)) > 1 and len(tables.classes) > len(set(tables.classes))


def aux_payload(data: bytes, name: str) -> bytes:
    src = format.BytesSource(data)
    header = format.read_header(src)
    seg = next(s for s in header.segments if s.name == name)
    return zstandard.ZstdDecompressor().decompress(format.read_segment(src, header, seg))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("preset", PRESETS)
def test_golden_files_exercise_escapes_tails_and_sinks(preset, version):
    """The golden files are only worth their bytes if they reach the decoder's corners."""
    header = format.read_header(format.BytesSource(golden(preset, version)))
    tensor = [s for s in header.segments if s.kind != "aux"]
    assert min(s.token_count for s in tensor) <= 3
    data = golden(preset, version)
    escapes = [HEAD.unpack_from(data, header.data_offset + s.offset)[2] for s in tensor]
    assert sum(e > 0 for e in escapes) >= 2


# ---------------------------------------------------------------- one refusal per check

ENCODED: dict[int, tuple] = {}


def golden_parts(version: int = 3):
    if version not in ENCODED:
        dtype, sinks = make_golden_kvq.PRESETS["balanced"]
        codec = make_golden_kvq.make_codec("balanced", None, make_golden_kvq.inv_freq(), 1.0, sinks, version)
        ENCODED[version] = kvfile.encode(make_golden_kvq.golden_cache(dtype), make_golden_kvq.IDENTITY, codec,
                                         make_golden_kvq.CHUNK)
    return ENCODED[version]


def segment_fields(blob: bytes) -> dict:
    lanes, words, esc = HEAD.unpack_from(blob, 0)
    pos = HEAD.size
    states = list(struct.unpack_from(f"<{lanes}I", blob, pos))
    pos += 4 * lanes
    w = list(struct.unpack_from(f"<{words}H", blob, pos))
    pos += 2 * words
    return {"lanes": lanes, "states": states, "words": w, "esc": blob[pos : pos + esc], "rest": blob[pos + esc :]}


def segment_bytes(f: dict) -> bytes:
    return (HEAD.pack(f.get("lanes_field", len(f["states"])), len(f["words"]), len(f["esc"]))
            + struct.pack(f"<{len(f['states'])}I", *f["states"]) + struct.pack(f"<{len(f['words'])}H", *f["words"])
            + f["esc"] + f["rest"])


def tensor_index(pred) -> int:
    _, parts = golden_parts()
    return next(i for i, p in enumerate(parts) if p.kind != "aux" and pred(p, segment_fields(p.data)))


def refused(parts, message: str, where: str | None = None, version: int = 3) -> None:
    meta, _ = golden_parts(version)
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    for run in (kvfile.decode, kvfile.verify):
        src = format.BytesSource(data, "g.kvc")
        with pytest.raises(FormatError, match=re.escape(message)) as info:
            run(src, format.read_header(src))
        if where:
            assert where in str(info.value)


def with_segment(index: int, change) -> list:
    _, parts = golden_parts()
    parts = list(parts)
    p = parts[index]
    f = segment_fields(p.data)
    change(f)
    parts[index] = format.SegmentData(p.kind, p.layer, p.token_start, p.token_count, segment_bytes(f), p.name)
    return parts


def label(index: int) -> str:
    p = golden_parts()[1][index]
    return f"layer {p.layer} {p.kind.upper()} tokens [{p.token_start}, {p.token_start + p.token_count})"


def test_golden_parts_round_trip_unchanged():
    i = tensor_index(lambda p, f: f["esc"])
    assert segment_bytes(segment_fields(golden_parts()[1][i].data)) == golden_parts()[1][i].data


def test_lane_count_rule():
    i = tensor_index(lambda p, f: f["lanes"] >= 1)
    refused(with_segment(i, lambda f: f["states"].append(1 << 16)), "lanes, the lane count rule gives", label(i))


def test_at_most_one_word_per_symbol():
    i = tensor_index(lambda p, f: p.token_count <= 3)
    refused(with_segment(i, lambda f: f["words"].extend([0] * 200)), "words for")


def test_escape_frame_size_cap():
    i = tensor_index(lambda p, f: p.token_count <= 3 and f["esc"])
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    refused(with_segment(i, lambda f: f.update(esc=zstandard.ZstdCompressor().compress(noise))),
            "escape stream of", label(i))


def test_initial_states_in_range():
    i = tensor_index(lambda p, f: f["lanes"] >= 1)
    refused(with_segment(i, lambda f: f["states"].__setitem__(0, 5)), "initial state is below 2^16")


def test_stream_must_end_empty():
    i = tensor_index(lambda p, f: f["lanes"] >= 1 and p.token_count > 3)
    refused(with_segment(i, lambda f: f["words"].append(7)), "the entropy decoder read", label(i))


def test_stream_must_end_in_the_initial_states():
    """A state off by one keeps every symbol and word count of a short lane, but not its final state."""
    from kvcli.codecs import rans

    tables = rans.Tables([rans.normalize_counts(np.array([5, 3, 1, 1]))])
    symbols = np.array([0, 1, 0, 2, 0, 0, 1, 3])
    stream = rans.encode_streams(tables, [(symbols, np.zeros(8, np.uint32))])[0]
    assert np.array_equal(rans.decode_streams(tables, [(np.zeros(8, np.uint32), stream)])[0], symbols)
    bad = rans.Stream(stream.states ^ np.uint32(1), stream.words)
    with pytest.raises(rans.StreamError, match="did not end in its initial state"):
        rans.decode_streams(tables, [(np.zeros(8, np.uint32), bad)])


def escaped_segment() -> int:
    return tensor_index(lambda p, f: f["esc"])


def escape_values(f) -> np.ndarray:
    return np.frombuffer(zstandard.ZstdDecompressor().decompress(f["esc"]), "<i4")


def test_escape_count_extra_value():
    i = escaped_segment()
    extra = lambda f: f.update(esc=zstandard.ZstdCompressor().compress(np.append(escape_values(f), 1).astype("<i4").tobytes()))
    refused(with_segment(i, extra), "more than the", label(i))


def test_escape_count_missing_value():
    i = escaped_segment()
    short = lambda f: f.update(esc=zstandard.ZstdCompressor().compress(escape_values(f)[:-1].astype("<i4").tobytes()))
    refused(with_segment(i, short), "escape stream holds", label(i))


def test_escape_frame_must_be_present():
    i = escaped_segment()
    refused(with_segment(i, lambda f: f.update(esc=b"")), "escape symbols but no escape stream", label(i))


def test_escape_frame_without_escapes_is_refused():
    i = tensor_index(lambda p, f: not f["esc"] and f["lanes"] >= 1)
    frame = zstandard.ZstdCompressor().compress(b"\0\0\0\0")
    refused(with_segment(i, lambda f: f.update(esc=frame)), "an escape stream without escape symbols", label(i))


def test_nothing_after_the_escape_frame():
    i = tensor_index(lambda p, f: f["esc"] and not f["rest"])
    refused(with_segment(i, lambda f: f.update(esc=f["esc"] + b"\0")), "bytes after the zstd frame", label(i))


def test_sinks_must_be_finite():
    i = tensor_index(lambda p, f: p.token_start == 0 and f["rest"])
    refused(with_segment(i, lambda f: f.update(rest=b"\x00\x7c" + f["rest"][2:])), "non-finite", label(i))


def test_segment_parts_must_add_up():
    i = tensor_index(lambda p, f: f["lanes"] >= 1)
    _, parts = golden_parts()
    parts = list(parts)
    p = parts[i]
    parts[i] = format.SegmentData(p.kind, p.layer, p.token_start, p.token_count, p.data + b"\0", p.name)
    refused(parts, "segment sizes do not add up", label(i))


# ---------------------------------------------------------------- tables and plans


def with_aux(name: str, change, version: int = 3) -> list:
    _, parts = golden_parts(version)
    parts = list(parts)
    i = next(j for j, p in enumerate(parts) if p.name == name)
    raw = bytearray(zstandard.ZstdDecompressor().decompress(parts[i].data))
    raw = change(raw)
    parts[i] = format.SegmentData("aux", -1, 0, 0, zstandard.ZstdCompressor().compress(bytes(raw)), name)
    return parts


def first_table(raw: bytearray) -> tuple[int, int, int]:
    """(class, offset of its first frequency, alphabet size)."""
    from kvq_reference import layout

    cls = struct.unpack_from("<b", raw, 2)[0]
    half, m = layout(cls)
    return cls, 3, (2 * half + 1) ** m + 1


def test_zero_frequency_is_refused():
    def change(raw):
        _, pos, _ = first_table(raw)
        a, b = struct.unpack_from("<HH", raw, pos)
        struct.pack_into("<HH", raw, pos, a + b, 0)
        return raw

    refused(with_aux("kvq.tables", change), "a symbol has frequency 0")


def test_frequencies_must_sum_to_the_precision():
    def change(raw):
        _, pos, _ = first_table(raw)
        struct.pack_into("<H", raw, pos, struct.unpack_from("<H", raw, pos)[0] + 1)
        return raw

    refused(with_aux("kvq.tables", change), "sum to 65537, not 65536")


def test_tables_must_cover_every_class_of_the_plans():
    def change(raw):
        cls, pos, size = first_table(raw)
        count = struct.unpack_from("<H", raw, 0)[0]
        return bytearray(struct.pack("<H", count - 1)) + raw[pos + 2 * size :]

    refused(with_aux("kvq.tables", change), "no entropy table for class")


def test_tables_must_be_in_class_order():
    """Swap the class bytes of two neighbouring tables of the same alphabet: only the order is wrong."""
    from kvq_reference import layout

    def change(raw):
        pos, tables = 2, []
        for _ in range(struct.unpack_from("<H", raw, 0)[0]):
            cls = struct.unpack_from("<b", raw, pos)[0]
            half, m = layout(cls)
            tables.append((pos, (2 * half + 1) ** m))
            pos += 1 + 2 * ((2 * half + 1) ** m + 1)
        (a, size), (b, _) = next((x, y) for x, y in zip(tables, tables[1:]) if x[1] == y[1])
        raw[a], raw[b] = raw[b], raw[a]
        return raw

    refused(with_aux("kvq.tables", change), "out of range or out of order")


def test_tables_have_no_trailing_bytes():
    refused(with_aux("kvq.tables", lambda raw: raw + b"\0"), "entropy tables have trailing bytes")


def v4_tables(raw: bytearray) -> list[tuple[int, int, int, int]]:
    """Version 4's kvq.tables entries: (offset, class, band, bytes)."""
    from kvq_reference import layout

    pos, out = 2, []
    for _ in range(struct.unpack_from("<H", raw, 0)[0]):
        cls, band = struct.unpack_from("<bB", raw, pos)
        half, m = layout(cls)
        out.append((pos, cls, band, 2 + 2 * ((2 * half + 1) ** m + 1)))
        pos += out[-1][3]
    return out


def test_version_4_tables_bands_lie_in_range():
    def change(raw):
        raw[v4_tables(raw)[0][0] + 1] = entropy.BANDS
        return raw

    refused(with_aux("kvq.tables", change, 4), "out of range or out of order", version=4)


def test_version_4_tables_are_in_class_and_band_order():
    def change(raw):
        (a, cls, band, _), (b, cls_b, band_b, _) = v4_tables(raw)[:2]
        assert cls == cls_b and band < band_b
        raw[a + 1], raw[b + 1] = band_b, band
        return raw

    refused(with_aux("kvq.tables", change, 4), "out of range or out of order", version=4)


def test_version_4_segments_need_a_table_for_every_class_and_band_they_use():
    """Drop the table of the first class's most common band: a segment that codes a tuple of that class in that
    band is refused (coverage per segment)."""
    meta, parts = golden_parts(4)
    tokens = kvq_reference.read_tokens(aux_payload(format.build_header(meta, parts) + b"".join(p.data for p in parts),
                                                   "kvq.tokens"), {(l, k): (np.zeros((2, 8)),) for l in range(3)
                                                                   for k in "kv"})
    bands = np.concatenate([(e.reshape(-1) + 24) // 6 for _, e in tokens.values()])
    common = int(np.bincount(bands).argmax())

    dropped = []

    def change(raw):
        entries = v4_tables(raw)
        pos, cls, band, size = next(e for e in entries if e[2] == common)
        dropped.append((cls, band))
        struct.pack_into("<H", raw, 0, len(entries) - 1)
        return raw[:pos] + raw[pos + size :]

    parts = with_aux("kvq.tables", change, 4)
    refused(parts, f"no entropy table for class {dropped[0][0]} band {dropped[0][1]}", version=4)


def test_plan_steps_must_be_positive():
    def change(raw):
        heads, dim, _ = struct.unpack_from("<HHB", raw, 4)
        struct.pack_into("<e", raw, 4 + 5 + 2 * heads * dim, 0.0)
        return raw

    refused(with_aux("kvq.plan", change), "steps must be finite and positive")


def test_plan_classes_must_be_in_range():
    def change(raw):
        heads, dim, _ = struct.unpack_from("<HHB", raw, 4)
        struct.pack_into("<b", raw, 4 + 5 + 4 * heads * dim, 100)
        return raw

    refused(with_aux("kvq.plan", change), "channel class out of range")


def test_aux_frames_refuse_trailing_bytes():
    _, parts = golden_parts()
    parts = list(parts)
    i = next(j for j, p in enumerate(parts) if p.name == "kvq.plan")
    parts[i] = format.SegmentData("aux", -1, 0, 0, parts[i].data + b"\0", "kvq.plan")
    refused(parts, "bytes after the zstd frame")


# ---------------------------------------------------------------- version 2 files and token weights (version 3)


@pytest.mark.parametrize("preset", PRESETS)
def test_version_2_files_still_decode_bit_for_bit(preset):
    data = (GOLDEN / f"v2-tiny-kvq-{preset}.kvc").read_bytes()
    assert format.read_header(format.BytesSource(data)).codec["params"]["version"] == 2
    ours, theirs = kvcli_bits(data), kvq_reference.decode_file(data)
    for key in ours:
        assert np.array_equal(ours[key], theirs[key]), key


def test_golden_files_carry_token_weights_that_change_the_values():
    """Without its token weights a version 3 file decodes to other values: the golden test above covers them."""
    data = (GOLDEN / "tiny-kvq-balanced.kvc").read_bytes()
    header = format.read_header(format.BytesSource(data))
    assert header.codec["params"]["version"] == 3
    assert "kvq.tokens" in {s.name for s in header.segments if s.kind == "aux"}
    meta, parts = golden_parts()

    def flatten(raw):  # the first entry's (layer 0 K) exponents all 0
        pos, (_, _, heads, _, n) = tokens_entry(raw)
        raw[pos + 15 : pos + 15 + heads * n] = bytes(heads * n)
        return raw

    flat = with_aux("kvq.tokens", flatten)
    src = format.BytesSource(format.build_header(meta, flat) + b"".join(p.data for p in flat))
    changed = kvfile.decode(src, format.read_header(src), threads=1)
    src = format.BytesSource(format.build_header(meta, parts) + b"".join(p.data for p in parts))
    exact = kvfile.decode(src, format.read_header(src), threads=1)
    assert not torch.equal(changed.keys[0], exact.keys[0]) and torch.equal(changed.values[0], exact.values[0])


def tokens_entry(raw: bytearray, index: int = 0) -> tuple[int, tuple]:
    """(offset of entry `index`, its (layer, kind, heads, first, tokens))."""
    pos = 4
    for _ in range(index):
        heads, n = struct.unpack_from("<IBHII", raw, pos)[2], struct.unpack_from("<IBHII", raw, pos)[4]
        pos += 15 + heads * n
    return pos, struct.unpack_from("<IBHII", raw, pos)


def test_token_exponents_must_be_in_range():
    def change(raw):
        pos, _ = tokens_entry(raw)
        raw[pos + 15] = 25
        return raw
    refused(with_aux("kvq.tokens", change), "exponents must lie in [-24, 24]")


def test_token_entries_must_be_in_order():
    def change(raw):
        pos, (layer, kind, heads, first, n) = tokens_entry(raw, 1)
        struct.pack_into("<IB", raw, pos, 0, 0)  # a second entry for layer 0 K
        return raw
    refused(with_aux("kvq.tokens", change), "increasing (layer, kind) order")


def test_token_entries_need_a_plan_with_their_heads():
    def change(raw):
        pos, _ = tokens_entry(raw)
        struct.pack_into("<H", raw, pos + 5, 3)
        return raw
    refused(with_aux("kvq.tokens", change), "which no plan has")


def test_token_weights_truncated_or_trailing():
    refused(with_aux("kvq.tokens", lambda raw: raw[:-1]), "kvq.tokens is truncated")
    refused(with_aux("kvq.tokens", lambda raw: raw + b"\0"), "kvq.tokens has 1 trailing bytes")


def test_token_weights_must_cover_their_segments():
    def change(raw):
        pos, _ = tokens_entry(raw)
        struct.pack_into("<I", raw, pos + 7, 5)  # layer 0 K weights now start at position 5
        return raw
    refused(with_aux("kvq.tokens", change), "token weights of layer 0 K", "layer 0 K tokens [0,")


def test_token_weights_are_refused_in_a_version_2_file():
    meta, parts = golden_parts()
    old = dict(meta, codec={"name": "kvq", "params": dict(meta["codec"]["params"], version=2)})
    data = format.build_header(old, parts) + b"".join(p.data for p in parts)
    src = format.BytesSource(data, "g.kvc")
    with pytest.raises(FormatError, match=re.escape("kvq version 2 needs aux segments kvq.plan and kvq.tables,")):
        kvfile.decode(src, format.read_header(src))


# ---------------------------------------------------------------- what docs/codec.md states about the numbers


def test_token_factors_are_two_to_the_e_over_8_correctly_rounded_to_float32():
    """docs/codec.md gives the 49 factors as a formula, not a list: 2^(e/8) rounded to the nearest float32, e in
    [-24, 24]. Checked against 60-digit arithmetic, not against float64 pow, which need not be correctly rounded."""
    from decimal import Decimal, localcontext

    from kvcli.codecs.kvq import TOKEN_EXPONENT_LIMIT, TOKEN_FACTORS

    def nearest_float32(e: int) -> np.float32:
        with localcontext() as ctx:
            ctx.prec = 60
            exact = (Decimal(2).ln() * e / 8).exp()
            guess = np.float32(float(exact))
            around = (np.nextafter(guess, np.float32(0)), guess, np.nextafter(guess, np.float32(np.inf)))
            return min(around, key=lambda c: abs(Decimal(float(c)) - exact))

    assert TOKEN_EXPONENT_LIMIT == 24 and TOKEN_FACTORS.dtype == np.float32
    assert [float(f) for f in TOKEN_FACTORS] == [float(nearest_float32(e)) for e in range(-24, 25)]


def test_escape_values_are_the_integers_themselves():
    """An escaped tuple's values are the signed integers, taken as they are, even where they would have fitted the
    class's range: kvcli and the reference decoder (docs alone) decode the changed segment alike."""
    i = escaped_segment()
    zeros = lambda f: f.update(esc=zstandard.ZstdCompressor().compress(np.zeros_like(escape_values(f)).tobytes()))
    meta, _ = golden_parts()
    parts = with_segment(i, zeros)
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    ours, theirs = kvcli_bits(data), kvq_reference.decode_file(data)
    original = kvcli_bits(format.build_header(meta, golden_parts()[1]) + b"".join(p.data for p in golden_parts()[1]))
    p = golden_parts()[1][i]
    assert not np.array_equal(ours[(p.layer, p.kind)], original[(p.layer, p.kind)])
    for key in ours:
        assert np.array_equal(ours[key], theirs[key]), key


def test_plan_layer_count_must_equal_the_headers():
    def layers(count_change: int):
        def change(raw):
            (count,) = struct.unpack_from("<I", raw, 0)
            pos = 4
            for _ in range(count - 1):  # to the last layer's entries
                for _kind in range(2):
                    heads, dim, rope = struct.unpack_from("<HHB", raw, pos)
                    pos += 5 + 5 * heads * dim + (2 * dim if rope else 0)
            last = raw[pos:]
            body = raw[4:] + last if count_change > 0 else raw[4:pos]
            return bytearray(struct.pack("<I", count + count_change)) + body
        return change

    refused(with_aux("kvq.plan", layers(+1)), "kvq.plan has 4 layers, the header 3")
    refused(with_aux("kvq.plan", layers(-1)), "kvq.plan has 2 layers, the header 3")


def test_segment_boundaries_need_not_follow_chunk_tokens():
    """chunk_tokens records how the writer cut the file; a reader takes any cut that covers each layer and kind in
    order: here every layer and kind cut its own way, one cut inside the sinks, segments in layer order rather
    than chunk order. The values are those of the regularly chunked file (kvq's integers come from the fit of the
    whole cache, not from the segments)."""
    from kvcli.codecs.base import SegmentContext

    dtype, sinks = make_golden_kvq.PRESETS["high"]
    assert sinks == 4
    kv = make_golden_kvq.golden_cache(dtype)
    codec = make_golden_kvq.make_codec("high", None, make_golden_kvq.inv_freq(), 1.0, sinks)
    meta, parts = kvfile.encode(kv, make_golden_kvq.IDENTITY, codec, make_golden_kvq.CHUNK)
    shapes = kvfile.layer_shapes(kv)
    encoder = codec.fit(kv.keys, kv.values, [s.token_start for s in shapes], kv.attention)
    jobs = []
    for layer, shape in enumerate(shapes):
        for kind, tensors, dim in (("k", kv.keys, shape.key_dim), ("v", kv.values, shape.value_dim)):
            step = 7 + 3 * layer + (kind == "v")
            inside_sinks = {2} if shape.token_start < 2 else set()
            cuts = sorted({*range(shape.token_start, kv.num_tokens, step), *inside_sinks}) + [kv.num_tokens]
            for lo, hi in zip(cuts, cuts[1:]):
                local = slice(lo - shape.token_start, hi - shape.token_start)
                jobs.append((tensors[layer][:, local], SegmentContext(kind, layer, lo, shape.kv_heads, hi - lo,
                                                                      dim, dtype)))
    blobs = encoder.encode_many(jobs)
    cut = [format.SegmentData("aux", -1, 0, 0, data, name) for name, data in sorted(encoder.aux().items())]
    cut += [format.SegmentData(c.kind, c.layer, c.token_start, c.tokens, b) for (_, c), b in zip(jobs, blobs)]
    data = format.build_header(meta, cut) + b"".join(p.data for p in cut)
    header = format.read_header(format.BytesSource(data))
    assert header.chunk_tokens == 64 and any(s.token_start % 64 and s.token_start != shapes[s.layer].token_start
                                             for s in header.segments if s.kind != "aux")
    regular = kvcli_bits(format.build_header(meta, parts) + b"".join(p.data for p in parts))
    ours, theirs = kvcli_bits(data), kvq_reference.decode_file(data)
    for key in regular:
        assert np.array_equal(ours[key], regular[key]) and np.array_equal(theirs[key], regular[key]), key


# ---------------------------------------------------------------- version 4 with a transform


def transformed_path(preset: str) -> Path:
    return GOLDEN / make_golden_kvq.TRANSFORMED.format(preset)


def golden_transform_payload() -> bytes:
    """The dictionary beside the golden files, read without kvcli's dictionary module: its payload follows the
    preamble (8 bytes of magic, u16 version, u32 header length) and the JSON header (docs/format.md)."""
    (path,) = (GOLDEN / "dicts").glob("*.kvd")
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 10)
    return data[14 + length :]


@pytest.mark.parametrize("preset", PRESETS)
def test_transformed_golden_files_decode_as_the_reference_decoder_does(preset):
    """kvcli finds the dictionary beside the file (dicts/SHA.kvd) and decodes what the reference decoder, given
    the dictionary's transform bytes, computes from docs/codec.md alone."""
    path = transformed_path(preset)
    src = format.FileSource(path)
    kv = kvfile.decode(src, format.read_header(src), threads=1)
    theirs = kvq_reference.decode_file(path.read_bytes(), golden_transform_payload())
    for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
        for kind, t in (("k", k), ("v", v)):
            wide = t.element_size() == 4
            ours = t.contiguous().view(torch.int32 if wide else torch.int16).numpy()
            assert np.array_equal(ours.view(np.uint32 if wide else np.uint16), theirs[(layer, kind)]), (layer, kind)


@pytest.mark.parametrize("preset", PRESETS)
def test_writer_reproduces_the_transformed_golden_bytes(preset):
    data = make_golden_kvq.golden_dictionary()
    assert (GOLDEN / "dicts" / f"{hashlib.sha256(data).hexdigest()}.kvd").read_bytes() == data
    assert make_golden_kvq.golden_bytes(preset, 4, True) == transformed_path(preset).read_bytes()


@pytest.mark.parametrize("preset", PRESETS)
def test_transformed_golden_files_exercise_both_kinds_of_layer(preset):
    """Transformed layers and kinds beside plain ones, escapes among the components, and values other than those of
    the same cache without a transform (so a decoder that ignored the transform would fail the tests above)."""
    data = transformed_path(preset).read_bytes()
    header = format.read_header(format.BytesSource(data))
    assert header.codec["params"]["dictionary"] == hashlib.sha256(make_golden_kvq.golden_dictionary()).hexdigest()
    matrices = kvq_reference.read_transforms(golden_transform_payload())
    assert set(matrices) == {(layer, kind) for layer in range(3) for kind in "kv"} - {(1, "k"), (2, "v")}
    tensor = [s for s in header.segments if s.kind != "aux"]
    escapes = [(s.layer, s.kind) for s in tensor if HEAD.unpack_from(data, header.data_offset + s.offset)[2]]
    assert any(key in matrices for key in escapes)
    plain = kvq_reference.decode_file(golden(preset, 4))
    theirs = kvq_reference.decode_file(data, golden_transform_payload())
    assert all(not np.array_equal(theirs[key], plain[key]) for key in matrices)
