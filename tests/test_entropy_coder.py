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


def tables_of(rng) -> rans.Tables:
    """Skewed, flat and extreme tables: one symbol at frequency 1 beside one at 2^16 - 2."""
    skewed = rans.normalize_counts(np.bincount(rng.geometric(0.3, 600), minlength=41))
    return rans.Tables([skewed, rans.normalize_counts(np.ones(626)), np.array([1, rans.TOTAL - 2, 1], np.uint32)])


def coded(seed: int = 0, sizes=(5, 8 * 1024 + 1, 4)):
    rng = np.random.default_rng(seed)
    tables = tables_of(rng)
    streams = random_streams(rng, tables, list(sizes))
    return tables, streams, rans.encode_streams(tables, streams)


def test_streams_round_trip_and_match_the_reference_decoder():
    """Lane counts 0 to 3, partial last steps; the plain-Python decoder of tests/kvq_reference.py agrees."""
    tables, streams, out = coded(1, (0, 1, 2, 1023, 1024, 1025, 2048, 3000))
    assert [len(st.states) for st in out] == [0, 1, 1, 1, 1, 2, 2, 3]
    decoded = rans.decode_streams(tables, [(t, st) for (_, t), st in zip(streams, out)])
    for (sym, tid), st, got in zip(streams, out, decoded):
        assert np.array_equal(got, sym)
        table_of = [tables.freqs[k].tolist() for k in tid]
        assert kvq_reference.rans_decode(st.states.tolist(), st.words.tolist(), table_of) == sym.tolist()


def test_a_table_per_symbol_decodes_as_runs_do():
    """rans.decode_ids (kvq version 4: the table changes from symbol to symbol) gives decode_runs' symbols, and
    its refusals: a damaged stream named by index, a table that does not exist."""
    tables, streams, out = coded(3, (0, 1, 1025, 3000))
    jobs = [(np.asarray(t, np.uint16), st) for (_, t), st in zip(streams, out)]
    got = rans.decode_ids(tables, jobs)
    for (sym, _), a, b in zip(streams, got, rans.decode_streams(tables, [(t, st) for t, st in jobs])):
        assert np.array_equal(a, sym) and np.array_equal(a, b)
    with pytest.raises(rans.StreamError, match="the entropy decoder") as info:
        rans.decode_ids(tables, jobs[:2] + [(jobs[2][0], damaged(jobs[2][1], "state changed"))])
    assert info.value.index == 2
    bad = jobs[2][0].copy()
    bad[7] = len(tables.freqs)
    with pytest.raises(ValueError, match="table does not exist"):
        rans.decode_ids(tables, [(bad, jobs[2][1])])


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
    return [*tables.coder_arrays, np.concatenate([r.run_tables for r in runs]),
            np.concatenate([r.run_lengths for r in runs]), np.array([len(r.run_tables) for r in runs], np.int64), counts,
            np.array([rans.lanes_for(n) for n in counts], np.int64),
            np.concatenate([st.states for st in out]), np.concatenate([st.words for st in out] + [np.zeros(1, np.uint16)]),
            np.array([len(st.words) for st in out], np.int64), np.empty(int(counts.sum()), np.uint16),
            np.empty(len(out), np.int64), np.empty(len(out), np.int64)]


def shifted_cum(a):
    """Table 0's second symbol starts one slot late: each entry is in range, the table is not contiguous."""
    fc = a[0].copy()
    fc[1, 1] += 1
    a[0] = fc


def extra_run(a):
    """One empty run after the last stream's."""
    a[3], a[4] = np.append(a[3], np.uint16(0)), np.append(a[4], 0)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.__setitem__(3, np.full_like(a[3], 3)), "tables that exist"),  # only 3 tables
    (lambda a: a.__setitem__(4, a[4] + 1), "do not cover"),  # every run one symbol long
    (lambda a: a.__setitem__(5, a[5] - 1), "do not cover"),  # each stream's last run missing
    (extra_run, "left over"),
    (lambda a: a.__setitem__(4, a[4][:-1]), "sizes disagree"),
    (lambda a: a.__setitem__(7, a[7] + 1), "do not add up"),  # more lanes than states
    (lambda a: a.__setitem__(7, np.zeros_like(a[7])), "lanes for"),  # symbols but no lanes
    (lambda a: a.__setitem__(9, a[9][:-1]), "spare"),  # no spare word
    (lambda a: a.__setitem__(8, a[8][:-1]), "do not add up"),
    (lambda a: a.__setitem__(11, a[11][:-1]), "do not add up"),  # output shorter than the symbols
    (shifted_cum, "cum of symbol 1 is"),
    (lambda a: a.__setitem__(0, a[0] * 2), "freq"),  # tables that do not sum to 2^16
    (lambda a: a.__setitem__(11, np.zeros(len(a[11]), np.uint32)), "do not add up"),  # wrong dtype
])
def test_c_decoder_refuses_inconsistent_arrays(change, message):
    """Caller bugs are ValueError before any decoding, never a read out of bounds or a StreamError."""
    args = raw_decode_args(*coded())
    _ans.decode(*args)
    args = raw_decode_args(*coded())
    change(args)
    with pytest.raises(ValueError, match=message):
        _ans.decode(*args)


def test_c_decoder_refuses_runs_whose_lengths_wrap_around():
    """Runs of 2^63 - 1, 2^63 - 1 and n + 2 symbols sum to n in 64-bit arithmetic; no run may pass the stream."""
    tables, streams, out = coded(sizes=(5,))
    args = raw_decode_args(tables, streams, out)
    args[3] = np.zeros(3, np.uint16)
    args[4] = np.array([2**63 - 1, 2**63 - 1, 5 + 2], np.int64)
    args[5] = np.array([3], np.int64)
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
    states = args[8].copy()
    during = ticks_during(lambda: _ans.decode(*args))
    assert np.array_equal(args[8], np.full_like(states, rans.STATE_LOW))  # the decode itself succeeded
    assert during >= 10, during
