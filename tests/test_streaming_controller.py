"""The streaming controller (kvcli/reuse/controller.py, docs/streaming.md) against a real `kvcli serve-cache` on
loopback, behind a throttling proxy: slow link -> lower level, fast -> top level, stalled store -> recompute,
damaged chunk -> another level or recompute, and a mixed answer equal to the same chunks decoded alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import torch

from kvcli.container import format, kvfile
from kvcli.modeling import inference
from kvcli.modeling.kvcache import KVCache
from kvcli.reuse import controller
from kvcli.reuse.controller import RECOMPUTE, Speeds, Stream

from servers import CacheServer, ThrottleProxy

LEVELS = ("lossless", "high", "small")
PROMPT = "Who keeps the lamp?"
SLOW = {"prefill_s_per_token": 1.0, "decode_s_per_element": 1e-9}  # priors: recomputing never pays


@pytest.fixture(autouse=True)
def own_memory(tmp_path, monkeypatch):
    """Each test its own remembered links and speeds."""
    memory = tmp_path / "memory"
    memory.mkdir()
    (memory / "models").symlink_to(controller.cache_root() / "models", target_is_directory=True)
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(memory))


@pytest.fixture
def stored(cli, llama, tmp_path):
    """A store holding one document at three levels, in 32-token chunks: {quality: key}."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour town of Velmora sits between two cliffs. Its lighthouse keeper, Anna Brisk, has "
                   "kept the lamp burning for thirty years. Every evening she climbs 112 steps. " * 2)
    root = tmp_path / "store"
    result = cli("prefill", doc, "--out-dir", root, "--model", llama, "-q", ",".join(LEVELS), "--chunk-tokens", "32")
    assert result.exit_code == 0, result.stderr
    return root, {line["quality"]: line["key"] for line in map(json.loads, result.stdout.splitlines())}


def stream_of(lm, url: str, deadline: float, priors: dict, min_quality: str = "small") -> Stream:
    """A stream whose speeds start from these priors, as on a machine that has measured nothing yet."""
    store, key = controller.locate(url, timeout_s=deadline + 1.0)
    return Stream(lm, store, key, deadline, min_quality, speeds=Speeds(**priors))


def run_throttled(root, key: str, lm, deadline: float, rate: float, before_run=None, **kw) -> tuple[Stream, KVCache]:
    """Stream `key` from a serve-cache of `root` behind one shared link of `rate` bytes/s; `before_run(stream)`
    runs once the stream exists, before its first byte."""
    with CacheServer(root) as srv:
        host, port = urlsplit(srv.url).hostname, urlsplit(srv.url).port
        with ThrottleProxy((host, port), rate=rate, shared=True) as proxy:
            stream = stream_of(lm, f"http://127.0.0.1:{proxy.port}/v1/caches/{key}", deadline, SLOW, **kw)
            if before_run is not None:
                before_run(stream)
            return stream, stream.run()


def picks_of(report: dict) -> list[str]:
    """The choice each chunk was finally served by, in chunk order."""
    done = [c for c in report["chunks"] if "failed" not in c]
    assert [c["chunk"] for c in done] == list(range(len(done)))
    return [c["choice"] for c in done]


def mixed_reference(root, keys: dict, picks: list[str]):
    """decode_mixed of the stored files with the same picks (no chunk recomputed)."""
    paths = [root / f"{keys[q]}.kvc" for q in LEVELS]
    sources = [format.FileSource(p) for p in paths]
    try:
        return kvfile.decode_mixed([(s, format.read_header(s)) for s in sources], [LEVELS.index(p) for p in picks])
    finally:
        for s in sources:
            s.close()


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))


def test_a_fast_link_gets_the_top_level_for_every_chunk(stored, tiny_lm):
    root, keys = stored
    lm = tiny_lm("llama")
    with CacheServer(root) as srv:
        stream = stream_of(lm, f"{srv.url}/v1/caches/{keys['small']}", 10.0, SLOW)
        kv = stream.run()
    assert [lv["quality"] for lv in stream.report["levels"]] == list(LEVELS)
    assert picks_of(stream.report) == ["lossless"] * 11
    assert same(kv, mixed_reference(root, keys, ["lossless"] * 11))


def test_a_slow_link_gets_a_lower_level_and_the_answer_of_those_chunks_decoded_alone(stored, tiny_lm):
    root, keys = stored
    lm = tiny_lm("llama")
    # 100 kB/s: the lossless file (308 kB) takes 3 s, the high one (54 kB) half a second.
    stream, kv = run_throttled(root, keys["lossless"], lm, 2.0, 100e3)
    picks = picks_of(stream.report)
    # Lower levels, save the chunks that came with the header's first read and those the time left lets through at
    # the top level; the whole top level alone would need 3.1 s at this rate.
    assert picks.count("lossless") < len(picks) / 2 and RECOMPUTE not in picks, json.dumps(stream.report)
    assert stream.report["cache_s"] < 3.0
    assert stream.report["measured_mbit_s"] < 2.0, json.dumps(stream.report)
    reference = mixed_reference(root, keys, picks)
    assert same(kv, reference)
    prompt = inference.prompt_ids(lm, PROMPT)
    assert inference.greedy_tokens(lm, kv, prompt, 8) == inference.greedy_tokens(lm, reference, prompt, 8)


def test_recomputing_in_time_is_preferred_to_a_lower_level(stored, tiny_lm):
    """On the same 100 kB/s link, the top level is too slow (3.1 s); a lower level would fit, and so would
    recomputing every chunk at 5 ms a token. Recomputing is exact: the plan takes it. (The plan alone is checked:
    a whole run would measure the prefill, and on a busy machine one slow forward pass changes the later choices.)"""
    root, keys = stored
    lm = tiny_lm("llama")
    with CacheServer(root) as srv:
        host, port = urlsplit(srv.url).hostname, urlsplit(srv.url).port
        with ThrottleProxy((host, port), rate=100e3, shared=True) as proxy:
            stream = stream_of(lm, f"http://127.0.0.1:{proxy.port}/v1/caches/{keys['lossless']}", 3.0,
                               {"prefill_s_per_token": 5e-3, "decode_s_per_element": 1e-9})
            stream.open()
    fetch = {lv.quality: stream.fetch_s(lv, 5) for lv in stream.levels}
    recompute = stream.recompute_cost(5)
    assert fetch["small"] < fetch["high"] < recompute < fetch["lossless"], (fetch, recompute)
    top = next(lv for lv in stream.levels if lv.quality == "lossless")
    rest = range(5, len(stream.bounds))
    budget = 1.1 * sum(stream.recompute_cost(j) for j in rest)
    assert sum(stream.fetch_s(top, j) for j in rest) > budget  # the top level does not fit; recomputing does
    plan = stream.plan(5, budget, set(), False)
    assert plan.choice == RECOMPUTE and plan.meets, plan
    # With less time than recomputing the rest takes, a lower level; with less than any, the fastest path.
    assert stream.plan(5, 6 * fetch["high"], set(), False).choice in ("high", "small")
    fastest = stream.plan(5, 0.0, set(), False)
    assert fastest.choice == "small" and not fastest.meets, fastest


def test_min_quality_bounds_the_choice_and_a_missed_deadline_is_said(stored, tiny_lm, capfd):
    root, keys = stored
    lm = tiny_lm("llama")
    stream, _ = run_throttled(root, keys["small"], lm, 0.3, 100e3, min_quality="high")
    assert set(picks_of(stream.report)) == {"high"}  # the fastest path allowed: never small
    assert [lv["quality"] for lv in stream.report["levels"]] == ["lossless", "high"]
    assert "the deadline of 0.3 s cannot be met at --min-quality high" in capfd.readouterr().err


def test_a_stalled_store_is_left_for_recompute(stored, tiny_lm):
    root, keys = stored
    lm = tiny_lm("llama")
    with CacheServer(root) as srv:
        host, port = urlsplit(srv.url).hostname, urlsplit(srv.url).port
        with ThrottleProxy((host, port)) as proxy:
            stream = stream_of(lm, f"http://127.0.0.1:{proxy.port}/v1/caches/{keys['high']}", 1.0,
                               {"prefill_s_per_token": 0.01, "decode_s_per_element": 1e-9})
            stream.open()
            proxy.stalled.set()  # the store stops answering after the headers
            try:
                kv = stream.stream()
            finally:
                proxy.stalled.clear()
    failed = [c for c in stream.report["chunks"] if "failed" in c]
    # Abandoned by the controller, or ended first by the client's read timeout (the deadline plus 1 s).
    assert len(failed) == 1 and (failed[0]["failed"].startswith("stalled") or "timed out" in failed[0]["failed"])
    # Chunks that came with the header's range read need no more of the store; from the stall on, recompute.
    stall = failed[0]["chunk"]
    picks = picks_of(stream.report)
    assert stall < 11 and RECOMPUTE not in picks[:stall] and picks[stall:] == [RECOMPUTE] * (11 - stall), picks
    # The chunks before the stall as stored, the rest prefilled after them.
    lo = 32 * stall
    loaded = mixed_reference(root, keys, picks[:stall] + ["high"] * (11 - stall))
    prefix = KVCache(kv.token_ids[:lo], [k[:, :lo] for k in loaded.keys], [v[:, :lo] for v in loaded.values])
    want = inference.extend(lm, prefix if lo else None, kv.token_ids[lo:])
    for got, ref in zip(kv.keys + kv.values, want.keys + want.values):
        assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_a_damaged_chunk_comes_from_another_level(stored, tiny_lm):
    root, keys = stored
    path = root / f"{keys['lossless']}.kvc"
    data = bytearray(path.read_bytes())
    with format.FileSource(path) as src:
        header = format.read_header(src)
    seg = next(s for s in header.segments if s.kind != "aux" and s.token_start == 96)  # chunk 3
    data[header.data_offset + seg.offset + seg.length // 2] ^= 0x40
    path.write_bytes(bytes(data))  # stored damaged: the store serves it as it is
    lm = tiny_lm("llama")
    with CacheServer(root) as srv:
        stream = stream_of(lm, f"{srv.url}/v1/caches/{keys['lossless']}", 10.0, SLOW)
        kv = stream.run()
    failed = [c for c in stream.report["chunks"] if "failed" in c]
    assert [(c["chunk"], c["choice"]) for c in failed] == [(3, "lossless")], failed
    assert "checksum mismatch" in failed[0]["failed"]
    picks = picks_of(stream.report)
    assert picks == ["lossless"] * 3 + ["high"] + ["lossless"] * 7
    assert same(kv, mixed_reference(root, keys, picks))


def test_a_chunk_damaged_at_every_level_is_recomputed(stored, tiny_lm):
    root, keys = stored
    for quality in LEVELS:
        path = root / f"{keys[quality]}.kvc"
        data = bytearray(path.read_bytes())
        with format.FileSource(path) as src:
            header = format.read_header(src)
        seg = next(s for s in header.segments if s.kind != "aux" and s.token_start == 0)
        data[header.data_offset + seg.offset + seg.length - 1] ^= 0x01
        path.write_bytes(bytes(data))
    lm = tiny_lm("llama")
    stream = stream_of(lm, str(root / f"{keys['high']}.kvc"), 10.0, SLOW)  # a directory store this time
    kv = stream.run()
    assert [c["choice"] for c in stream.report["chunks"] if c["chunk"] == 0] == ["lossless", "high", "small",
                                                                                RECOMPUTE]
    picks = picks_of(stream.report)
    # Once a chunk has been recomputed, its measured cost may make recomputing the sooner path: exact either way.
    assert picks[0] == RECOMPUTE and set(picks[1:]) <= {"lossless", RECOMPUTE}, picks
    exact = inference.prefill(lm, kv.token_ids[:32])
    for got, want in zip(kv.keys + kv.values, exact.keys + exact.values):
        assert torch.allclose(got[:, :32], want, atol=1e-4)


def test_the_next_chunk_is_fetched_while_one_is_recomputed(stored, tiny_lm):
    root, keys = stored
    lm = tiny_lm("llama")
    stream = stream_of(lm, str(root / f"{keys['high']}.kvc"), 10.0,
                       {"prefill_s_per_token": 1e-3, "decode_s_per_element": 1e-9})
    stream.open()
    kv_keys, kv_values = kvfile.allocate(stream.header, torch.device("cpu"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        plan = controller.Plan(RECOMPUTE, 0.1, True)
        assert stream.attempt(pool, 3, plan, 10.0, kv_keys, kv_values) is None
        ahead = stream.ahead
        assert ahead is not None and ahead.chunk == 4 and ahead.plan.choice != RECOMPUTE, ahead
        ahead.future.result(timeout=30)
    recomputed = stream.report["chunks"][-1]
    assert recomputed["choice"] == RECOMPUTE
    assert ahead.started - stream.started <= recomputed["span_s"][0]  # its read started before the prefill did


def test_the_link_is_remembered_for_the_next_run(stored, tiny_lm):
    root, keys = stored
    lm = tiny_lm("llama")
    with CacheServer(root) as srv:
        url = f"{srv.url}/v1/caches/{keys['lossless']}"
        first = stream_of(lm, url, 10.0, SLOW)
        first.run()
        second = stream_of(lm, url, 10.0, SLOW)
        second.run()
    assert first.report["initial_from"] == "probe"
    # The last run's throughput, unless this run's probe found the link much slower than that.
    assert second.report["initial_mbit_s"] == (first.report["measured_mbit_s"]
                                              if second.report["initial_from"] == "history"
                                              else second.report["probe_mbit_s"])


def test_a_remembered_fast_link_that_has_slowed_is_not_trusted_for_the_first_chunk(stored, tiny_lm):
    """The last run saw 1 Gbit/s; the link now carries 100 kB/s. The probe of this run says so before the first
    chunk is planned, so the first chunk is not fetched at the top level (3 s for the lossless file alone)."""
    root, keys = stored
    lm = tiny_lm("llama")
    stream, _ = run_throttled(root, keys["lossless"], lm, 2.0, 100e3,
                              before_run=lambda st: controller.keep_link(st.store.url, 125e6))
    assert stream.report["initial_from"] == "probe" and stream.report["initial_mbit_s"] < 2.0
    fetched = [c for c in stream.report["chunks"] if not c.get("with_header")]
    assert fetched[0]["choice"] != "lossless", json.dumps(stream.report)
    assert stream.report["cache_s"] < 3.0


def test_generate_with_a_deadline_reports_each_chunk(cli, llama, stored):
    root, keys = stored
    with CacheServer(root) as srv:
        url = f"{srv.url}/v1/caches/{keys['lossless']}"
        result = cli("generate", PROMPT, "--cache", url, "--deadline", "30s", "--json", "--model", llama, "-n", "6")
    assert result.exit_code == 0, result.stderr
    line = json.loads(result.stdout)
    stream = line["stream"]
    assert stream["deadline_s"] == 30.0 and stream["deadline_met"] is True
    assert len(stream["chunks"]) == 11 and {c["choice"] for c in stream["chunks"]} <= set(LEVELS) | {RECOMPUTE}
    assert stream["ttft_s"] >= stream["cache_s"] and stream["predicted_ttft_s"] > 0
    plain = cli("generate", PROMPT, "--cache", root / f"{keys['lossless']}.kvc", "--json", "--model", llama, "-n", "6")
    if {c["choice"] for c in stream["chunks"]} == {"lossless"}:
        assert json.loads(plain.stdout)["text"] == line["text"]


@pytest.mark.parametrize("args, message", [
    (["--deadline", "soon"], "--deadline 'soon': expected a time such as 1.5s"),
    (["--deadline", "0s"], "above 0"),
    (["--min-quality", "high"], "give --deadline too"),
    (["--deadline", "1s", "--min-quality", "best"], "--min-quality 'best': choose one of"),
    (["--deadline", "1s", "--recompute-fraction", "0.1"], "does not take --cache-dir or --recompute-fraction"),
])
def test_deadline_usage_errors(cli, llama, stored, args, message):
    root, keys = stored
    result = cli("generate", PROMPT, "--cache", root / f"{keys['high']}.kvc", "--model", llama, *args)
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


def test_a_deadline_needs_a_cache_named_by_its_key(cli, llama, stored, tmp_path):
    root, keys = stored
    other = tmp_path / "doc.kvc"
    other.write_bytes((root / f"{keys['high']}.kvc").read_bytes())
    result = cli("generate", PROMPT, "--cache", other, "--deadline", "1s", "--model", llama)
    assert result.exit_code == 2 and "--deadline needs a cache in a store" in result.stderr


def test_deadlines_parse():
    assert controller.parse_deadline("1.5s") == 1.5
    assert controller.parse_deadline("800ms") == 0.8
    assert controller.parse_deadline("2") == 2.0


def test_the_next_chunk_is_fetched_while_this_one_decodes(stored, tiny_lm):
    """On a link where each chunk's fetch takes tens of milliseconds, every fetched chunk after the first began its
    fetch before the chunk before it had finished decoding; the answer is still the same chunks decoded alone."""
    root, keys = stored
    lm = tiny_lm("llama")
    stream, kv = run_throttled(root, keys["small"], lm, 10.0, 400e3)
    done = [c for c in stream.report["chunks"] if "failed" not in c]
    picks = [c["choice"] for c in done]
    assert RECOMPUTE not in picks
    spans = [c["span_s"] for c in done]
    assert all(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1)), spans
    assert same(kv, mixed_reference(root, keys, picks))


def test_every_preset_is_a_level_in_quality_order(cli, llama, tmp_path):
    """A level stored at any preset the CLI takes is one the controller can choose, ranked by its scale."""
    from kvcli.codecs.presets import LOSSY_SCALES, QUALITIES
    from kvcli.storage.store import open_store

    assert set(QUALITIES) <= set(controller.QUALITY_RANK)
    lossy = sorted(LOSSY_SCALES, key=LOSSY_SCALES.get)  # finest step first
    assert sorted(lossy, key=controller.QUALITY_RANK.get, reverse=True) == lossy
    doc = tmp_path / "doc.txt"
    doc.write_text("Anna Brisk has kept the lamp of the Velmora lighthouse burning for thirty years. " * 3)
    root = tmp_path / "store"
    result = cli("prefill", doc, "--out-dir", root, "--model", llama, "-q", "small,tiny", "--chunk-tokens", "32")
    assert result.exit_code == 0, result.stderr
    keys = {line["quality"]: line["key"] for line in map(json.loads, result.stdout.splitlines())}
    _, levels, _ = controller.open_levels(open_store(str(root)), keys["small"], "tiny")
    assert [lv.quality for lv in levels] == ["small", "tiny"]
