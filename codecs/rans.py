"""kvcli's interleaved rANS stream (docs/codec.md, "Entropy stream"), coded in C over batches of streams.

One stream codes a sequence of symbols, each with its own frequency table. Symbol i goes to lane i mod L and is
decoded at step i div L. A lane's state is 32 bits in [2^16, 2^32); tables have 16-bit precision, so a decoded
symbol leaves the state at >= 1 and one 16-bit word brings it back: at most one renormalization per symbol. At
each step the lanes that renormalize read one word each, in ascending lane order, from the stream's one word
array. A GPU decodes a stream with one program of L lanes (a prefix sum per step); the C coder (codecs/_ans.c)
runs the lanes of one stream after another without the GIL, so threads code batches in parallel. This module
owns the constants and every check on data; the C code only refuses arrays that its caller got wrong.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import _ans

PRECISION_BITS = 16
TOTAL = 1 << PRECISION_BITS  # every table's frequencies sum to exactly this
STATE_LOW = 1 << 16  # states live in [STATE_LOW, 2**32); the encoder starts, and the decoder must end, here
WORD_BITS = 16
WORD_MASK = (1 << WORD_BITS) - 1
STEPS_PER_LANE = 1024  # the lane count rule: a stream of n symbols has ceil(n / STEPS_PER_LANE) lanes
MAX_ALPHABET = 1 << 16
BUCKET_BITS = 12  # the C decoder's search buckets per table (2^12), where a stream switches tables rarely
_ans.check_constants(PRECISION_BITS, STATE_LOW, WORD_BITS)


class StreamError(Exception):
    """A stream does not decode; `index` is its position in the batch. The codec turns it into a CodecError."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def lanes_for(symbols: int) -> int:
    """The lane count of a stream of `symbols` symbols: one lane per started STEPS_PER_LANE symbols."""
    return -(-symbols // STEPS_PER_LANE)


@dataclass(frozen=True)
class Stream:
    """One coded stream: the decoder's initial lane states and the shared word array."""

    states: np.ndarray  # uint32 (lanes,)
    words: np.ndarray  # uint16 (words,)


class Tables:
    """Frequency tables, indexed 0..count-1, each summing to TOTAL with every entry >= 1. Immutable."""

    def __init__(self, freqs: list[np.ndarray], what=lambda k: f"table {k}", bucket_bits: int = BUCKET_BITS):
        """StreamError, naming the first bad table as what(k) says, unless every table passes check_table. The
        checks and cumulative frequencies run over all tables at once: a version 4 file has up to 261 of them.
        bucket_bits: the decoder's search buckets per table (codecs/_ans.c, search), 11 or 12."""
        self.count = len(freqs)
        self.bucket_bits = bucket_bits
        self.freqs = [np.asarray(f, dtype=np.uint32) for f in freqs]
        size = np.array([len(f) for f in self.freqs], dtype=np.int64)
        base = np.cumsum(size) - size
        freq = np.concatenate(self.freqs + [np.zeros(0, np.uint32)])
        if self.count:
            at = np.minimum(base, max(len(freq) - 1, 0))  # reduceat needs indices inside; empty tables fail anyway
            wide = freq.astype(np.int64) if len(freq) else np.zeros(1, np.int64)
            bad = ((size < 2) | (size > MAX_ALPHABET) | (np.minimum.reduceat(wide, at) < 1)
                   | (np.add.reduceat(wide, at) != TOTAL))
            for k in np.flatnonzero(bad)[:1].tolist():
                check_table(self.freqs[k], what(k))
        # Each table's cumulative frequencies: the running sum over all tables, less TOTAL per table before it.
        cum = (np.cumsum(freq, dtype=np.int64) - freq - np.repeat(np.arange(self.count, dtype=np.int64) * TOTAL, size))
        # What the C coder reads: (freq, cum) of every symbol of every table, each table's first symbol and size.
        self.coder_arrays = (np.stack([freq, cum.astype(np.uint32)], axis=1), base.astype(np.uint32),
                             size.astype(np.uint32))

    @functools.cached_property
    def search(self):
        """The C decoder's search tables (an opaque capsule of _ans.search), built once: per batch, a file's 206
        version 4 tables took 0.5 ms."""
        return _ans.search(*self.coder_arrays, self.bucket_bits)

    def lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """The GPU decoder's tables over (table, slot), (count + 1) * TOTAL entries each: the symbol (uint16),
        and (slot - cum) | (freq - 1) << 16 (uint32). Row `count` is the identity, which leaves a lane unchanged.
        kernels/rans_decode.py builds them on the device; this numpy construction is their reference.
        """
        slots = np.arange(TOTAL, dtype=np.uint32)
        syms, steps = [], []
        for f in self.freqs:
            sym = np.repeat(np.arange(len(f), dtype=np.uint32), f)
            cum = np.cumsum(f, dtype=np.uint32) - f
            syms.append(sym.astype(np.uint16))
            steps.append((slots - cum[sym]) | ((f[sym] - 1) << 16))
        syms.append(np.zeros(TOTAL, np.uint16))
        steps.append(slots | np.uint32((TOTAL - 1) << 16))
        return np.concatenate(syms), np.concatenate(steps)


def check_table(freq: np.ndarray, what: str) -> None:
    """The normalization rules a decoder enforces on every stored table."""
    if not 2 <= len(freq) <= MAX_ALPHABET:
        raise StreamError(f"{what}: alphabet of {len(freq)} symbols")
    if int(np.min(freq)) < 1:
        raise StreamError(f"{what}: a symbol has frequency 0")
    if int(np.sum(freq, dtype=np.int64)) != TOTAL:
        raise StreamError(f"{what}: frequencies sum to {int(np.sum(freq, dtype=np.int64))}, not {TOTAL}")


def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to TOTAL, every symbol >= 1, proportional to counts (largest remainders).

    Encoder only: the decoder takes whatever valid table the file stores.
    """
    counts = np.asarray(counts, dtype=np.float64)
    spare = TOTAL - len(counts)
    if spare < 0:
        raise ValueError(f"alphabet of {len(counts)} symbols exceeds the precision")
    total = counts.sum()
    share = counts * (spare / total) if total > 0 else np.full(len(counts), spare / len(counts))
    whole = np.floor(share)
    freq = 1 + whole.astype(np.int64)
    left = TOTAL - int(freq.sum())
    order = np.argsort(-(share - whole), kind="stable")
    freq[order[:left]] += 1
    return freq.astype(np.uint32)


def _layout(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per stream: symbols and lanes, int64."""
    return np.array(counts, dtype=np.int64), np.array([lanes_for(n) for n in counts], dtype=np.int64)


def _ids(streams) -> np.ndarray:
    """Every stream's table indices, concatenated, as the coder's uint16 (a file has at most 2^16 tables)."""
    return np.concatenate([np.asarray(t) for t in streams] + [np.zeros(0, np.uint16)]).astype(np.uint16, copy=False)


def encode_streams(tables: Tables, streams: list[tuple[np.ndarray, np.ndarray]]) -> list[Stream]:
    """Encode each (symbols, table indices) pair; the C coder runs without the GIL."""
    counts, lanes = _layout([len(s) for s, _ in streams])
    symbols = np.concatenate([np.asarray(s) for s, _ in streams] + [np.zeros(0, np.int32)]).astype(np.int32, copy=False)
    states = np.empty(int(lanes.sum()), np.uint32)
    words = np.empty(len(symbols), np.uint16)
    n_words = np.empty(len(streams), np.int64)
    _ans.encode(*tables.coder_arrays, symbols, _ids([t for _, t in streams]), counts, lanes, states, words, n_words)
    ends, lane_ends = np.cumsum(counts), np.cumsum(lanes)
    return [Stream(states[le - lane : le], words[end - nw : end])
            for end, le, lane, nw in zip(ends.tolist(), lane_ends.tolist(), lanes.tolist(), n_words.tolist())]


@dataclass(frozen=True)
class Runs:
    """The tables of a stream's symbols as runs: run i's run_lengths[i] symbols use table run_tables[i]."""

    run_tables: np.ndarray  # uint16
    run_lengths: np.ndarray  # int64

    @functools.cached_property
    def symbols(self) -> int:
        return int(self.run_lengths.sum())

    @classmethod
    def of(cls, ids: np.ndarray) -> "Runs":
        """The runs of a table index per symbol."""
        ids = np.asarray(ids)
        if not len(ids):
            return cls(np.zeros(0, np.uint16), np.zeros(0, np.int64))
        starts = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1])
        return cls(ids[starts].astype(np.uint16), np.diff(np.append(starts, len(ids))).astype(np.int64))


def decode_streams(tables: Tables, streams: list[tuple[np.ndarray, Stream]]) -> list[np.ndarray]:
    """decode_runs for a table index per symbol of each stream."""
    return decode_runs(tables, [(Runs.of(tid), st) for tid, st in streams])


def decode_runs(tables: Tables, streams: list[tuple[Runs, Stream]]) -> list[np.ndarray]:
    """Decode each (tables of its symbols, stream); returns the symbols (uint16) of each stream.

    The caller guarantees each stream's lane count follows the rule and it has at most one word per symbol.
    Raises StreamError, for the first stream in the batch that fails, unless every stream's states start in
    range and it ends with every state back at STATE_LOW and every word read. The C decoder runs without the GIL.
    """
    run_tables = np.concatenate([r.run_tables for r, _ in streams] + [np.zeros(0, np.uint16)]).astype(np.uint16,
                                                                                                      copy=False)
    run_lengths = np.concatenate([r.run_lengths for r, _ in streams] + [np.zeros(0, np.int64)]).astype(np.int64,
                                                                                                       copy=False)
    runs = np.array([len(r.run_tables) for r, _ in streams], dtype=np.int64)
    return decode_with([runs.symbols for runs, _ in streams], [st for _, st in streams],
                       lambda *arrays: _ans.decode(tables.search, run_tables, run_lengths, runs, *arrays))


def decode_with(symbols: list[int], streams: list[Stream], call, refusal=None) -> list[np.ndarray]:
    """decode_runs' checks and arrays around a C decoder that takes the tables its own way (kvq version 4's
    _ans.decode_banded): call(counts, lanes, states, words, n_words, out, read, bad) decodes every stream, and
    refusal(k), where given, is the caller's reason to refuse stream k (checked first), or None."""
    counts, lanes = _layout(symbols)
    for k, (n, st, lane) in enumerate(zip(counts.tolist(), streams, lanes.tolist())):
        # The caller has checked the sizes against its limits (entropy.split_segment); states are data.
        assert len(st.states) == lane and len(st.words) <= n
        if lane and int(st.states.min()) < STATE_LOW:
            raise StreamError("a lane's initial state is below 2^16", k)
    states = np.concatenate([st.states for st in streams] + [np.zeros(0, np.uint32)]).astype(np.uint32)
    # One spare word at the end lets the decoder read branch-free; reads past a stream's words count, read 0.
    words = np.concatenate([st.words for st in streams] + [np.zeros(1, np.uint16)]).astype(np.uint16, copy=False)
    n_words = np.array([len(st.words) for st in streams], dtype=np.int64)
    out = np.empty(int(counts.sum()), np.uint16)
    read, off = np.empty(len(streams), np.int64), np.empty(len(streams), np.int64)
    call(counts, lanes, states, words, n_words, out, read, off)
    for k in range(len(streams)):
        why = refusal(k) if refusal is not None else None
        if why:
            raise StreamError(why, k)
        if read[k] != n_words[k]:
            raise StreamError(f"the entropy decoder read {read[k]} of {n_words[k]} words", k)
        if off[k]:
            raise StreamError("a lane of the entropy decoder did not end in its initial state", k)
    return np.split(out, np.cumsum(counts)[:-1]) if streams else []
