"""Entropy coding of quantized KV symbols with constriction's ANS coder.

Channels (one per layer, K/V, head and head-dim index) are sorted into classes by the spread of their
quantized values. Each class has one categorical table, fitted on the whole file and stored once. To cut the
number of coder steps, and to exploit that neighbouring tokens are alike, a class codes `m` consecutive tokens
of a channel as one joint symbol (m = 4, 2 or 1, the largest whose alphabet stays small). Tuples with a value
outside the table's range are coded as an escape symbol, and their values go to a side stream.

Every coder call handles all symbols of one class in a segment at once: no Python loop per symbol.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import constriction
import numpy as np

from .base import CodecError

MIN_CLASS, MAX_CLASS = -12, 16  # class c holds channels whose symbol std is about 2 ** (c / 2)
MAX_ALPHABET = 1024
MAX_HALF_RANGE = 255
PERFECT = False  # part of the bitstream definition: encoder and decoder must agree


def class_of(std: np.ndarray) -> np.ndarray:
    """Class index per channel from the standard deviation of its quantized values."""
    c = np.round(2 * np.log2(np.maximum(std, 1e-6)))
    return np.clip(c, MIN_CLASS, MAX_CLASS).astype(np.int8)


def class_layout(cls: int) -> tuple[int, int]:
    """(half_range K, tuple length m) of a class: values in [-K, K], tuples of m tokens."""
    std = 2.0 ** (cls / 2)
    half = int(min(MAX_HALF_RANGE, max(1, np.ceil(4.5 * std))))
    for m in (4, 2, 1):
        if (2 * half + 1) ** m < MAX_ALPHABET:
            return half, m
    return half, 1


@dataclass
class ClassTable:
    cls: int
    half: int
    m: int
    probs: np.ndarray  # float64, (2K+1)^m + 1 entries, the last is the escape symbol

    def model(self):
        return constriction.stream.model.Categorical(self.probs, perfect=PERFECT)


def to_tuples(rows: np.ndarray, half: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """rows (n, tokens) int32 -> joint symbols (n * ceil(tokens/m),) and the escaped tuples' values.

    Tokens are padded with zeros to a multiple of m; the decoder knows `tokens` and drops the padding.
    """
    n, tokens = rows.shape
    width = -(-tokens // m) * m
    if width != tokens:
        rows = np.concatenate([rows, np.zeros((n, width - tokens), dtype=rows.dtype)], axis=1)
    tuples = rows.reshape(n * width // m, m)
    base = 2 * half + 1
    digits = tuples.astype(np.int32) + half
    # One unsigned comparison finds values on either side of [-half, half]: negatives wrap to huge numbers.
    out_of_range = digits.view(np.uint32) >= base
    escaped = out_of_range[:, 0].copy()
    symbols = digits[:, 0].copy()
    for j in range(1, m):
        escaped |= out_of_range[:, j]
        symbols *= base  # escaped tuples may overflow here; their symbol is replaced below
        symbols += digits[:, j]
    symbols[escaped] = base**m
    return symbols, tuples[escaped].reshape(-1)


def from_tuples(symbols: np.ndarray, escapes: np.ndarray, n: int, tokens: int, half: int, m: int) -> tuple[np.ndarray, int]:
    """The inverse of to_tuples: (n, tokens) int32 rows, and how many values of `escapes` they used.

    `escapes` may run on into later groups' values; only the first (escape symbols × m) are taken.
    """
    escaped = symbols == (2 * half + 1) ** m
    used = int(np.count_nonzero(escaped)) * m
    if used > escapes.size:
        raise CodecError("escape stream is too short for the escape symbols")
    tuples = np.take(_digits_table(half, m), symbols, axis=0)  # the escape row is a placeholder
    if used:
        tuples[escaped] = escapes[:used].reshape(-1, m)
    width = -(-tokens // m) * m
    return tuples.reshape(n, width)[:, :tokens], used


@functools.lru_cache(maxsize=64)
def _digits_table(half: int, m: int) -> np.ndarray:
    """Row s holds the m values that joint symbol s stands for; one extra row for the escape symbol."""
    base = 2 * half + 1
    grid = np.indices((base,) * m).reshape(m, -1).T - half
    return np.concatenate([grid, np.zeros((1, m), dtype=grid.dtype)]).astype(np.int32)


def fit_tables(samples: dict[int, list[np.ndarray]]) -> dict[int, ClassTable]:
    """One table per class from sample rows (n, tokens) of that class's channels."""
    tables = {}
    for cls, rows_list in sorted(samples.items()):
        half, m = class_layout(cls)
        counts = np.zeros((2 * half + 1) ** m + 1, dtype=np.float64)
        for rows in rows_list:
            symbols, _ = to_tuples(rows, half, m)
            counts += np.bincount(symbols, minlength=counts.size)
        tables[cls] = ClassTable(cls, half, m, quantize_counts(counts))
    return tables


def quantize_counts(counts: np.ndarray) -> np.ndarray:
    """Counts scaled to integers below 2**16, keeping every seen symbol non-zero; stored exactly as floats."""
    if counts.max() <= 0:
        return np.ones_like(counts)
    return np.minimum(np.ceil(counts * (65535.0 / counts.max())), 65535.0)


def pack_tables(tables: dict[int, ClassTable]) -> bytes:
    out = [struct.pack("<H", len(tables))]
    for cls, t in sorted(tables.items()):
        nz = np.flatnonzero(t.probs).astype(np.uint32)
        out.append(struct.pack("<bI", cls, len(nz)))
        out.append(nz.tobytes())
        out.append(t.probs[nz].astype(np.uint16).tobytes())
    return b"".join(out)


def unpack_tables(data: bytes) -> dict[int, ClassTable]:
    try:
        (count,) = struct.unpack_from("<H", data, 0)
        pos = 2
        tables = {}
        for _ in range(count):
            cls, nnz = struct.unpack_from("<bI", data, pos)
            pos += 5
            if not MIN_CLASS <= cls <= MAX_CLASS:
                raise CodecError(f"table class {cls} out of range")
            half, m = class_layout(cls)
            size = (2 * half + 1) ** m + 1
            if nnz > size or pos + 6 * nnz > len(data):
                raise CodecError(f"table for class {cls} is truncated or too large")
            idx = np.frombuffer(data, dtype=np.uint32, count=nnz, offset=pos)
            pos += 4 * nnz
            vals = np.frombuffer(data, dtype=np.uint16, count=nnz, offset=pos)
            pos += 2 * nnz
            if nnz and (idx.max() >= size or vals.min() == 0):
                raise CodecError(f"table for class {cls} has invalid entries")
            probs = np.zeros(size, dtype=np.float64)
            probs[idx] = vals
            if not probs.any():
                probs[:] = 1.0
            tables[cls] = ClassTable(cls, half, m, probs)
    except struct.error:
        raise CodecError("entropy tables are truncated") from None
    if pos != len(data):
        raise CodecError("entropy tables have trailing bytes")
    return tables


def encode_classes(groups: list[tuple[ClassTable, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """ANS-code each (table, rows) group; returns the compressed words and all escaped values, in group order."""
    coder = constriction.stream.stack.AnsCoder()
    escapes = []
    encoded = []
    for table, rows in groups:
        symbols, esc = to_tuples(rows, table.half, table.m)
        encoded.append((table, symbols))
        escapes.append(esc)
    # A stack: encode the last group first so that decoding runs front to back.
    for table, symbols in reversed(encoded):
        coder.encode_reverse(symbols, table.model())
    words = coder.get_compressed()
    return words, (np.concatenate(escapes) if escapes else np.zeros(0, dtype=np.int32)).astype(np.int32)


def decode_classes(words: np.ndarray, groups: list[tuple[ClassTable, int, int]]) -> list[np.ndarray]:
    """groups: (table, rows, tokens) in encoding order. Returns the symbols of each group."""
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = []
        for table, n, tokens in groups:
            out.append(coder.decode(table.model(), n * (-(-tokens // table.m))))
    except (ValueError, RuntimeError) as err:
        raise CodecError(f"entropy decoder: {err}") from None
    if not coder.is_empty():
        raise CodecError("entropy decoder did not consume its whole stream")
    return out
