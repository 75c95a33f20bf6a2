"""The .kvc container: golden bytes, one refusal per kind of damage, and a fuzz test of the reader."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from golden.make_golden import HERE, golden_bytes, golden_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvcli.codecs.raw import RawCodec

from kvcli.container import format, kvfile
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
    assert magic == b"\x89KVC\r\n\x1a\n" and (major, minor) == (2, 0)
    assert zlib.crc32(RAW[20 : 20 + hlen]) == hcrc

def flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1 :]

def header_len(data: bytes) -> int:
    return struct.unpack("<I", data[12:16])[0]

def set_row(i: int, col: int, value):
    return lambda d: rewrite_header(d, lambda h: h["segments"][i].__setitem__(col, value))

def set_field(*path_and_value):
    *path, value = path_and_value

    def change(h):
        node = h
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return lambda d: rewrite_header(d, change)

def deep(depth: int) -> bytes:
    return b'{"x":' + b"[" * depth + b"]" * depth + b"}"

REFUSALS = {
    "empty file": (lambda d: b"", FormatError, "truncated: 0 bytes is shorter than the 20-byte preamble"),
    "truncated preamble": (lambda d: d[:15], FormatError, "truncated: 15 bytes is shorter"),
    "truncated data": (lambda d: d[:-1], FormatError, "truncated: segments end at byte"),
    "trailing bytes": (lambda d: d + b"\0", FormatError, "trailing bytes"),
    "flipped data byte": (lambda d: flip(d, len(d) - 3), FormatError, "segment layer 1 V tokens [3, 5): checksum mismatch"),
    "flipped header byte": (lambda d: flip(d, 40), FormatError, "header checksum mismatch"),
    "wrong magic": (lambda d: b"PK\x03\x04" + d[4:], FormatError, "wrong magic"),
    "future major version": (lambda d: d[:8] + struct.pack("<H", 3) + d[10:], VersionError, "major version 3 is not supported"),
    "version 1 file": (lambda d: V1, VersionError, "a .kvc 1.x file (kvcli 0.1)"),
    "future major version, header damaged": (lambda d: flip(d[:8] + struct.pack("<H", 3) + d[10:], 40), FormatError,
                                             "looks corrupt, not another version's file: major version 3, and header "
                                             "checksum mismatch"),
    "future major version, header length damaged": (lambda d: d[:8] + struct.pack("<HHI", 3, 0, len(d)) + d[16:],
                                                    FormatError, "looks corrupt, not another version's file: major "
                                                    "version 3, and truncated: header claims"),
    "version 1 file, header damaged": (lambda d: flip(V1, 40), FormatError,
                                       "looks corrupt, not another version's file: major version 1, and header "
                                       "checksum mismatch"),
    "major version 0": (lambda d: d[:8] + struct.pack("<H", 0) + d[10:], FormatError,
                        "looks corrupt: major version 0 never existed"),
    "header longer than file": (lambda d: d[:12] + struct.pack("<I", len(d)) + d[16:], FormatError, "header claims"),
    "header length over cap": (lambda d: d[:12] + struct.pack("<I", (64 << 20) + 1) + d[16:], FormatError,
                               "header length 67108865 is outside [2, 67108864]"),
    "header not json": (lambda d: rewrite_raw(d, b"{not json"), FormatError, "header is not valid JSON"),
    "header not an object": (lambda d: rewrite_raw(d, b"[1, 2]"), FormatError, "header is not a JSON object"),
    "header not utf-8": (lambda d: rewrite_raw(d, b'{"a": "\xff"}'), FormatError, "header is not valid UTF-8"),
    "header nested 200,000 deep": (lambda d: rewrite_raw(d, deep(200_000)), FormatError, "nests 200001 levels deep"),
    "header nested 9 deep": (lambda d: rewrite_raw(d, deep(8)), FormatError, "nests 9 levels deep, more than 8"),
    "5,001-digit integer": (lambda d: rewrite_raw(d, b'{"x": ' + b"7" * 5001 + b"}"), FormatError,
                            "has a number that cannot be read"),
    "NaN": (lambda d: rewrite_raw(d, b'{"x": NaN}'), FormatError, "has NaN, which JSON does not allow"),
    "huge float": (lambda d: rewrite_raw(d, b'{"x": 1e999}'), FormatError, "not finite"),
    "segment gap": (lambda d: rewrite_header(d, lambda h: h["segments"][1].__setitem__(4, h["segments"][1][4] + 1)),
                    FormatError, "segment 1: offset 49 leaves a gap or overlap (expected 48)"),
    "segment layer out of range": (set_row(0, 1, 7), FormatError, "segment 0: layer 7 is outside [0, 1]"),
    "segment token_start out of range": (set_row(0, 2, 5), FormatError, "segment 0: token_start 5 is outside [0, 4]"),
    "token count too large": (set_row(0, 3, 10**9), FormatError, "segment 0: token_count 1000000000 is outside [1, 5]"),
    "segment starts late": (set_row(0, 2, 1), FormatError, "layer 0 K starts at token 1, expected 0"),
    "unknown segment kind": (set_row(0, 0, "q"), FormatError, "segment 0: unknown kind 'q'"),
    "segment length over cap": (set_row(0, 5, (1 << 30) + 1), FormatError, "length 1073741825 or crc32"),
    "negative offset": (set_row(0, 4, -1), FormatError, "segment 0: offset must be a non-negative integer"),
    "segment row too short": (lambda d: rewrite_header(d, lambda h: h["segments"][0].pop()), FormatError,
                              "expected [kind, layer, token_start, token_count, offset, length, crc32]"),
    "missing layer coverage": (lambda d: rewrite_header(d, lambda h: h["layers"].append(dict(h["layers"][0]))),
                               FormatError, "layer 2 K does not cover all 5 tokens"),
    "unknown dtype": (set_field("dtype", "int8"), FormatError, "unknown dtype 'int8'"),
    "unknown codec": (set_field("codec", "name", "lzma"), FormatError, "unknown codec 'lzma'"),
    "heads over cap": (set_field("layers", 0, "kv_heads", 10**6), FormatError, "'kv_heads' = 1000000 is outside [1, 1024]"),
    "head dim over cap": (set_field("layers", 0, "key_dim", 4097), FormatError, "'key_dim' = 4097 is outside [1, 4096]"),
    "layer token_start past the end": (set_field("layers", 1, "token_start", 5), FormatError,
                                       "'token_start' = 5 is outside [0, 4]"),
    "bool where an int belongs": (set_field("chunk_tokens", True), FormatError, "'chunk_tokens' has the wrong type"),
    "no token ids": (set_field("token_ids", []), FormatError, "token count 0 is outside"),
    "negative token id": (set_field("token_ids", [11, -1, 13, 14, 15]), FormatError, "token_ids must be non-negative"),
    "missing model": (lambda d: rewrite_header(d, lambda h: h.pop("model")), FormatError, "'model' is missing"),
    "digest not hex": (set_field("model", "weights_digest", "w" * 64), FormatError,
                       "model weights_digest must be 64 lowercase hex digits"),
    "empty architecture": (set_field("model", "architecture", ""), FormatError, "'architecture' must have 1 to 256"),
    "bad created_at": (set_field("created_at", "yesterday"), FormatError, "created_at must look like"),
    "bad source": (set_field("source", {"sha256": "x", "bytes": 3}), FormatError, "source must be"),
    "negative source bytes": (set_field("source", {"sha256": "a" * 64, "bytes": -3}), FormatError,
                              "'bytes' = -3 is outside"),
    "duplicate aux names": (lambda d: with_aux(d, [("t", b"ab"), ("t", b"cd")]), FormatError, "used twice"),
    "aux segment with a gap": (lambda d: rewrite_header(d, lambda h: h["aux"].append(["x", 3, 0, 0])), FormatError,
                               "aux segment 0: offset 3 leaves a gap or overlap (expected 0)"),
}

def with_aux(data: bytes, blobs: list[tuple[str, bytes]]) -> bytes:
    """`data` with aux segments in front of its tensor data, offsets and checksums made valid."""
    _, major, minor, hlen, _ = format.PREAMBLE.unpack(data[: format.PREAMBLE_SIZE])
    doc = json.loads(data[format.PREAMBLE_SIZE : format.PREAMBLE_SIZE + hlen])
    shift, aux = 0, []
    for name, blob in blobs:
        aux.append([name, shift, len(blob), zlib.crc32(blob)])
        shift += len(blob)
    doc["aux"] = aux
    for row in doc["segments"]:
        row[4] += shift
    raw = json.dumps(doc).encode()
    body = data[format.PREAMBLE_SIZE + hlen :]
    return format.PREAMBLE.pack(format.MAGIC, major, minor, len(raw), zlib.crc32(raw)) + raw + b"".join(b for _, b in blobs) + body

def rewrite_raw(data: bytes, raw: bytes) -> bytes:
    hlen = header_len(data)
    return format.PREAMBLE.pack(format.MAGIC, format.MAJOR, 0, len(raw), zlib.crc32(raw)) + raw + data[20 + hlen :]

V1 = (HERE / "v1-tiny-raw.kvc").read_bytes()

@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_reader_refuses(case):
    damage, error, message = REFUSALS[case]
    with pytest.raises(error) as info:
        load(damage(RAW))
    assert message in str(info.value)
    assert "\n" not in str(info.value)

SCHEMA_CASES = ["unknown dtype", "heads over cap", "head dim over cap", "bool where an int belongs", "no token ids",
                "negative token id", "missing model", "digest not hex", "empty architecture", "bad created_at",
                "bad source", "negative source bytes", "segment length over cap", "negative offset",
                "segment row too short", "unknown segment kind", "token count too large"]

def header_doc(data: bytes) -> dict:
    hlen = header_len(data)
    return json.loads(data[format.PREAMBLE_SIZE : format.PREAMBLE_SIZE + hlen])

def test_published_schema_accepts_written_headers_and_rejects_malformed_ones():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parent.parent / "docs" / "kvc-header.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for data in (RAW, ZSTD):
        validator.validate(header_doc(data))
    for case in SCHEMA_CASES:
        damaged = REFUSALS[case][0](RAW)
        assert not validator.is_valid(header_doc(damaged)), case
    # Every field the reader knows is in the schema, and nothing else is required.
    assert set(schema["properties"]) == format.KNOWN_FIELDS

@pytest.mark.parametrize("minor", [0, 7])
def test_unknown_fields_are_read_past_whatever_the_minor_version(minor):
    """A minor version adds optional fields only: a 2.7 writer's file decodes here, its new fields kept as extra.
    The reader never compares the minor version: a 2.0 file with fields it does not know is read the same way,
    and unknown members of the model, layer and codec objects are ignored as well (docs/format.md)."""
    def change(h):
        h.update(future_field={"x": [1, 2]}, another="y")
        h["model"]["future"] = 1
        h["layers"][0]["future"] = [2]
        h["codec"]["future"] = "z"
    data = rewrite_header(RAW, change)
    data = data[:10] + struct.pack("<H", minor) + data[12:]
    src = format.BytesSource(data, "t.kvc")
    header = format.read_header(src)
    assert (header.major, header.minor) == (2, minor)
    assert header.extra == {"future_field": {"x": [1, 2]}, "another": "y"}
    kv, expected = kvfile.decode(src, header), golden_cache()
    assert all(torch.equal(a, b) for a, b in zip(kv.keys + kv.values, expected.keys + expected.values))

@pytest.mark.parametrize("data", [RAW, ZSTD], ids=["raw", "zstd"])
def test_lossless_codecs_refuse_aux_segments(data):
    damaged = with_aux(data, [("t", b"ab")])
    for run in (kvfile.decode, kvfile.verify):
        src = format.BytesSource(damaged, "t.kvc")
        with pytest.raises(FormatError, match=r"t.kvc: codec tables: codec (raw|zstd) takes no aux segments, "
                                              r"found \['t'\]"):
            run(src, format.read_header(src))

def test_raw_segments_must_hold_exactly_their_elements():
    """Two segments' lengths traded (one 2 bytes short, the next 2 long) keep the file's total, so only the codec
    can tell: verify must refuse what decode refuses."""
    def trade(h):
        h["segments"][0][5] -= 2
        h["segments"][1][4] -= 2
        h["segments"][1][5] += 2
    damaged = rewrite_header(RAW, trade)
    doc = header_doc(damaged)
    body = damaged[format.PREAMBLE_SIZE + header_len(damaged) :]
    for row in doc["segments"][:2]:
        row[6] = zlib.crc32(body[row[4] : row[4] + row[5]])
    damaged = rewrite_header(damaged, lambda h: h.update(segments=doc["segments"]))
    for run in (kvfile.decode, kvfile.verify):
        src = format.BytesSource(damaged, "t.kvc")
        with pytest.raises(FormatError, match=r"segment layer 0 K tokens \[0, 3\): cannot decode: .*46 bytes, "
                                              r"expected 48"):
            run(src, format.read_header(src))

@pytest.mark.parametrize("chunk", [0, 1 << 23, 2.5, True])
def test_writer_refuses_a_chunk_length_no_reader_takes(chunk):
    with pytest.raises(ValueError, match="chunk_tokens must be an integer in"):
        kvfile.encode(golden_cache(), {}, RawCodec(), chunk)

def test_writer_refuses_a_negative_chunk_length():
    """It looped without end (where 0 divided by zero): run apart, with a deadline."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'tests'); from golden.make_golden import golden_cache; "
            "from kvcli.codecs.raw import RawCodec; from kvcli.container import kvfile; "
            "kvfile.encode(golden_cache(), {}, RawCodec(), -1)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).parent.parent)
    assert run.returncode == 1 and "ValueError: chunk_tokens must be an integer in" in run.stderr, run.stderr[-500:]

def test_known_optional_fields_are_not_extra():
    header = format.read_header(format.BytesSource(RAW))
    assert header.created_by == "kvcli golden" and header.created_at == "2026-01-01T00:00:00Z"
    assert header.extra == {} and header.source is None

def test_verify_names_the_bad_segment():
    data = flip(RAW, len(RAW) - 3)
    src = format.BytesSource(data, "t.kvc")
    with pytest.raises(FormatError, match=r"t.kvc: segment layer 1 V tokens \[3, 5\)"):
        kvfile.verify(src, format.read_header(src))

def test_atomic_write_gives_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        format.atomic_write(str(tmp_path / "a.kvc"), [b"x"])
        os.umask(0o077)
        format.atomic_write(str(tmp_path / "b.kvc"), [b"x"])
    finally:
        os.umask(old)
    assert (tmp_path / "a.kvc").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.kvc").stat().st_mode & 0o777 == 0o600

def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_whose_writer_is_gone_are_swept(tmp_path):
    here, other = format.host_tag(), "0" * 12 if format.host_tag() != "0" * 12 else "1" * 12
    dead = tmp_path / f".out.kvc.kvcli-{here}_{dead_pid()}_0123456789ab.tmp"
    dead_other_target = tmp_path / f".x.kvc.kvcli-{here}_{dead_pid()}_0123456789ab.tmp"
    alive_old = tmp_path / f".out.kvc.kvcli-{here}_{os.getpid()}_0123456789ab.tmp"  # a slow writer, still at it
    elsewhere_old = tmp_path / f".out.kvc.kvcli-{other}_1_0123456789ab.tmp"
    elsewhere_fresh = tmp_path / f".out.kvc.kvcli-{other}_1_ba9876543210.tmp"
    unnamed_old = tmp_path / ".out.kvc.kvcli-0123456789ab.tmp"  # kvcli before HOST_PID
    unnamed_fresh = tmp_path / ".out.kvc.kvcli-ba9876543210.tmp"
    foreign = tmp_path / ".out.kvc.something.tmp"
    for p in (dead, dead_other_target, alive_old, elsewhere_old, elsewhere_fresh, unnamed_old, unnamed_fresh, foreign):
        p.write_bytes(b"partial")
    hours_ago = time.time() - 2 * format.STALE_TEMP_SECONDS
    for p in (alive_old, elsewhere_old, unnamed_old, foreign):
        os.utime(p, (hours_ago, hours_ago))
    format.atomic_write(str(tmp_path / "out.kvc"), [b"done"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.kvc", alive_old.name, elsewhere_fresh.name, unnamed_fresh.name, foreign.name])


def test_a_directory_is_swept_once_then_every_few_minutes(tmp_path, monkeypatch):
    """A sweep lists the directory; a store may hold millions of files, so not one sweep per write."""
    swept = []
    real = format.sweep_stale_temporaries
    monkeypatch.setattr(format, "sweep_stale_temporaries", lambda d, *a: swept.append(d) or real(d, *a))
    for name in ("a.kvc", "b.kvc", "c.kvc"):
        format.atomic_write(str(tmp_path / name), [b"x"])
    assert len(swept) == 1
    later = time.monotonic() + format.SWEEP_EVERY_SECONDS + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    format.atomic_write(str(tmp_path / "d.kvc"), [b"x"])
    assert len(swept) == 2


def test_the_writers_own_temporary_carries_its_host_and_pid(tmp_path, monkeypatch):
    seen = []
    real = format._write_all
    monkeypatch.setattr(format, "_write_all", lambda fh, chunks: seen.append(os.listdir(tmp_path)) or real(fh, chunks))
    format.atomic_write(str(tmp_path / "out.kvc"), [b"x"])
    [[name]] = seen
    assert format.TEMP_NAME.match(name)["host"] == format.host_tag()
    assert format.TEMP_NAME.match(name)["pid"] == str(os.getpid())


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
        load(format.MAGIC + struct.pack("<HH", format.MAJOR, 0) + blob)

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


class Endless:
    """A stream that never ends (`yes |`), counting what is read from it."""

    def __init__(self, head: bytes = b""):
        self.head, self.taken = head, 0

    def read(self, n: int) -> bytes:
        data = self.head[self.taken : self.taken + n]
        data += b"y" * (n - len(data))
        self.taken += n
        return data


def test_a_stream_is_read_as_far_as_the_file_goes():
    import io

    src = format.read_stream(io.BytesIO(RAW))
    assert src.read(0, src.size) == RAW and format.read_header(src).num_tokens == 5


@pytest.mark.parametrize("head, message", [
    (b"", "not a .kvc file (wrong magic)"),
    (format.MAGIC, "header length 2038004089 is outside"),
    (RAW, f"trailing bytes: segments end at byte {len(RAW)} but the input goes on"),
])
def test_an_endless_stream_is_refused_after_its_first_bytes(head, message):
    stream = Endless(head)
    with pytest.raises(FormatError, match=re.escape(message)):
        format.read_header(format.read_stream(stream))
    assert stream.taken <= len(head) + format.PREAMBLE_SIZE + 1


def test_a_stream_shorter_than_its_header_claims_is_truncated():
    import io

    with pytest.raises(FormatError, match="truncated: segments end at byte"):
        format.read_header(format.read_stream(io.BytesIO(RAW[:-3])))
