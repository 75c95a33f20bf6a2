"""kvq's entropy stage: channel classes, joint symbols, frequency tables and the bytes of a segment's stream.

Channels (one per layer, K/V, head and head-dim index) are sorted into classes by the spread of their quantized
values. Each class has one frequency table (version 4: one per band of token-weight exponents its tuples'
first tokens fall in), fitted on the whole file and stored once. To cut the number of coder
steps, and to exploit that neighbouring tokens are alike, a class codes `m` consecutive tokens of a channel as
one joint symbol (m = 4, 2 or 1, the largest whose alphabet stays small). Tuples with a value outside the
table's range are coded as an escape symbol, and their values go to a side stream. The symbols are coded with
kvcli's interleaved rANS stream (codecs/rans.py); docs/codec.md specifies every byte. The per-element loops
(joint symbols both ways, channel spread) run in C (codecs/_ans.c) without the GIL.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import numpy as np
import zstandard

from . import _ans, rans
from .base import CodecError, unzstd

MIN_CLASS, MAX_CLASS = -12, 16  # class c holds channels whose symbol std is about 2 ** (c / 2)
MAX_ALPHABET = 1024
MAX_HALF_RANGE = 255
HEAD = struct.Struct("<III")  # lanes, words, escape bytes
# Version 4 (docs/codec.md, "Version 4"): a token's band is (e + 24) div 6 of its weight's exponent e in [-24, 24].
BAND_WIDTH, BANDS = 6, 9
PLAIN_BAND = 4  # the band of e = 0: every token of a layer and kind without token weights
NO_TABLE = 0xFFFF  # a file has at most (MAX_CLASS - MIN_CLASS + 1) * BANDS = 261 tables
# Version 4's symbols take one of several tables per class, symbol by symbol: with half the search buckets of
# rans.BUCKET_BITS those tables share the cache better (codecs/_ans.c, search).
BANDED_BUCKET_BITS = 11


def class_of(std: np.ndarray) -> np.ndarray:
    """Class index per channel from the standard deviation of its quantized values."""
    c = np.round(2 * np.log2(np.maximum(std, 1e-6)))
    return np.clip(c, MIN_CLASS, MAX_CLASS).astype(np.int8)


def classes_of(q: np.ndarray) -> np.ndarray:
    """Class per channel of q (..., tokens) int32, from the population standard deviation of its values (their
    mean magnitude for a single token, whose deviation says nothing)."""
    q = np.ascontiguousarray(q, dtype=np.int32)
    if q.shape[-1] == 1:
        return class_of(np.abs(q[..., 0]).astype(np.float64))
    std = np.empty(q.shape[:-1], np.float64)
    _ans.spread(q, q.shape[-1], std)
    return class_of(std)


@functools.lru_cache(maxsize=None)
def class_layout(cls: int) -> tuple[int, int]:
    """(half_range K, tuple length m) of a class: values in [-K, K], tuples of m tokens."""
    std = 2.0 ** (cls / 2)
    half = int(min(MAX_HALF_RANGE, max(1, np.ceil(4.5 * std))))
    for m in (4, 2, 1):
        if (2 * half + 1) ** m < MAX_ALPHABET:
            return half, m
    return half, 1


def alphabet(cls: int) -> int:
    """Symbols of a class: every tuple of values in [-K, K], then the escape symbol."""
    half, m = class_layout(cls)
    return (2 * half + 1) ** m + 1


@dataclass(frozen=True)
class Group:
    """The channels of one class within a layer and kind: rows into the flattened (heads * dim) axis."""

    cls: int
    rows: np.ndarray

    def tuples(self, tokens: int) -> int:
        """Symbols this group codes in a segment of `tokens` non-sink tokens."""
        return len(self.rows) * -(-tokens // class_layout(self.cls)[1])


def groups_of(classes: np.ndarray) -> list[Group]:
    """Classes in increasing order, each with its channels in ascending flat (head * dim + channel) order."""
    flat = classes.reshape(-1)
    order = np.argsort(flat, kind="stable")  # one sort for every class: a file has tens of plans to open
    values, starts = np.unique(flat[order], return_index=True)
    return [Group(int(c), rows) for c, rows in zip(values, np.split(order.astype(np.int64), starts[1:]))]


@dataclass(frozen=True)
class Limits:
    """Every size a segment's entropy-coded part may have. The encoder asserts its output fits; the decoder
    refuses anything that does not. Both take them from `limits`, so they cannot disagree."""

    symbols: int
    lanes: int
    max_words: int  # at most one renormalization word per symbol
    max_escape_values: int  # every tuple escaped, padding included
    sink_bytes: int

    @property
    def max_escape_bytes(self) -> int:
        return zstd_bound(4 * self.max_escape_values) if self.max_escape_values else 0

    @property
    def max_bytes(self) -> int:
        return HEAD.size + 4 * self.lanes + 2 * self.max_words + self.max_escape_bytes + self.sink_bytes


def limits(groups: list[Group], tokens: int, sink_bytes: int) -> Limits:
    symbols = escape_values = 0
    for g in groups:  # once per segment: one pass
        m = class_layout(g.cls)[1]
        n = len(g.rows) * -(-tokens // m)
        symbols, escape_values = symbols + n, escape_values + n * m
    return Limits(symbols, rans.lanes_for(symbols), symbols, escape_values, sink_bytes)


def zstd_bound(size: int) -> int:
    """ZSTD_COMPRESSBOUND: the largest frame zstd writes for `size` input bytes."""
    return size + (size >> 8) + (((128 << 10) - size) >> 11 if size < (128 << 10) else 0)


# ---------------------------------------------------------------- joint symbols


def to_tuples(rows: np.ndarray, half: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """rows (n, tokens) int16 or int32 -> joint symbols (n * ceil(tokens/m),) int32 and the escaped tuples'
    values (int32), in C without the GIL.

    Tokens are padded with zeros to a multiple of m; the decoder knows `tokens` and drops the padding. The encoder
    forms its symbols inside encode_rows; this separate pass is the reference the tests hold it to.
    """
    rows = np.ascontiguousarray(rows if rows.dtype in (np.int16, np.int32) else rows.astype(np.int32))
    n, tokens = rows.shape
    count = n * -(-tokens // m)
    symbols, escapes = np.empty(count, np.int32), np.empty(count * m, np.int32)
    used = _ans.to_tuples(rows, tokens, half, m, symbols, escapes) if count else 0
    return symbols, escapes[:used].copy()


@functools.lru_cache(maxsize=64)
def _digits_table(half: int, m: int) -> np.ndarray:
    """Row s holds the m values that joint symbol s stands for; one extra row for the escape symbol."""
    base = 2 * half + 1
    grid = np.indices((base,) * m).reshape(m, -1).T - half
    return np.concatenate([grid, np.zeros((1, m), dtype=grid.dtype)]).astype(np.int32)


# ---------------------------------------------------------------- tables


def bands_of(exponents: np.ndarray) -> np.ndarray:
    """uint8 bands of token-weight exponents (any shape)."""
    return ((exponents.astype(np.int16) + 24) // BAND_WIDTH).astype(np.uint8)


@dataclass(frozen=True)
class ClassTables:
    """The frequency tables, in (class, band) order, and the rANS tables built from them: versions 2 and 3 have one
    per class (bands None), version 4 one per (class, band) pair present (bands[i] the band of table i)."""

    classes: tuple[int, ...]
    coder: rans.Tables
    bands: tuple[int, ...] | None = None

    def index(self, cls: int) -> int:
        """The first table of a class: its only one, or in version 4 the one whose layout the digits take."""
        try:
            return self.classes.index(cls)
        except ValueError:
            raise CodecError(f"no entropy table for class {cls}") from None

    @functools.cached_property
    def by_band(self) -> tuple[np.ndarray, np.ndarray]:
        """Version 4, for the C coder: the uint16 table index of (class - MIN_CLASS) * BANDS + band (NO_TABLE where
        none), and per table the first of its class's entries (int64)."""
        lut = np.full((MAX_CLASS - MIN_CLASS + 1) * BANDS, NO_TABLE, np.uint16)
        for i, (cls, band) in enumerate(zip(self.classes, self.bands or ())):
            lut[(cls - MIN_CLASS) * BANDS + band] = i
        return lut, (np.array(self.classes, np.int64) - MIN_CLASS) * BANDS

    @functools.cached_property
    def reciprocals(self) -> np.ndarray:
        """Per symbol of every table, in the coder's order, what _ans.encode_rows multiplies by for a division."""
        out = np.empty(len(self.coder.coder_arrays[0]), np.uint64)
        _ans.reciprocals(self.coder.coder_arrays[0], out)
        return out

    @functools.cached_property
    def digits(self) -> tuple[np.ndarray, np.ndarray]:
        """Every class's _digits_table, concatenated (int32), and where each starts (int64): for _ans.expand."""
        tables = [_digits_table(*class_layout(cls)).reshape(-1) for cls in self.classes]
        starts = np.cumsum([0] + [len(t) for t in tables[:-1]]) if tables else np.zeros(0)
        return np.concatenate(tables + [np.zeros(0, np.int32)]), np.asarray(starts, dtype=np.int64)


@dataclass(frozen=True)
class Layout:
    """How a segment of `tokens` coded tokens lays out its symbols: for the C coder, their tables (one run per
    group), per group (table, channels, half range, tuple length) (int64), and the groups' channels in order."""

    runs: rans.Runs
    spec: np.ndarray
    rows: np.ndarray
    tokens: int

    @classmethod
    def of(cls, groups: list[Group], tokens: int, tables: ClassTables) -> "Layout":
        """CodecError if a class has no table (coverage)."""
        index = [tables.index(g.cls) for g in groups]
        spec = np.array([(k, len(g.rows), *class_layout(g.cls)) for k, g in zip(index, groups)], np.int64)
        runs = rans.Runs(np.array(index, np.uint16), np.array([g.tuples(tokens) for g in groups], np.int64))
        rows = np.concatenate([g.rows for g in groups] + [np.zeros(0, np.int64)]).astype(np.int64)
        return cls(runs, spec.reshape(-1, 4), rows, tokens)

    def table_ids(self, tables: ClassTables, bands: np.ndarray, dim: int) -> np.ndarray:
        """Version 4: the uint16 table of every symbol, from the bands (heads, tokens) of the segment's coded tokens
        (docs/codec.md, "Version 4"), in C (_ans.table_ids, the decoder's own mapping); CodecError if a (class,
        band) a symbol uses has no table."""
        bands = np.ascontiguousarray(bands, dtype=np.uint8)
        ids = np.empty(self.runs.symbols, np.uint16)
        shape = np.array([len(self.spec), len(self.rows), self.tokens, bands.shape[0], dim], np.int64)
        missing = _ans.table_ids(*tables.by_band, self.spec, self.rows, bands, shape, ids)
        if missing >= 0:
            raise CodecError(missing_table(missing))
        return ids


def missing_table(entry: int) -> str:
    """The refusal of a symbol whose (class, band), entry `entry` of ClassTables.by_band, has no table."""
    return f"no entropy table for class {entry // BANDS + MIN_CLASS} band {entry % BANDS}"


@dataclass(frozen=True)
class Symbols:
    """A segment's entropy-decoded part, every check passed: its joint symbols (uint16) under `layout`, and the
    values of its escaped tuples (int32)."""

    layout: Layout
    symbols: np.ndarray
    escapes: np.ndarray

    def rows(self, tables: ClassTables) -> np.ndarray:
        """The integers, channel-major (channels, tokens) int32 (the groups cover every channel)."""
        lay = self.layout
        rows = np.empty((len(lay.rows), lay.tokens), dtype=np.int32)
        _ans.expand(self.symbols, lay.spec, lay.rows, lay.tokens, *tables.digits, self.escapes, rows)
        return rows


def count_symbols(cls: int, rows: np.ndarray) -> np.ndarray:
    """How often each joint symbol of class `cls` (to_tuples') occurs in rows (n, tokens), counted in C without
    the symbols themselves or the GIL: int64, one count per symbol of the alphabet."""
    counts = np.zeros(alphabet(cls), dtype=np.int64)
    if rows.size:
        rows = np.ascontiguousarray(rows if rows.dtype in (np.int16, np.int32) else rows.astype(np.int32))
        _ans.count_tuples(rows, rows.shape[1], *class_layout(cls), counts)
    return counts


def count_banded(cls: int, rows: np.ndarray, bands: np.ndarray) -> dict[int, np.ndarray]:
    """Version 4's count_symbols: per band, how often each joint symbol of class `cls` occurs in rows (n, tokens)
    whose tuples take the bands (n, tokens) of their first tokens."""
    both = np.zeros((BANDS, alphabet(cls)), np.int64)
    if rows.size:  # in C without the GIL, as count_symbols
        rows = np.ascontiguousarray(rows if rows.dtype in (np.int16, np.int32) else rows.astype(np.int32))
        _ans.count_tuples(rows, rows.shape[1], *class_layout(cls), both, np.ascontiguousarray(bands, np.uint8))
    return {int(b): both[b] for b in np.flatnonzero(both.any(axis=1)).tolist()}  # the bands some tuple starts in


def tables_of(counts: dict) -> ClassTables:
    """One table per class (keys int) or per (class, band) (keys pairs, version 4) from its symbol counts."""
    keys = sorted(counts)
    banded = bool(keys) and isinstance(keys[0], tuple)
    freqs = rans.Tables([rans.normalize_counts(counts[k]) for k in keys],
                        bucket_bits=BANDED_BUCKET_BITS if banded else rans.BUCKET_BITS)
    if banded:
        return ClassTables(tuple(k[0] for k in keys), freqs, tuple(k[1] for k in keys))
    return ClassTables(tuple(keys), freqs)


def pack_tables(tables: ClassTables) -> bytes:
    out = [struct.pack("<H", len(tables.classes))]
    for i, (cls, freq) in enumerate(zip(tables.classes, tables.coder.freqs)):
        out += [struct.pack("<b", cls) + (struct.pack("<B", tables.bands[i]) if tables.bands is not None else b""),
                freq.astype("<u2").tobytes()]
    return b"".join(out)


def unpack_tables(data: bytes, banded: bool = False) -> ClassTables:
    """Versions 2 and 3 (one table per class) or, banded, version 4 (per (class, band))."""
    try:
        (count,) = struct.unpack_from("<H", data, 0)
        pos = 2
        classes, freqs, bands = [], [], []
        for _ in range(count):
            (cls,) = struct.unpack_from("<b", data, pos)
            pos += 1
            if banded:
                (band,) = struct.unpack_from("<B", data, pos)
                pos += 1
                if not MIN_CLASS <= cls <= MAX_CLASS or band >= BANDS or (
                        classes and (cls, band) <= (classes[-1], bands[-1])):
                    raise CodecError(f"table of class {cls} band {band} out of range or out of order")
                bands.append(band)
            elif not MIN_CLASS <= cls <= MAX_CLASS or (classes and cls <= classes[-1]):
                raise CodecError(f"table class {cls} out of range or out of order")
            size = alphabet(cls)
            if pos + 2 * size > len(data):
                raise CodecError(f"table for class {cls} is truncated")
            freqs.append(np.frombuffer(data, dtype="<u2", count=size, offset=pos))
            pos += 2 * size
            classes.append(cls)
        # every table's frequencies checked at once (rans.check_table's rules), the first bad one named
        coder = rans.Tables(freqs, lambda k: f"table for class {classes[k]}",
                            BANDED_BUCKET_BITS if banded else rans.BUCKET_BITS)
    except struct.error:
        raise CodecError("entropy tables are truncated") from None
    except rans.StreamError as err:
        raise CodecError(str(err)) from None
    if pos != len(data):
        raise CodecError("entropy tables have trailing bytes")
    return ClassTables(tuple(classes), coder, tuple(bands) if banded else None)


# ---------------------------------------------------------------- segments


@dataclass(frozen=True)
class Coded:
    """A segment's entropy-coded part, split out of its bytes."""

    stream: rans.Stream
    escape_frame: bytes
    end: int  # offset of the sink bytes


def encode_segments(tables: ClassTables, segments: list[tuple]) -> list[bytes]:
    """Per segment (layout, rows (heads*dim, tokens) int16 or int32, limits[, table per symbol or None]): its bytes
    up to the sinks. Each segment is one C call (_ans.encode_rows: joint symbols and rANS coding) without the GIL;
    with a table per symbol (version 4: Layout.table_ids), each symbol is coded with its own."""
    out = []
    for lay, rows, lim, *ids in segments:
        states = np.empty(lim.lanes, np.uint32)
        words = np.empty(lim.symbols, np.uint16)
        escapes = np.empty(lim.max_escape_values, np.int32)
        n_words = used = 0
        if lim.symbols:
            rows = rows if rows.dtype in (np.int16, np.int32) else rows.astype(np.int32)
            n_words, used = _ans.encode_rows(*tables.coder.coder_arrays, tables.reciprocals, rows, lay.spec, lay.rows,
                                             states, words, escapes, ids[0] if ids else None)
        frame = zstandard.ZstdCompressor(level=3).compress(escapes[:used].astype("<i4").tobytes()) if used else b""
        assert len(frame) <= lim.max_escape_bytes
        out.append(HEAD.pack(lim.lanes, n_words, len(frame)) + states.astype("<u4").tobytes()
                   + words[lim.symbols - n_words :].astype("<u2").tobytes() + frame)
    return out


def split_segment(data: bytes, lim: Limits) -> Coded:
    """Check a segment's sizes against its limits and cut out its parts. Reads nothing it has not checked."""
    if len(data) < HEAD.size:
        raise CodecError("segment is truncated")
    lanes, words, esc_bytes = HEAD.unpack_from(data, 0)
    if lanes != lim.lanes:
        raise CodecError(f"{lanes} lanes, the lane count rule gives {lim.lanes} for {lim.symbols} symbols")
    if words > lim.max_words:
        raise CodecError(f"{words} words for {lim.symbols} symbols")
    if esc_bytes > lim.max_escape_bytes:
        raise CodecError(f"escape stream of {esc_bytes} bytes, more than the {lim.max_escape_bytes} allowed")
    total = HEAD.size + 4 * lanes + 2 * words + esc_bytes + lim.sink_bytes
    if total != len(data):
        raise CodecError(f"segment sizes do not add up ({total} != {len(data)})")
    pos = HEAD.size
    # Views of the segment's bytes on a little-endian host (the coder concatenates a batch's streams anyway).
    states = np.frombuffer(data, "<u4", lanes, pos).astype(np.uint32, copy=False)
    pos += 4 * lanes
    stream_words = np.frombuffer(data, "<u2", words, pos).astype(np.uint16, copy=False)
    pos += 2 * words
    return Coded(rans.Stream(states, stream_words), bytes(data[pos : pos + esc_bytes]), pos + esc_bytes)


def decode_segments(tables: ClassTables, segments: list[tuple]) -> list[Symbols]:
    """Per segment (layout, coded part[, bands (heads, tokens) uint8 of its coded tokens, head dim]): its symbols
    and escape values, every stream decoded in one C call; with bands (version 4), every segment has them, and the
    C decoder takes each symbol's table from them as Layout.table_ids does.

    Raises CodecError with `.index` set to the failing segment's position in `segments`.
    """
    try:
        if segments and len(segments[0]) > 2:
            symbols = decode_banded(tables, segments)
        else:
            symbols = rans.decode_runs(tables.coder, [(lay.runs, coded.stream) for lay, coded in segments])
    except rans.StreamError as err:
        raise CodecError(str(err), index=getattr(err, "index", None)) from None
    out = []
    for i, ((lay, coded, *_), sym) in enumerate(zip(segments, symbols)):
        try:
            values = escape_values(coded, _ans.count_escapes(sym, lay.spec, lay.rows, lay.tokens))
        except CodecError as err:
            raise CodecError(str(err), index=i) from None
        out.append(Symbols(lay, sym, values))
    return out


def decode_banded(tables: ClassTables, segments: list[tuple]) -> list[np.ndarray]:
    """Version 4's streams, per segment (layout, coded part, bands (heads, tokens) uint8, head dim): the symbols of
    each, every stream in one C call (_ans.decode_banded, which takes each symbol's table as Layout.table_ids
    does); StreamError names the first stream that fails, a (class, band) without a table included."""
    def joined(arrays: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(arrays + [np.zeros(0, dtype)]).astype(dtype, copy=False)

    spec = joined([lay.spec.reshape(-1) for lay, *_ in segments], np.int64)
    rows = joined([lay.rows for lay, *_ in segments], np.int64)
    bands = joined([b.reshape(-1) for _, _, b, _ in segments], np.uint8)
    shape = np.array([(len(lay.spec), len(lay.rows), lay.tokens, b.shape[0], dim) for lay, _, b, dim in segments],
                     np.int64).reshape(-1)
    missing = np.empty(len(segments), np.int64)
    return rans.decode_with([lay.runs.symbols for lay, *_ in segments], [coded.stream for _, coded, *_ in segments],
                            lambda *arrays: _ans.decode_banded(tables.coder.search, *tables.by_band, spec, rows, bands,
                                                               shape, *arrays, missing),
                            lambda k: missing_table(int(missing[k])) if missing[k] >= 0 else None)


def escape_values(coded: Coded, escaped: int) -> np.ndarray:
    """The segment's escape values (int32), given how many its escape symbols stand for; CodecError unless the
    frame holds exactly those."""
    if escaped and not coded.escape_frame:
        raise CodecError("escape symbols but no escape stream")
    if coded.escape_frame and not escaped:
        raise CodecError("an escape stream without escape symbols")
    if not escaped:
        return np.zeros(0, np.int32)
    raw = unzstd(coded.escape_frame, 4 * escaped)
    if len(raw) != 4 * escaped:
        raise CodecError(f"escape stream holds {len(raw) // 4} values, the escape symbols need {escaped}")
    return np.frombuffer(raw, "<i4").astype(np.int32)
