"""The .kvc container, version 2: the only code that reads or writes .kvc bytes.

docs/format.md is the normative spec; this module implements it and imports no torch.

    0   8  magic  b"\\x89KVC\\r\\n\\x1a\\n"
    8   2  major  (u16 LE)
    10  2  minor  (u16 LE)
    12  4  header length H (u32 LE)
    16  4  CRC-32 of the header bytes (u32 LE)
    20  H  header: one UTF-8 JSON object
    20+H   segments, back to back, in index order, ending exactly at the end of the file
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import FormatError, InputError, StorageError, UsageError, VersionError
from ..stdio import ShortWrite, reason, write_all, write_stdout

MAGIC = b"\x89KVC\r\n\x1a\n"
MAJOR = 2
MINOR = 0
PREAMBLE = struct.Struct("<8sHHII")
PREAMBLE_SIZE = PREAMBLE.size  # 20

# Bounds on what a reader accepts, so a hostile header cannot make it allocate without limit.
MAX_HEADER_BYTES = 64 << 20
MAX_TOKENS = 1 << 22
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_SEGMENT_ELEMENTS = 1 << 28
MAX_SEGMENT_BYTES = 1 << 30
MAX_AUX_BYTES = 64 << 20

MAX_JSON_DEPTH = 8  # the header's deepest legitimate nesting is 4 (segments rows); codec params get a little room
MAX_NAME_CHARS = 256

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
DIGEST_FIELDS = ("config_digest", "weights_digest", "tokenizer_digest")
HEX64 = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: "$" would let a trailing newline through
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# Fields whose meaning this reader knows; anything else is kept under Header.extra (a newer minor version's).
KNOWN_FIELDS = frozenset({"model", "dtype", "token_ids", "layers", "chunk_tokens", "codec", "aux", "segments",
                          "created_by", "created_at", "source"})

# Temporary files are named .NAME.kvcli-HOST_PID_RANDOM.tmp beside their target. HOST stands for this boot of this
# machine and its pid namespace, so a later writer can tell that a temporary's writer is gone (kill -9, a crash)
# and remove it at once. A temporary of another machine or container, or an older name without HOST and PID, is
# removed once untouched for STALE_TEMP_SECONDS.
TEMP_MARK = ".kvcli-"
TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARK)
                       + r"(?:(?P<host>[0-9a-f]{12})_(?P<pid>[0-9]{1,10})_)?[A-Za-z0-9_]+\.tmp$")
STALE_TEMP_SECONDS = 3600
# A writer sweeps a directory when it first writes there, then at most this often: a sweep lists the whole
# directory, and a store may hold millions of files.
SWEEP_EVERY_SECONDS = 600


@dataclass(frozen=True)
class Segment:
    kind: str  # "k", "v" or "aux"
    layer: int  # -1 for aux
    token_start: int  # absolute position of the first token in the segment
    token_count: int
    offset: int  # from the start of the data section
    length: int
    crc32: int
    name: str = ""  # aux segments only

    def label(self) -> str:
        if self.kind == "aux":
            return f"aux segment {self.name!r}"
        end = self.token_start + self.token_count
        return f"segment layer {self.layer} {self.kind.upper()} tokens [{self.token_start}, {end})"


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    key_dim: int
    value_dim: int
    token_start: int  # first position this layer holds; > 0 only for sliding-window layers


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    model: dict
    dtype: str
    token_ids: list[int]
    layers: list[LayerShape]
    chunk_tokens: int
    codec: dict
    segments: list[Segment]
    data_offset: int
    extra: dict  # fields this reader does not interpret, kept for inspect
    created_by: str = ""
    created_at: str = ""  # UTC, YYYY-MM-DDTHH:MM:SSZ
    source: dict | None = None  # {"sha256": hex, "bytes": int} of the document the cache was made from

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def data_bytes(self) -> int:
        return sum(s.length for s in self.segments)

    def elements(self) -> int:
        """Number of K and V elements the file describes, over all layers."""
        total = 0
        for shape in self.layers:
            held = self.num_tokens - shape.token_start
            total += shape.kv_heads * held * (shape.key_dim + shape.value_dim)
        return total

    def decoded_bytes(self) -> int:
        """Bytes the decoded K and V tensors occupy in the header's dtype."""
        return self.elements() * DTYPES[self.dtype]


class ByteSource(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...


class Source:
    """What every ByteSource shares: a context manager that closes it (closing owns nothing by default)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileSource(Source):
    """Positional reads from a file, so segments can be read in any order."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory, expected a .kvc file") from None
        except OSError as err:
            raise StorageError(f"{self.path}: cannot open: {err.strerror}") from None
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FormatError(f"{self.path}: file changed while being read")
        return data

    def close(self) -> None:
        os.close(self._fd)


class BytesSource(Source):
    def __init__(self, data: bytes, name: str = "<stdin>"):
        self.data = data
        self.size = len(data)
        self.path = name

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def open_source(path: str) -> FileSource | BytesSource:
    """`-` reads a .kvc file from stdin (not from a terminal: nobody types one); anything else is a path."""
    if path != "-":
        return FileSource(path)
    if sys.stdin is None:
        raise InputError("<stdin>: stdin is closed (<&-); pipe a .kvc file in or give its path")
    if sys.stdin.isatty():
        raise UsageError("refusing to read binary data from a terminal; pipe a .kvc file in or give its path")
    return read_stream(sys.stdin.buffer)


STREAM_BLOCK = 16 << 20


def read_stream(fh: BinaryIO, name: str = "<stdin>") -> BytesSource:
    """A .kvc file from a stream, read no further than the file can go: the preamble, the header it announces,
    the segments the header lists. Input that is no .kvc file is refused after its first bytes (not read to
    the end: `yes | kvcli inspect -` would never end), and input that goes on past the last segment is refused
    at once, without reading the rest."""
    data = _read_upto(fh, PREAMBLE_SIZE)
    magic, _, _, hlen, _ = PREAMBLE.unpack(data.ljust(PREAMBLE_SIZE, b"\0"))
    if len(data) < PREAMBLE_SIZE or magic != MAGIC or not 2 <= hlen <= MAX_HEADER_BYTES:
        return BytesSource(bytes(data), name)  # read_header says what is wrong
    data += _read_upto(fh, hlen)
    header = read_header(BytesSource(bytes(data), name), whole=False)
    data += _read_upto(fh, header.data_offset + header.data_bytes() - len(data))
    if fh.read(1):
        raise FormatError(f"{name}: trailing bytes: segments end at byte {len(data)} but the input goes on")
    return BytesSource(bytes(data), name)


def _read_upto(fh: BinaryIO, n: int) -> bytearray:
    """Up to n bytes, fewer only at the end of the stream; a block at a time, so a size that a damaged header
    claims is never allocated before the bytes are there."""
    data = bytearray()
    while len(data) < n:
        block = fh.read(min(n - len(data), STREAM_BLOCK))
        if not block:
            break
        data += block
    return data


# ---------------------------------------------------------------- reading


def read_header(src: ByteSource, whole: bool = True) -> Header:
    """The header, every check made; `whole=False` leaves out the one that the source holds exactly the
    segments the header lists (read_stream reads them after the header)."""
    name = getattr(src, "path", "<input>")
    major, minor, raw = read_preamble(src, name)
    doc = parse_json(raw, f"{name}: header")
    header = _parse_header(doc, major, minor, PREAMBLE_SIZE + len(raw), name)
    expected = header.data_offset + header.data_bytes()
    if whole and expected != src.size:
        what = "truncated" if src.size < expected else "trailing bytes"
        raise FormatError(f"{name}: {what}: segments end at byte {expected} but the file has {src.size} bytes")
    return header


def read_preamble(src: ByteSource, name: str) -> tuple[int, int, bytes]:
    """Major, minor and the header bytes, with every check of the preamble. Every major version keeps this
    preamble, so a version this reader does not know is a VersionError only when magic, header length and header
    CRC check out, as in a newer file; with them damaged too, or a version that never existed, the file looks
    corrupt (FormatError)."""
    if src.size < PREAMBLE_SIZE:
        if src.size >= 8 and src.read(0, 8) != MAGIC:
            raise FormatError(f"{name}: not a .kvc file (wrong magic)")
        raise FormatError(f"{name}: truncated: {src.size} bytes is shorter than the {PREAMBLE_SIZE}-byte preamble")
    magic, major, minor, hlen, hcrc = PREAMBLE.unpack(src.read(0, PREAMBLE_SIZE))
    if magic != MAGIC:
        raise FormatError(f"{name}: not a .kvc file (wrong magic)")
    raw, damage = _header_bytes(src, hlen, hcrc)
    if major == 0:
        raise FormatError(f"{name}: looks corrupt: major version 0 never existed")
    if major != MAJOR and damage:
        raise FormatError(f"{name}: looks corrupt, not another version's file: major version {major}, and {damage}")
    if damage:
        raise FormatError(f"{name}: {damage}")
    if major == 1:
        raise VersionError(
            f"{name}: a .kvc 1.x file (kvcli 0.1), whose model identity this kvcli cannot check; "
            "re-create it with `kvcli prefill` (format 2 binds caches to the model's tensors and config)"
        )
    if major != MAJOR:
        raise VersionError(
            f"{name}: .kvc major version {major} is not supported (this kvcli reads version {MAJOR}); "
            "upgrade kvcli or re-create the cache"
        )
    return major, minor, raw


def _header_bytes(src: ByteSource, hlen: int, hcrc: int) -> tuple[bytes, str | None]:
    """The header the preamble points at, or what is wrong with the preamble's length and CRC."""
    if hlen < 2 or hlen > MAX_HEADER_BYTES:
        return b"", f"header length {hlen} is outside [2, {MAX_HEADER_BYTES}]"
    if PREAMBLE_SIZE + hlen > src.size:
        return b"", f"truncated: header claims {hlen} bytes but only {src.size - PREAMBLE_SIZE} follow the preamble"
    raw = src.read(PREAMBLE_SIZE, hlen)
    if zlib.crc32(raw) != hcrc:
        return raw, "header checksum mismatch (file is corrupt)"
    return raw, None


def read_segment(src: ByteSource, header: Header, seg: Segment) -> bytes:
    """The bytes of one segment, checksum verified."""
    data = src.read(header.data_offset + seg.offset, seg.length)
    if len(data) != seg.length:
        raise FormatError(f"{getattr(src, 'path', '<input>')}: {seg.label()} is truncated")
    if zlib.crc32(data) != seg.crc32:
        raise FormatError(f"{getattr(src, 'path', '<input>')}: {seg.label()}: checksum mismatch (file is corrupt)")
    return data


def parse_json(raw: bytes, where: str):
    """JSON with the limits a fixed-shape header allows: bounded nesting (refused before the parser can
    recurse), finite numbers only; integers too long to convert are refused, and every field's range is checked
    by the schema validation that follows."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(f"{where} is not valid UTF-8 (byte {err.start})") from None
    bare = _JSON_STRING.sub('""', text)  # numbers and brackets inside strings are not numbers or nesting
    depth = _max_depth(bare)
    if depth > MAX_JSON_DEPTH:
        raise FormatError(f"{where} nests {depth} levels deep, more than {MAX_JSON_DEPTH}")

    def parse_float(digits: str) -> float:
        value = float(digits) if len(digits) <= 64 else float("inf")
        if value != value or value in (float("inf"), float("-inf")):
            raise FormatError(f"{where} has a number that is not finite or too long: {digits[:40]}")
        return value

    def parse_constant(token: str):
        raise FormatError(f"{where} has {token}, which JSON does not allow")

    try:
        return json.loads(text, parse_float=parse_float, parse_constant=parse_constant)
    except json.JSONDecodeError as err:
        raise FormatError(f"{where} is not valid JSON: {err}") from None
    except ValueError as err:  # Python refuses integers of more than 4,300 digits; ranges are checked later
        raise FormatError(f"{where} has a number that cannot be read: {str(err)[:80]}") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _max_depth(bare: str) -> int:
    """Deepest [ or { nesting of JSON text whose strings were emptied. Everything but brackets is dropped by a
    regular expression first (C speed), so the Python loop only sees the brackets."""
    brackets = _NOT_BRACKET.sub("", bare)
    depth = deepest = 0
    for ch in brackets:
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _req(doc: dict, key: str, kind: type | tuple, where: str):
    if not isinstance(doc, dict) or key not in doc:
        raise FormatError(f"{where}: header field {key!r} is missing")
    value = doc[key]
    # bool is an int in Python; no field of ours is a bool where an int is expected.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"{where}: header field {key!r} has the wrong type")
    return value


def _int_in(doc: dict, key: str, lo: int, hi: int, where: str) -> int:
    value = _req(doc, key, int, where)
    if not lo <= value <= hi:
        raise FormatError(f"{where}: header field {key!r} = {value} is outside [{lo}, {hi}]")
    return value


def _parse_header(doc: object, major: int, minor: int, data_offset: int, where: str) -> Header:
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    model = _req(doc, "model", dict, where)
    _short_str(model, "architecture", where)
    if "name" in model:
        _short_str(model, "name", where)
    for field in DIGEST_FIELDS:
        if not HEX64.fullmatch(_req(model, field, str, where)):
            raise FormatError(f"{where}: model {field} must be 64 lowercase hex digits")
    dtype = _req(doc, "dtype", str, where)
    if dtype not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    token_ids = _req(doc, "token_ids", list, where)
    if not 1 <= len(token_ids) <= MAX_TOKENS:
        raise FormatError(f"{where}: token count {len(token_ids)} is outside [1, {MAX_TOKENS}]")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in token_ids):
        raise FormatError(f"{where}: token_ids must be non-negative integers")
    n = len(token_ids)
    layers_doc = _req(doc, "layers", list, where)
    if not 1 <= len(layers_doc) <= MAX_LAYERS:
        raise FormatError(f"{where}: layer count {len(layers_doc)} is outside [1, {MAX_LAYERS}]")
    layers = [
        LayerShape(
            kv_heads=_int_in(ld, "kv_heads", 1, MAX_HEADS, where),
            key_dim=_int_in(ld, "key_dim", 1, MAX_HEAD_DIM, where),
            value_dim=_int_in(ld, "value_dim", 1, MAX_HEAD_DIM, where),
            token_start=_int_in(ld, "token_start", 0, n - 1, where),
        )
        for ld in layers_doc
    ]
    chunk = _int_in(doc, "chunk_tokens", 1, MAX_TOKENS, where)
    codec = _req(doc, "codec", dict, where)
    _short_str(codec, "name", where)
    _req(codec, "params", dict, where)
    segments = _parse_segments(doc, layers, n, where)
    created_by = _short_str(doc, "created_by", where) if "created_by" in doc else ""
    created_at = _req(doc, "created_at", str, where) if "created_at" in doc else ""
    if created_at and not TIMESTAMP.fullmatch(created_at):
        raise FormatError(f"{where}: created_at must look like 2026-01-31T12:00:00Z")
    source = _parse_source(doc["source"], where) if "source" in doc else None
    extra = {k: v for k, v in doc.items() if k not in KNOWN_FIELDS}
    return Header(major, minor, model, dtype, token_ids, layers, chunk, codec, segments, data_offset, extra,
                  created_by, created_at, source)


def _short_str(doc: dict, key: str, where: str) -> str:
    value = _req(doc, key, str, where)
    if not 1 <= len(value) <= MAX_NAME_CHARS:
        raise FormatError(f"{where}: header field {key!r} must have 1 to {MAX_NAME_CHARS} characters")
    return value


def _parse_source(source: object, where: str) -> dict:
    if not isinstance(source, dict) or not HEX64.fullmatch(str(source.get("sha256", ""))):
        raise FormatError(f"{where}: source must be {{\"sha256\": 64 hex digits, \"bytes\": int}}")
    _int_in(source, "bytes", 0, 1 << 62, where)
    return source


def _parse_segments(doc: dict, layers: list[LayerShape], n: int, where: str) -> list[Segment]:
    """Aux rows [name, offset, length, crc32] then tensor rows
    [kind, layer, token_start, token_count, offset, length, crc32], contiguous from offset 0."""
    segments: list[Segment] = []
    cursor = 0

    def span(row: list, at: str) -> tuple[int, int, int]:
        nonlocal cursor
        offset, length, crc = row[-3:]
        for value, label in ((offset, "offset"), (length, "length"), (crc, "crc32")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FormatError(f"{at}: {label} must be a non-negative integer")
        if offset != cursor:
            raise FormatError(f"{at}: offset {offset} leaves a gap or overlap (expected {cursor})")
        if length > MAX_SEGMENT_BYTES or crc > 0xFFFFFFFF:
            raise FormatError(f"{at}: length {length} or crc32 {crc} out of range")
        cursor += length
        return offset, length, crc

    names: set[str] = set()
    for i, row in enumerate(_req(doc, "aux", list, where)):
        at = f"{where}: aux segment {i}"
        if not isinstance(row, list) or len(row) != 4 or not isinstance(row[0], str):
            raise FormatError(f"{at}: expected [name, offset, length, crc32]")
        if row[0] in names or not 1 <= len(row[0]) <= MAX_NAME_CHARS:
            raise FormatError(f"{at}: name {row[0][:40]!r} is empty, too long or used twice")
        names.add(row[0])
        offset, length, crc = span(row, at)
        if length > MAX_AUX_BYTES:
            raise FormatError(f"{at}: {length} bytes exceeds {MAX_AUX_BYTES}")
        segments.append(Segment("aux", -1, 0, 0, offset, length, crc, row[0]))

    covered: dict[tuple[int, str], int] = {}
    for i, row in enumerate(_req(doc, "segments", list, where)):
        at = f"{where}: segment {i}"
        if not isinstance(row, list) or len(row) != 7:
            raise FormatError(f"{at}: expected [kind, layer, token_start, token_count, offset, length, crc32]")
        kind, layer, start, count = row[:4]
        if kind not in ("k", "v"):
            raise FormatError(f"{at}: unknown kind {kind!r}")
        for value, label, lo, hi in ((layer, "layer", 0, len(layers) - 1), (start, "token_start", 0, n - 1)):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise FormatError(f"{at}: {label} {value!r} is outside [{lo}, {hi}]")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= n - start:
            raise FormatError(f"{at}: token_count {count!r} is outside [1, {n - start}]")
        offset, length, crc = span(row, at)
        shape = layers[layer]
        dim = shape.key_dim if kind == "k" else shape.value_dim
        if shape.kv_heads * count * dim > MAX_SEGMENT_ELEMENTS:
            raise FormatError(f"{at}: {shape.kv_heads * count * dim} elements exceed {MAX_SEGMENT_ELEMENTS}")
        # Each layer's K and V must be covered by its segments in token order, without holes or overlaps.
        expected_start = covered.get((layer, kind), shape.token_start)
        if start != expected_start:
            raise FormatError(f"{at}: layer {layer} {kind.upper()} starts at token {start}, expected {expected_start}")
        covered[(layer, kind)] = start + count
        segments.append(Segment(kind, layer, start, count, offset, length, crc))
    for li in range(len(layers)):
        for kind in ("k", "v"):
            if covered.get((li, kind)) != n:
                raise FormatError(f"{where}: layer {li} {kind.upper()} does not cover all {n} tokens")
    return segments


# ---------------------------------------------------------------- writing


@dataclass
class SegmentData:
    kind: str
    layer: int
    token_start: int
    token_count: int
    data: bytes
    name: str = ""


def build_header(meta: dict, parts: list[SegmentData]) -> bytes:
    """The preamble and header bytes for `meta` (model, dtype, token_ids, layers, chunk_tokens, codec, ...).

    `parts` must list aux segments first; the data section holds them in this order."""
    aux, rows = [], []
    offset = 0
    for p in parts:
        tail = [offset, len(p.data), zlib.crc32(p.data)]
        if p.kind == "aux":
            if rows:
                raise ValueError("aux segments must come before tensor segments")
            aux.append([p.name] + tail)
        else:
            rows.append([p.kind, p.layer, p.token_start, p.token_count] + tail)
        offset += len(p.data)
    doc = dict(meta, aux=aux, segments=rows)
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise FormatError(f"header of {len(raw)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    return PREAMBLE.pack(MAGIC, MAJOR, MINOR, len(raw), zlib.crc32(raw)) + raw


def write_kvc(out: str, meta: dict, parts: list[SegmentData]) -> int:
    """Write a complete file to path `out` atomically, or to stdout for `-`. Returns bytes written."""
    chunks = [build_header(meta, parts)] + [p.data for p in parts]
    write_output(out, chunks)
    return sum(len(c) for c in chunks)


def write_output(out: str, chunks: list[bytes]) -> None:
    """`-` writes to stdout; a device or pipe (`/dev/null`, `/dev/stdout`, a FIFO) is written through; anything
    else is a path written atomically. Write failures are StorageError."""
    if out == "-":
        write_stdout(chunks)  # a reader that stops early gets a cut-off file: an error (exit 8), never a quiet 141
    elif is_stream(out):
        write_through(out, chunks)
    else:
        atomic_write(out, chunks)


def is_stream(path: str) -> bool:
    """Whether `path` names something other than a regular file (a device, a FIFO, a socket), following links. A
    rename over it would replace the node itself: as root, `-o /dev/null` made /dev/null a regular file."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def write_through(path: str, chunks: list[bytes]) -> None:
    try:
        fh = open(path, "wb", buffering=0)
    except OSError as err:
        raise StorageError(f"{path}: cannot open for writing: {err.strerror}") from None
    try:
        with fh:
            write_all(fh, chunks)
    except ShortWrite as err:
        raise StorageError(f"{path}: write failed after {err.done:,} bytes: {reason(err)}") from None


def atomic_write(path: str, chunks: list[bytes], exclusive: bool = False) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file or none.
    `exclusive` never replaces a file that is there: FileExistsError instead, decided by link(2) in one step, so
    of two concurrent writers exactly one wins (a store's first writer, whose bytes an immutable ETag names).

    The new file gets the mode an ordinary open() would give it (0666 less the umask), so caches on shared
    storage are readable by the services that share it. Temporaries of earlier killed writers in the same
    directory are removed first (sweep_now_and_then)."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise StorageError(f"{path}: directory {directory} does not exist")
    if is_stream(path):  # the rename would replace the device or FIFO itself; write_output writes through them
        raise UsageError(f"{path}: not a regular file; give the name of a file to write")
    sweep_now_and_then(directory)
    tmp = directory / f".{target.name}{TEMP_MARK}{host_tag()}_{os.getpid()}_{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    except OSError as err:
        raise StorageError(f"{path}: cannot create a file in {directory}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_all(fh, chunks)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            _link_new(tmp, target)
        else:
            os.replace(tmp, target)
    except FileExistsError:
        _unlink_quietly(tmp)
        raise
    except OSError as err:
        _unlink_quietly(tmp)
        raise StorageError(f"{path}: write failed: {reason(err)}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


_last_sweep: dict[str, float] = {}  # directory -> time.monotonic() of this process's last sweep there


def sweep_now_and_then(directory: Path) -> None:
    """sweep_stale_temporaries, on this process's first write into `directory` and then every
    SWEEP_EVERY_SECONDS."""
    last = _last_sweep.get(os.path.abspath(directory))
    if last is None or time.monotonic() - last >= SWEEP_EVERY_SECONDS:
        sweep_stale_temporaries(directory)


def sweep_stale_temporaries(directory: Path, age: float = STALE_TEMP_SECONDS) -> int:
    """Remove kvcli's temporary files in `directory` whose writer is gone: of this machine, when its process
    has ended; of another machine or unnamed, when untouched for `age` seconds. Returns how many."""
    removed = 0
    cutoff = time.time() - age
    _last_sweep[os.path.abspath(directory)] = time.monotonic()
    try:
        with os.scandir(directory) as it:
            entries = [e for e in it if e.name.startswith(".") and TEMP_MARK in e.name]
    except OSError:
        return 0
    for entry in entries:
        name = TEMP_NAME.match(entry.name)
        try:
            if name and entry.is_file(follow_symlinks=False) and _writer_gone(name, entry, cutoff):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass  # gone already, or not ours to remove
    return removed


def _writer_gone(name: re.Match, entry: os.DirEntry, cutoff: float) -> bool:
    """For this machine's temporaries, whether the pid in the name has ended; for others, whether it is old."""
    if name["host"] != host_tag():  # another machine's pid says nothing here: only the age does
        return entry.stat(follow_symlinks=False).st_mtime < cutoff
    try:
        os.kill(int(name["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        pass  # alive under another user, or no pid this system could have
    return False


@functools.cache
def host_tag() -> str:
    """12 hex digits for this boot of this machine and this pid namespace: where a pid names one process."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            pass  # not Linux: the host name alone
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _write_all(fh: BinaryIO, chunks: list[bytes]) -> None:
    for c in chunks:
        fh.write(c)


def _link_new(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target` unless `target` exists (FileExistsError)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # No hard links on this filesystem (some FUSE and SMB mounts): check, then rename; racy, but only there.
        if target.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
