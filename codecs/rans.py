"""kvcli's interleaved rANS stream (docs/codec.md, "Entropy stream"), vectorized over the lanes of many streams.

One stream codes a sequence of symbols, each with its own frequency table. Symbol i goes to lane i mod L and is
decoded at step i div L. A lane's state is 32 bits in [2^16, 2^32); tables have 16-bit precision, so a decoded
symbol leaves the state at >= 1 and one 16-bit word brings it back: at most one renormalization per symbol. At
each step the lanes that renormalize read one word each, in ascending lane order, from the stream's one word
array. A GPU decodes a stream with one program of L lanes (a prefix sum per step); numpy decodes thousands of
lanes of many streams per step, which is why every function here takes a batch of streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRECISION_BITS = 16
TOTAL = 1 << PRECISION_BITS  # every table's frequencies sum to exactly this
STATE_LOW = 1 << 16  # states live in [STATE_LOW, 2**32); the encoder starts, and the decoder must end, here
WORD_BITS = 16
WORD_MASK = (1 << WORD_BITS) - 1
STEPS_PER_LANE = 1024  # the lane count rule: a stream of n symbols has ceil(n / STEPS_PER_LANE) lanes
MAX_ALPHABET = 1 << 16


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

    def __init__(self, freqs: list[np.ndarray]):
        for k, f in enumerate(freqs):
            check_table(f, f"table {k}")
        self.count = len(freqs)
        self.freqs = [np.asarray(f, dtype=np.uint32) for f in freqs]
        sizes = [len(f) for f in self.freqs]
        self.base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint32) if freqs else np.zeros(0, np.uint32)
        # One extra entry past the end, the identity (freq TOTAL, cum 0), for lanes past their last symbol.
        self.freq = np.concatenate(self.freqs + [np.array([TOTAL], np.uint32)])
        self.cum = np.concatenate([np.cumsum(f, dtype=np.uint32) - f for f in self.freqs] + [np.zeros(1, np.uint32)])
        self._lut: tuple[np.ndarray, np.ndarray] | None = None

    def lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """Decoding tables over (table, slot), (count + 1) * TOTAL entries each: the symbol (uint16), and
        (slot - cum) | (freq - 1) << 16 (uint32). Row `count` is the identity, which leaves a lane unchanged.
        Built once per file; concurrent builders would build the same arrays.
        """
        if self._lut is None:
            slots = np.arange(TOTAL, dtype=np.uint32)
            syms, steps = [], []
            for f in self.freqs:
                sym = np.repeat(np.arange(len(f), dtype=np.uint32), f)
                cum = np.cumsum(f, dtype=np.uint32) - f
                syms.append(sym.astype(np.uint16))
                steps.append((slots - cum[sym]) | ((f[sym] - 1) << 16))
            syms.append(np.zeros(TOTAL, np.uint16))
            steps.append(slots | np.uint32((TOTAL - 1) << 16))
            self._lut = np.concatenate(syms), np.concatenate(steps)
        return self._lut


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


def _layout(counts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per stream: lanes, steps and first global lane; and the total lane count."""
    lanes = np.array([lanes_for(n) for n in counts], dtype=np.int64)
    steps = np.array([-(-n // max(lane, 1)) for n, lane in zip(counts, lanes)], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(lanes)[:-1]]).astype(np.int64)
    return lanes, steps, first, int(lanes.sum())


def _grid(values: list[np.ndarray], lanes, steps, first, total_lanes: int, fill, dtype) -> np.ndarray:
    """(steps, lanes) matrix with stream s's values dealt round-robin onto its lanes; `fill` elsewhere."""
    grid = np.full((int(steps.max(initial=0)), total_lanes), fill, dtype=dtype)
    for v, lane, step, lo in zip(values, lanes, steps, first):
        if lane:
            block = np.full(step * lane, fill, dtype=dtype)
            block[: len(v)] = v
            grid[:step, lo : lo + lane] = block.reshape(step, lane)
    return grid


def encode_streams(tables: Tables, streams: list[tuple[np.ndarray, np.ndarray]]) -> list[Stream]:
    """Encode each (symbols, table indices) pair, all in one pass over the steps."""
    lanes, steps, first, total_lanes = _layout([len(s) for s, _ in streams])
    identity = len(tables.freq) - 1
    top = np.where(tables.freq < TOTAL, tables.freq << np.uint32(16), np.uint32(0xFFFFFFFF))
    entry = _grid([tables.base[t] + s.astype(np.uint32) for s, t in streams], lanes, steps, first, total_lanes,
                  identity, np.uint32)
    # Lanes not yet started (the encoder runs backwards) hold STATE_LOW, which the identity entry keeps.
    x = np.full(total_lanes, STATE_LOW, dtype=np.uint32)
    emit = np.zeros(entry.shape, dtype=bool)
    low = np.zeros(entry.shape, dtype=np.uint16)
    shift = np.uint32(WORD_BITS)
    for t in range(entry.shape[0] - 1, -1, -1):  # a stack: the decoder's last step is encoded first
        k = entry[t]
        np.greater_equal(x, top[k], out=emit[t])
        np.copyto(low[t], x, casting="unsafe")  # the low word, kept where the lane renormalizes
        x = np.where(emit[t], x >> shift, x)
        q, r = np.divmod(x, tables.freq[k])
        x = (q << shift) + r + tables.cum[k]
    out = []
    for lane, step, lo in zip(lanes, steps, first):
        block = np.s_[:step, lo : lo + lane]
        out.append(Stream(x[lo : lo + lane].copy(), low[block][emit[block]]))
    return out


def decode_streams(tables: Tables, streams: list[tuple[np.ndarray, Stream]]) -> list[np.ndarray]:
    """Decode each (table index per symbol, stream); returns the symbols (uint16) of each stream.

    The caller guarantees each stream's lane count follows the rule and it has at most one word per symbol.
    Raises StreamError unless every stream's states start in range and it ends with every state back at
    STATE_LOW and every word read.
    """
    counts = [len(t) for t, _ in streams]
    lanes, steps, first, total_lanes = _layout(counts)
    for k, ((tid, st), lane) in enumerate(zip(streams, lanes)):
        # The caller has checked the sizes against its limits (entropy.split_segment); states are data.
        assert len(st.states) == lane and len(st.words) <= len(tid)
        if lane and int(st.states.min()) < STATE_LOW:
            raise StreamError("a lane's initial state is below 2^16", k)
    if total_lanes == 0:
        return [np.zeros(0, np.uint16) for _ in streams]
    sym_lut, step_lut = tables.lookup()
    row = _grid([t.astype(np.uint32) << np.uint32(PRECISION_BITS) for t, _ in streams], lanes, steps, first,
                total_lanes, tables.count << PRECISION_BITS, np.uint32)
    n_words = np.array([len(st.words) for _, st in streams], dtype=np.int64)
    word_base = np.concatenate([[0], np.cumsum(n_words)[:-1]]).astype(np.int64)
    # Padding keeps every gather in bounds; a read past a stream's own words fails the final check.
    words = np.concatenate([st.words for _, st in streams] + [np.zeros(total_lanes + 1, np.uint16)]).astype(np.uint32)
    limit = len(words) - 1
    live = np.flatnonzero(lanes > 0)
    owner = np.repeat(np.arange(len(streams)), lanes)
    seg_first, seg_end = first[live], (first + lanes)[live]
    ptr = word_base.copy()
    x = np.concatenate([st.states for _, st in streams]).astype(np.uint32)
    counted = np.zeros(total_lanes + 1, dtype=np.int64)
    mask, shift = np.uint32(WORD_MASK), np.uint32(WORD_BITS)
    for t in range(row.shape[0]):
        np.add(row[t], x & mask, out=row[t])  # the row now holds the lookup index, kept for the symbols
        e = step_lut[row[t]]
        x = ((e >> shift) + np.uint32(1)) * (x >> shift) + (e & mask)
        need = x < STATE_LOW
        np.cumsum(need, out=counted[1:])
        # Lane j of stream s reads word ptr[s] + (lanes of s before j that renormalize at this step).
        before = counted[seg_first]
        start = np.zeros(len(streams), dtype=np.int64)
        start[live] = ptr[live] - before
        pos = np.minimum(start[owner] + counted[:-1], limit)
        x = np.where(need, (x << shift) | words[pos], x)
        ptr[live] += counted[seg_end] - before
    out = []
    for k, (lane, step, lo) in enumerate(zip(lanes, steps, first)):
        if ptr[k] != word_base[k] + n_words[k]:
            raise StreamError(f"the entropy decoder read {ptr[k] - word_base[k]} of {n_words[k]} words", k)
        if lane and (x[lo : lo + lane] != STATE_LOW).any():
            raise StreamError("a lane of the entropy decoder did not end in its initial state", k)
        out.append(sym_lut[row[:step, lo : lo + lane].reshape(-1)[: counts[k]]])
    return out
