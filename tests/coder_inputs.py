"""Inputs the entropy-coder tests share (CPU coder and GPU kernel alike)."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from kvcli.codecs import entropy, rans


def random_streams(rng, tables: rans.Tables, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(symbols, table ids) per stream; symbols uniform over each table, so unlikely ones renormalize often."""
    out = []
    for n in sizes:
        tid = rng.integers(0, tables.count, n).astype(np.uint32)
        alphabet = np.array([len(f) for f in tables.freqs])
        out.append(((rng.random(n) * alphabet[tid]).astype(np.int64), tid))
    return out


def ticks_during(call) -> int:
    """How many times a pure-Python thread ran while call() did. The switch interval is raised so that no forced
    switch hands that thread the GIL: it runs (many times) only if call releases the GIL."""
    ticks, stop, started = [0], threading.Event(), threading.Event()

    def count():
        started.set()
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0)  # hands the GIL back at once, so the calling thread never waits on this one

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    thread = threading.Thread(target=count)
    try:
        thread.start()
        started.wait()
        before = ticks[0]
        call()
        return ticks[0] - before
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)


def fit_tables(samples: dict[int, list[np.ndarray]]) -> entropy.ClassTables:
    """One table per class from sample rows (n, tokens) of that class's channels, as the encoder counts them."""
    return entropy.tables_of({cls: sum((entropy.count_symbols(cls, rows) for rows in rows_list),
                                       np.zeros(entropy.alphabet(cls), np.int64))
                              for cls, rows_list in samples.items()})
