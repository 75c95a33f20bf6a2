"""The C entropy coder (codecs/_ans.c) behind codecs/rans.py and codecs/entropy.py: against the independent
reference decoder, its refusals through the Python wrappers, its own refusals of inconsistent arrays, and
decoding on threads without the GIL."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import kvq_reference
from coder_inputs import fit_tables, random_streams, ticks_during
from kvcli.codecs import _ans, entropy, rans
from kvcli.codecs.base import CodecError


def tables_of(rng) -> rans.Tables:
    """Skewed, flat and extreme tables: one symbol at frequency 1 beside one at 2^16 - 2."""
    skewed = rans.normalize_counts(np.bincount(rng.geometric(0.3, 600), minlength=41))
    return rans.Tables([skewed, rans.normalize_counts(np.ones(626)), np.array([1, rans.TOTAL - 2, 1], np.uint32)])


def coded(seed: int = 0, sizes=(5, 8 * 1024 + 1, 4)):
    rng = np.random.default_rng(seed)
    tables = tables_of(rng)
    streams = random_streams(rng, tables, list(sizes))
    return tables, streams, rans.encode_streams(tables, streams)


@pytest.mark.parametrize("bits", [11, 12])
def test_streams_round_trip_and_match_the_reference_decoder(bits):
    """Lane counts 0 to 3, partial last steps, both bucket sizes of the decoder's search tables; the plain-Python
    decoder of tests/kvq_reference.py agrees."""
    tables, streams, out = coded(1, (0, 1, 2, 1023, 1024, 1025, 2048, 3000))
    tables = rans.Tables(tables.freqs, bucket_bits=bits)
    assert [len(st.states) for st in out] == [0, 1, 1, 1, 1, 2, 2, 3]
    decoded = rans.decode_streams(tables, [(t, st) for (_, t), st in zip(streams, out)])
    for (sym, tid), st, got in zip(streams, out, decoded):
        assert np.array_equal(got, sym)
        table_of = [tables.freqs[k].tolist() for k in tid]
        assert kvq_reference.rans_decode(st.states.tolist(), st.words.tolist(), table_of) == sym.tolist()


def banded_case(seed: int = 3, pairs_left_out=()):
    """kvq version 4 segments of 3 heads x 5 channels, with their tables per (class, band), bands and symbols
    uniform over each symbol's table: (tables, [(layout, stream, bands, symbols, table ids)])."""
    rng = np.random.default_rng(seed)
    classes = rng.choice([-10, 0, 2, 9], size=(3, 5)).astype(np.int8)  # tuple lengths 4, 2, 2, 1
    pairs = {(int(c), b) for c in np.unique(classes) for b in (2, 3, 4, 6)} - set(pairs_left_out)
    tables = entropy.tables_of({p: rng.integers(0, 60, entropy.alphabet(p[0])) for p in pairs})
    segments = []
    for tokens in (0, 1, 9, 700):
        lay = entropy.Layout.of(entropy.groups_of(classes), tokens, tables)
        bands = rng.choice([2, 3, 4], size=(3, tokens)).astype(np.uint8)
        ids = lay.table_ids(tables, bands, 5)
        assert np.array_equal(ids, spec_ids(tables, classes, tokens, bands))
        sizes = np.array([len(f) for f in tables.coder.freqs])
        symbols = (rng.random(len(ids)) * sizes[ids]).astype(np.int64)
        (stream,) = rans.encode_streams(tables.coder, [(symbols, ids)])
        segments.append((lay, stream, bands, symbols, ids))
    return tables, segments


def spec_ids(tables, classes, tokens, bands):
    """docs/codec.md's rule, written out: channel by channel in symbol order, tuple u takes the table of its class
    and of the band of its first token, u * m, at the channel's head."""
    pairs = {(c, b): k for k, (c, b) in enumerate(zip(tables.classes, tables.bands))}
    out = []
    for cls in sorted(set(classes.reshape(-1).tolist())):
        m = entropy.class_layout(cls)[1]
        for flat in np.flatnonzero(classes.reshape(-1) == cls).tolist():
            out += [pairs[(cls, int(bands[flat // classes.shape[1], u]))] for u in range(0, tokens, m)]
    return np.array(out, np.uint16)


def banded_jobs(segments):
    return [(lay, entropy.Coded(stream, b"", 0), bands, 5) for lay, stream, bands, *_ in segments]


def test_banded_streams_decode_as_a_table_per_symbol_does():
    """kvq version 4's decoder (each symbol's table from its channel's head and its tuple's band) gives the symbols
    that decode_streams gives for Layout.table_ids' tables: one stream that needs 0, 1 and several lanes."""
    tables, segments = banded_case()
    got = entropy.decode_banded(tables, banded_jobs(segments))
    runs = rans.decode_streams(tables.coder, [(ids, stream) for _, stream, _, _, ids in segments])
    for (_, _, _, symbols, _), a, b in zip(segments, got, runs):
        assert np.array_equal(a, symbols) and np.array_equal(a, b)


def test_banded_decoder_names_the_stream_that_fails():
    """A damaged stream, and a (class, band) without a table, each refused by their index in the batch; the
    encoder's Layout.table_ids refuses the same pair."""
    tables, segments = banded_case()
    jobs = banded_jobs(segments)
    lay, coded, bands, dim = jobs[2]
    jobs[2] = (lay, entropy.Coded(damaged(coded.stream, "state changed"), b"", 0), bands, dim)
    with pytest.raises(rans.StreamError, match="the entropy decoder") as info:
        entropy.decode_banded(tables, jobs)
    assert info.value.index == 2
    cls = tables.classes[0]  # the first group's class, so its pair is the first a symbol misses
    tables, segments = banded_case(pairs_left_out=[(cls, 6)])  # the same classes; band 6 for all but cls
    jobs = banded_jobs(segments)
    lay, coded, bands, dim = jobs[3]
    jobs[3] = (lay, coded, np.full_like(bands, 6), dim)
    with pytest.raises(rans.StreamError, match=f"no entropy table for class {cls} band 6") as info:
        entropy.decode_banded(tables, jobs)
    assert info.value.index == 3
    with pytest.raises(CodecError, match=f"no entropy table for class {cls} band 6"):
        lay.table_ids(tables, np.full_like(bands, 6), dim)


def test_encoder_starts_from_the_spec_states():
    """An empty stream has no lanes and no words; one symbol of the extreme table leaves a known state."""
    tables = tables_of(np.random.default_rng(0))
    empty, one = rans.encode_streams(tables, [(np.zeros(0, np.int64), np.zeros(0, np.uint32)),
                                              (np.array([1]), np.array([2], np.uint32))])
    assert len(empty.states) == len(empty.words) == 0
    # x = 2^16, freq 2^16 - 2, cum 1: no word; (x div f) * 2^16 + x mod f + cum = 2^16 + 2 + 1.
    assert one.states.tolist() == [rans.STATE_LOW + 3] and len(one.words) == 0


def damaged(stream: rans.Stream, what: str) -> rans.Stream:
    words, states = stream.words.copy(), stream.states.copy()
    if what == "state too low":
        states[0] = 5
    elif what == "state changed":  # on a short lane, the symbols and words stay the same: only the end differs
        states[-1] ^= 1
    elif what == "word missing":
        words = words[:-1]
    elif what == "word extra":
        words = np.concatenate([words, words[:1]])
    return rans.Stream(states, words)


@pytest.mark.parametrize("what, index, message", [
    ("state too low", 1, "initial state is below 2\\^16"),
    ("state changed", 2, "did not end in its initial state"),
    ("word missing", 1, "the entropy decoder read"),
    ("word extra", 1, "the entropy decoder read"),
])
def test_damaged_stream_is_refused_with_its_index(what, index, message):
    """One stream of a batch damaged; the error names it, and the streams before it decode."""
    tables, streams, out = coded()
    jobs = [(t, st) for (_, t), st in zip(streams, out)]
    jobs[index] = (jobs[index][0], damaged(jobs[index][1], what))
    with pytest.raises(rans.StreamError, match=message) as info:
        rans.decode_streams(tables, jobs)
    assert info.value.index == index


def test_a_read_past_the_words_counts_but_reads_zero():
    """The GPU kernel's rule: the count of words read is exact, however the last words are missing."""
    tables, streams, out = coded()
    st = out[1]
    with pytest.raises(rans.StreamError, match=f"read {len(st.words)} of {len(st.words) - 3} words"):
        rans.decode_streams(tables, [(streams[1][1], rans.Stream(st.states, st.words[:-3]))])


def test_wrapper_refuses_sizes_the_caller_must_check():
    tables, streams, out = coded()
    st = out[1]
    for bad in (rans.Stream(st.states[:-1], st.words), rans.Stream(st.states, np.zeros(len(streams[1][1]) + 1, np.uint16))):
        with pytest.raises(AssertionError):
            rans.decode_streams(tables, [(streams[1][1], bad)])


def raw_decode_args(tables, streams, out):
    """The arrays rans.decode_runs hands the C decoder, as a mutable list."""
    counts = np.array([len(t) for _, t in streams], np.int64)
    runs = [rans.Runs.of(t) for _, t in streams]
    return [tables.search, np.concatenate([r.run_tables for r in runs]),
            np.concatenate([r.run_lengths for r in runs]), np.array([len(r.run_tables) for r in runs], np.int64), counts,
            np.array([rans.lanes_for(n) for n in counts], np.int64),
            np.concatenate([st.states for st in out]), np.concatenate([st.words for st in out] + [np.zeros(1, np.uint16)]),
            np.array([len(st.words) for st in out], np.int64), np.empty(int(counts.sum()), np.uint16),
            np.empty(len(out), np.int64), np.empty(len(out), np.int64)]


def extra_run(a):
    """One empty run after the last stream's."""
    a[1], a[2] = np.append(a[1], np.uint16(0)), np.append(a[2], 0)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.__setitem__(1, np.full_like(a[1], 3)), "tables that exist"),  # only 3 tables
    (lambda a: a.__setitem__(2, a[2] + 1), "do not cover"),  # every run one symbol long
    (lambda a: a.__setitem__(3, a[3] - 1), "do not cover"),  # each stream's last run missing
    (extra_run, "left over"),
    (lambda a: a.__setitem__(2, a[2][:-1]), "sizes disagree"),
    (lambda a: a.__setitem__(5, a[5] + 1), "do not add up"),  # more lanes than states
    (lambda a: a.__setitem__(5, np.zeros_like(a[5])), "lanes for"),  # symbols but no lanes
    (lambda a: a.__setitem__(7, a[7][:-1]), "spare"),  # no spare word
    (lambda a: a.__setitem__(6, a[6][:-1]), "do not add up"),
    (lambda a: a.__setitem__(9, a[9][:-1]), "do not add up"),  # output shorter than the symbols
    (lambda a: a.__setitem__(9, np.zeros(len(a[9]), np.uint32)), "do not add up"),  # wrong dtype
    (lambda a: a.__setitem__(0, a[1]), "PyCapsule"),  # search tables that search() did not build
])
def test_c_decoder_refuses_inconsistent_arrays(change, message):
    """Caller bugs are ValueError before any decoding, never a read out of bounds or a StreamError."""
    args = raw_decode_args(*coded())
    _ans.decode(*args)
    args = raw_decode_args(*coded())
    change(args)
    with pytest.raises(ValueError, match=message):
        _ans.decode(*args)


def shifted_cum(fc):
    """Table 0's second symbol starts one slot late: each entry is in range, the table is not contiguous."""
    fc = fc.copy()
    fc[1, 1] += 1
    return fc


@pytest.mark.parametrize("change, message", [(shifted_cum, "cum of symbol 1 is"),
                                             (lambda fc: fc * 2, "freq")])  # tables that do not sum to 2^16
def test_c_search_tables_refuse_bad_tables(change, message):
    fc, base, size = tables_of(np.random.default_rng(0)).coder_arrays
    for bits in (11, 12):
        _ans.search(fc, base, size, bits)
        with pytest.raises(ValueError, match=message):
            _ans.search(change(fc), base, size, bits)
    with pytest.raises(ValueError, match="bucket bits"):
        _ans.search(fc, base, size, 13)


def raw_banded_args(tables, segments):
    """The arrays entropy.decode_banded hands the C decoder, as a mutable list."""
    counts = np.array([len(ids) for *_, ids in segments], np.int64)
    return [tables.coder.search, *tables.by_band, np.concatenate([lay.spec.reshape(-1) for lay, *_ in segments]),
            np.concatenate([lay.rows for lay, *_ in segments]),
            np.concatenate([bands.reshape(-1) for _, _, bands, *_ in segments]),
            np.array([(len(lay.spec), len(lay.rows), lay.tokens, 3, 5) for lay, *_ in segments], np.int64).reshape(-1),
            counts, np.array([rans.lanes_for(n) for n in counts], np.int64),
            np.concatenate([st.states for _, st, *_ in segments]),
            np.concatenate([st.words for _, st, *_ in segments] + [np.zeros(1, np.uint16)]),
            np.array([len(st.words) for _, st, *_ in segments], np.int64), np.empty(int(counts.sum()), np.uint16),
            np.empty(len(segments), np.int64), np.empty(len(segments), np.int64), np.empty(len(segments), np.int64)]


def past_heads(a):
    """A channel of head 3 where the segments have 3 heads."""
    a[4] = a[4].copy()
    a[4][-1] = 3 * 5


def band_nine(a):
    a[5] = a[5].copy()
    a[5][-1] = 9


def longer_segment(a):
    """The last segment one token longer than its symbols and bands."""
    a[6] = a[6].copy()
    a[6][-3] += 1


@pytest.mark.parametrize("change, message", [
    (past_heads, "do not match"),
    (band_nine, "do not match"),
    (longer_segment, "do not match"),
    (lambda a: a.__setitem__(4, a[4][:-1]), "do not match"),  # the last segment's channels run out
    (lambda a: a.__setitem__(4, np.append(a[4], 0)), "left over"),
    (lambda a: a.__setitem__(1, np.where(a[1] == 0xFFFF, len(a[2]), a[1])), "does not exist"),
    (lambda a: a.__setitem__(2, a[2] + 1_000), "do not match"),  # a class's row past the lut
    (lambda a: a.__setitem__(2, a[2][:-1]), "one entry per table"),
    (lambda a: a.__setitem__(6, a[6][:-1]), "one shape"),
    (lambda a: a.__setitem__(15, a[15][:-1]), "one shape"),  # missing: one per stream
])
def test_c_banded_decoder_refuses_inconsistent_arrays(change, message):
    """As the run decoder: caller bugs are ValueError before any decoding."""
    tables, segments = banded_case()
    args = raw_banded_args(tables, segments)
    _ans.decode_banded(*args)
    assert args[-1].tolist() == [-1] * len(segments)
    args = raw_banded_args(tables, segments)
    change(args)
    with pytest.raises(ValueError, match=message):
        _ans.decode_banded(*args)


def test_c_decoder_refuses_runs_whose_lengths_wrap_around():
    """Runs of 2^63 - 1, 2^63 - 1 and n + 2 symbols sum to n in 64-bit arithmetic; no run may pass the stream."""
    tables, streams, out = coded(sizes=(5,))
    args = raw_decode_args(tables, streams, out)
    args[1] = np.zeros(3, np.uint16)
    args[2] = np.array([2**63 - 1, 2**63 - 1, 5 + 2], np.int64)
    args[3] = np.array([3], np.int64)
    with pytest.raises(ValueError, match="do not cover"):
        _ans.decode(*args)


def test_c_encoder_refuses_symbols_outside_their_alphabet():
    tables = tables_of(np.random.default_rng(0))
    for sym, tid in (([3], [2]), ([-1], [0]), ([0], [3])):  # table 2 has 3 symbols; there are 3 tables
        with pytest.raises(ValueError, match="out of range"):
            rans.encode_streams(tables, [(np.array(sym), np.array(tid, np.uint32))])


def test_c_expansion_refuses_a_layout_that_does_not_fit():
    groups = [entropy.Group(-10, np.array([0, 2])), entropy.Group(2, np.array([1]))]
    tables = fit_tables({-10: [np.zeros((2, 8), np.int32)], 2: [np.zeros((1, 8), np.int32)]})
    lay = entropy.Layout.of(groups, 8, tables)
    sym = np.zeros(lay.runs.symbols, np.uint16)
    rows = np.empty((3, 8), np.int32)
    _ans.expand(sym, lay.spec, lay.rows, 8, *tables.digits, np.zeros(0, np.int32), rows)
    with pytest.raises(ValueError, match="group layout"):  # a row past the output
        _ans.expand(sym, lay.spec, lay.rows + 1, 8, *tables.digits, np.zeros(0, np.int32), rows)
    with pytest.raises(ValueError, match="group layout"):  # one symbol short
        _ans.expand(sym[:-1], lay.spec, lay.rows, 8, *tables.digits, np.zeros(0, np.int32), rows)
    esc = sym.copy()
    esc[0] = 81  # class -10: K 1, m 4, so 3^4 = 81 is the escape symbol, and it has no values
    with pytest.raises(ValueError, match="escapes"):
        _ans.expand(esc, lay.spec, lay.rows, 8, *tables.digits, np.zeros(0, np.int32), rows)
    esc[0] = 82  # past the alphabet
    with pytest.raises(ValueError, match="past its alphabet"):
        _ans.expand(esc, lay.spec, lay.rows, 8, *tables.digits, np.zeros(4, np.int32), rows)


def test_joint_symbols_expand_to_their_rows_with_escapes_and_padding():
    """to_tuples' inverse: classes of tuple length 4, 2 and 1, a token count that pads, escapes in each."""
    rng = np.random.default_rng(7)
    tokens, classes = 11, np.array([-10, 2, 8, -10, 2])
    rows = (rng.normal(size=(5, tokens)) * 2.0 ** (classes[:, None] / 2)).round().astype(np.int32)
    rows[:, 3] = 900  # out of every class's range
    groups = entropy.groups_of(classes)
    tables = fit_tables({int(c): [rows[classes == c]] for c in np.unique(classes)})
    lay = entropy.Layout.of(groups, tokens, tables)
    sym, esc = [], []
    for g in groups:
        s, e = entropy.to_tuples(rows[g.rows], *entropy.class_layout(g.cls))
        sym.append(s)
        esc.append(e)
    sym = np.concatenate(sym).astype(np.uint16)
    esc = np.concatenate(esc).astype(np.int32)
    assert _ans.count_escapes(sym, lay.spec, lay.rows, tokens) == len(esc) > 0
    out = np.full((5, tokens), -7, np.int32)
    _ans.expand(sym, lay.spec, lay.rows, tokens, *tables.digits, esc, out)
    assert np.array_equal(out, rows)


def big_batch(symbols: int):
    rng = np.random.default_rng(11)
    tables = tables_of(rng)
    streams = random_streams(rng, tables, [symbols // 8] * 8)
    out = rans.encode_streams(tables, streams)
    return tables, streams, [(t, st) for (_, t), st in zip(streams, out)]


def test_threads_decode_concurrently_to_the_same_symbols():
    tables, streams, jobs = big_batch(400_000)
    alone = rans.decode_streams(tables, jobs)
    results = [None, None]

    def run(k):
        results[k] = rans.decode_streams(tables, jobs)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        assert all(np.array_equal(a, b) for a, b in zip(alone, got))
    assert all(np.array_equal(a, s) for a, (s, _) in zip(alone, streams))


def test_the_c_decoder_releases_the_gil():
    """A Python thread that only runs when the GIL is free advances while the C decoder runs. The switch
    interval is raised so that no forced switch can hand it the GIL: only a release can."""
    tables, _, jobs = big_batch(2_000_000)
    args = raw_decode_args(tables, [(None, t) for t, _ in jobs], [st for _, st in jobs])
    states = args[6].copy()
    during = ticks_during(lambda: _ans.decode(*args))
    assert np.array_equal(args[6], np.full_like(states, rans.STATE_LOW))  # the decode itself succeeded
    assert during >= 10, during


@pytest.mark.parametrize("cls", [-10, 2, 9])  # tuple lengths 4, 2, 1
def test_banded_counts_are_the_tuples_of_each_band(cls):
    """Version 4's table counts (count_banded, in C) against to_tuples' symbols counted by their first token's
    band: a token count that pads, escapes, bands that change from token to token."""
    rng = np.random.default_rng(cls + 20)
    rows = (rng.normal(size=(6, 13)) * 2.0 ** (cls / 2)).round().astype(np.int32)
    rows[:, 5] = 900  # escapes
    bands = rng.choice([1, 4, 8], size=rows.shape).astype(np.uint8)
    got = entropy.count_banded(cls, rows, bands)
    half, m = entropy.class_layout(cls)
    symbols, _ = entropy.to_tuples(rows, half, m)
    firsts = bands[:, ::m].reshape(-1)
    assert sorted(got) == sorted(set(firsts.tolist()))
    for band, counts in got.items():
        assert np.array_equal(counts, np.bincount(symbols[firsts == band], minlength=entropy.alphabet(cls)))
    counts = np.zeros((entropy.BANDS, entropy.alphabet(cls)), np.int64)
    with pytest.raises(ValueError, match="band past the last"):
        _ans.count_tuples(rows, 13, half, m, counts, np.full(rows.shape, 9, np.uint8))
    with pytest.raises(ValueError, match="one band per value"):
        _ans.count_tuples(rows, 13, half, m, counts, bands[:, :-1].copy())
