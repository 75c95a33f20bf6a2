"""Inputs the entropy-coder tests share (CPU coder and GPU kernel alike)."""

from __future__ import annotations

import numpy as np

from kvcli.codecs import rans


def random_streams(rng, tables: rans.Tables, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(symbols, table ids) per stream; symbols uniform over each table, so unlikely ones renormalize often."""
    out = []
    for n in sizes:
        tid = rng.integers(0, tables.count, n).astype(np.uint32)
        alphabet = np.array([len(f) for f in tables.freqs])
        out.append(((rng.random(n) * alphabet[tid]).astype(np.int64), tid))
    return out
