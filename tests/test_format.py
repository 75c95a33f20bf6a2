"""The .kvc container: golden bytes, one refusal per kind of damage, and a fuzz test of the reader."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from golden.make_golden import HERE, golden_bytes, golden_cache
from kvcli import format, kvfile
from kvcli.codecs import RawCodec
from kvcli.errors import FormatError, KvcliError, VersionError

RAW = (HERE / "tiny-raw.kvc").read_bytes()
ZSTD = (HERE / "tiny-zstd.kvc").read_bytes()

def load(data: bytes):
    src = format.BytesSource(data, "t.kvc")
    return kvfile.decode(src, format.read_header(src))

def rewrite_header(data: bytes, change) -> bytes:
    """Apply `change` to the parsed header JSON and re-serialize it with a valid checksum."""
    _, major, minor, hlen, _ = format.PREAMBLE.unpack(data[: format.PREAMBLE_SIZE])
    doc = json.loads(data[format.PREAMBLE_SIZE : format.PREAMBLE_SIZE + hlen])
    change(doc)
    raw = json.dumps(doc).encode()
    return format.PREAMBLE.pack(format.MAGIC, major, minor, len(raw), zlib.crc32(raw)) + raw + data[format.PREAMBLE_SIZE + hlen :]

def test_writer_emits_the_golden_bytes():
    assert golden_bytes(RawCodec()) == RAW

@pytest.mark.parametrize("data", [RAW, ZSTD], ids=["raw", "zstd"])
def test_golden_files_decode_to_the_golden_cache(data):
    kv, expected = load(data), golden_cache()
    assert kv.token_ids == expected.token_ids
    for a, b in zip(kv.keys + kv.values, expected.keys + expected.values):
        assert a.dtype == torch.float16 and torch.equal(a, b)
    assert [kv.token_start(i) for i in range(2)] == [0, 2]

def test_preamble_layout():
    magic, major, minor, hlen, hcrc = struct.unpack("<8sHHII", RAW[:20])
    assert magic == b"\x89KVC\r\n\x1a\n" and (major, minor) == (1, 0)
    assert zlib.crc32(RAW[20 : 20 + hlen]) == hcrc

def flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1 :]

def header_len(data: bytes) -> int:
    return struct.unpack("<I", data[12:16])[0]

REFUSALS = {
    "empty file": (lambda d: b"", FormatError, "truncated"),
    "truncated preamble": (lambda d: d[:15], FormatError, "truncated"),
    "truncated data": (lambda d: d[:-1], FormatError, "truncated: segments end at byte"),
    "trailing bytes": (lambda d: d + b"\0", FormatError, "trailing bytes"),
    "flipped data byte": (lambda d: flip(d, len(d) - 3), FormatError, "segment layer 1 V tokens [3, 5): checksum mismatch"),
    "flipped header byte": (lambda d: flip(d, 40), FormatError, "header checksum mismatch"),
    "wrong magic": (lambda d: b"PK\x03\x04" + d[4:], FormatError, "wrong magic"),
    "future major version": (lambda d: d[:8] + struct.pack("<H", 2) + d[10:], VersionError, "major version 2"),
    "header longer than file": (lambda d: d[:12] + struct.pack("<I", len(d)) + d[16:], FormatError, "header claims"),
    "header length over cap": (lambda d: d[:12] + struct.pack("<I", (64 << 20) + 1) + d[16:], FormatError, "outside"),
    "header not json": (lambda d: rewrite_raw(d, b"{not json"), FormatError, "not valid JSON"),
    "segment gap": (lambda d: rewrite_header(d, lambda h: h["segments"][1].__setitem__(4, h["segments"][1][4] + 1)),
                    FormatError, "gap or overlap"),
    "segment layer out of range": (lambda d: rewrite_header(d, lambda h: h["segments"][0].__setitem__(1, 7)),
                                   FormatError, "layer 7 is outside"),
    "token count too large": (lambda d: rewrite_header(d, lambda h: h["segments"][0].__setitem__(3, 10**9)),
                              FormatError, "token_count"),
    "missing layer coverage": (lambda d: rewrite_header(d, lambda h: h["layers"].append(dict(h["layers"][0]))),
                               FormatError, "layer 2 K does not cover"),
    "unknown dtype": (lambda d: rewrite_header(d, lambda h: h.__setitem__("dtype", "int8")), FormatError, "unknown dtype"),
    "unknown codec": (lambda d: rewrite_header(d, lambda h: h["codec"].__setitem__("name", "lzma")), FormatError, "unknown codec"),
    "heads over cap": (lambda d: rewrite_header(d, lambda h: h["layers"][0].__setitem__("kv_heads", 10**6)), FormatError, "kv_heads"),
    "no token ids": (lambda d: rewrite_header(d, lambda h: h.__setitem__("token_ids", [])), FormatError, "token count 0"),
    "missing model": (lambda d: rewrite_header(d, lambda h: h.pop("model")), FormatError, "'model' is missing"),
}

def rewrite_raw(data: bytes, raw: bytes) -> bytes:
    hlen = header_len(data)
    return format.PREAMBLE.pack(format.MAGIC, 1, 0, len(raw), zlib.crc32(raw)) + raw + data[20 + hlen :]

@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_reader_refuses(case):
    damage, error, message = REFUSALS[case]
    with pytest.raises(error) as info:
        load(damage(RAW))
    assert message in str(info.value)
    assert "\n" not in str(info.value)

def test_verify_names_the_bad_segment():
    data = flip(RAW, len(RAW) - 3)
    src = format.BytesSource(data, "t.kvc")
    with pytest.raises(FormatError, match=r"t.kvc: segment layer 1 V tokens \[3, 5\)"):
        kvfile.verify(src, format.read_header(src))

def test_atomic_write_leaves_no_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "out.kvc"

    def boom(fh, chunks):
        fh.write(chunks[0][:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(format, "_write_all", boom)
    with pytest.raises(KeyboardInterrupt):
        format.atomic_write(str(target), [b"hello", b"world"])
    assert list(tmp_path.iterdir()) == []

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_files_fail_cleanly(data):
    base = bytearray(data.draw(st.sampled_from([RAW, ZSTD])))
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(base) - 1)) if base else 0
        if op == "flip" and base:
            base[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del base[pos:]
        else:
            base[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        load(bytes(base))
    except KvcliError:
        pass

@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_random_bytes_fail_cleanly(blob):
    with pytest.raises(KvcliError):
        load(format.MAGIC + struct.pack("<HH", 1, 0) + blob)

@settings(max_examples=100, deadline=None)
@given(st.data())
def test_fuzz_mutated_segments_with_valid_checksums(data):
    """Damage that passes the checksums must still be caught by the codec, never crash it."""
    def corrupt(h):
        row = h["segments"][data.draw(st.integers(0, len(h["segments"]) - 1))]
        row[3] = data.draw(st.integers(1, 4))

    try:
        load(rewrite_header(ZSTD, corrupt))
    except KvcliError:
        pass

def test_reader_allocation_is_bounded_by_header_caps():
    """A header may claim at most MAX_SEGMENT_ELEMENTS per segment; claims beyond are refused before reading."""
    def huge(h):
        h["layers"][0]["key_dim"] = 4096
        h["layers"][0]["kv_heads"] = 1024
        h["token_ids"] = [1] * 100
    with pytest.raises(FormatError):
        load(rewrite_header(RAW, huge))

def test_bytes_source_matches_file_source(tmp_path):
    path = tmp_path / "g.kvc"
    path.write_bytes(ZSTD)
    with format.FileSource(path) as src:
        a = kvfile.decode(src, format.read_header(src))
    b = load(ZSTD)
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))

def test_missing_file_is_an_input_error(tmp_path):
    from kvcli.errors import InputError

    with pytest.raises(InputError, match="no such file"):
        format.FileSource(tmp_path / "nope.kvc")

Path  # re-exported for fixtures in other modules
