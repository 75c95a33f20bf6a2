"""The connector's loads under a deadline, without vLLM: the scheduler's claim (deadline.claim) and the worker's
chunk-by-chunk load (loading.DeadlineLoad) against a real `serve-cache` of three levels, reached through a
throttled proxy (one link's rate, shared by its connections), into synthetic paged tensors in the CPU layout:

- a fast link claims the top level, the whole prefix (the first load to a store, which has no throughput to go by,
  takes its first chunk from the lowest level);
- the link slows after a load remembered it fast: the claim is still the top level, the worker's first read
  measures the slow link and the chunks come from lower levels, each equal to its own level's decode;
- then the claim itself is a lower level; and nothing at all where computing the prompt is sooner;
- a store that stalls mid-load: the blocks are given back to vLLM (no fault), nothing written.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvcli.codecs.presets import make_codec
from kvcli.container import format, kvfile
from kvcli.integrations.vllm import deadline as plans
from kvcli.integrations.vllm import paged
from kvcli.integrations.vllm.loading import DeadlineSpec, Loader, LoadJob, PagedTarget
from kvcli.integrations.vllm.saving import Saver, SaveJob
from kvcli.integrations.vllm.stats import Stats
from kvcli.integrations.vllm.store_access import lookup
from kvcli.modeling.kvcache import KVCache
from kvcli.storage.store import DirStore, open_ranged, open_store
from servers import MODEL, CacheServer, ThrottleProxy

HEADS, DIM, LAYERS, BLOCK = 2, 64, 3, 16
TOKENS = 1024  # four 256-token chunks: high 417 kB, balanced 258 kB, small 164 kB
PROMPT = TOKENS + 8  # the stored document and a question: vLLM computes the last 8
LEVELS = ("high", "balanced", "small")
ELEMENTS = LAYERS * HEADS * 2 * DIM
SLOW = 100_000  # bytes/s: high takes over 4 s, small under 2
DEADLINE_S = 3.0
PREFILL_S = 0.01  # per token: computing the prompt takes 10 s, far past the deadline


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """A store with the three levels of one document, served by serve-cache behind a proxy (rate None at first)."""
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "cache"))  # the link and speed memories
    gen = torch.Generator().manual_seed(4)
    kv = KVCache(torch.randint(0, 1000, (TOKENS,), generator=gen).tolist(),
                 [torch.randn(HEADS, TOKENS, DIM, generator=gen) for _ in range(LAYERS)],
                 [torch.randn(HEADS, TOKENS, DIM, generator=gen) for _ in range(LAYERS)])
    root = tmp_path / "root"
    saver = Saver(DirStore(root, create=True), {q: make_codec(q) for q in LEVELS}, MODEL, "float32", Stats(), 1)
    keys = saver.save(SaveJob(kv.token_ids, kv.keys, kv.values))
    saver.close()
    with CacheServer(root) as server:
        with ThrottleProxy(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), shared=True) as proxy:
            yield proxy, f"http://127.0.0.1:{proxy.port}", kv, keys, root


def decoded(root, key: str) -> KVCache:
    """A level's own decode, the reference each loaded chunk must equal."""
    src = format.open_source(str(root / f"{key}.kvc"))
    try:
        return kvfile.decode(src, format.read_header(src))
    finally:
        src.close()


def target() -> PagedTarget:
    return PagedTarget([torch.zeros(-(-PROMPT // BLOCK), HEADS, BLOCK, 2 * DIM) for _ in range(LAYERS)], "cpu",
                       BLOCK, HEADS, DIM, DIM, torch.float32)


def claim(store, speeds: plans.EngineSpeeds, prompt: list[int]):
    """What the scheduler does for a new request: one lookup (timed: the latency), then the claim."""
    began, seen = time.perf_counter(), time.time()
    hits = lookup(store, MODEL, "float32", prompt, Stats())
    latency = time.perf_counter() - began
    chosen = plans.claim(hits, store.url, latency, speeds.current(), ELEMENTS, "small", PROMPT, 0, TOKENS,
                         seen + DEADLINE_S - time.time())
    return chosen, hits, seen, latency


def load(store, speeds, t: PagedTarget, prompt, stats: Stats, opener=None):
    """The claim, then the worker's load of it, waited for as vLLM's worker waits."""
    chosen, hits, seen, latency = claim(store, speeds, prompt)
    assert chosen.level is not None
    spec = DeadlineSpec(seen + DEADLINE_S, PROMPT, tuple(plans.levels_of(hits, "small")), chosen.level.quality,
                        latency)
    loader = Loader(store, MODEL, t, stats, 1, 30, opener or (lambda key: open_ranged(store, key)), speeds=speeds)
    job = LoadJob("r", chosen.level.file_key, prompt[:TOKENS], 0, TOKENS, list(range(len(t.layers[0]))), LAYERS,
                  deadline=spec)
    loader.start(job)
    deadline = time.monotonic() + 30
    for layer in range(LAYERS):
        loader.wait_layer(job, layer, deadline)
    loader.finish(job, deadline)
    loader.close()
    return chosen, job


def chunk_sources(t: PagedTarget, references: dict[str, KVCache]) -> list[str]:
    """Per 256-token chunk, the level whose own decode the written tokens equal exactly ('?' for none)."""
    where = t.where(list(range(len(t.layers[0]))), 0, TOKENS)
    written = [paged.read_tokens(t.layers[layer], "cpu", where, DIM, DIM) for layer in range(LAYERS)]
    out = []
    for lo in range(0, TOKENS, 256):
        same = [q for q, ref in references.items()
                if all(torch.equal(written[layer][0][:, lo:lo + 256], ref.keys[layer][:, lo:lo + 256])
                       and torch.equal(written[layer][1][:, lo:lo + 256], ref.values[layer][:, lo:lo + 256])
                       for layer in range(LAYERS))]
        out.append(same[0] if len(same) == 1 else "?")
    return out


def test_the_claim_and_the_load_follow_the_link(served):
    proxy, url, kv, keys, root = served
    references = {q: decoded(root, keys[q]) for q in LEVELS}
    prompt = kv.token_ids + list(range(8))
    speeds = plans.EngineSpeeds(plans.speeds_name(MODEL, "cpu", "float32"), PREFILL_S)

    # a fast link: the top level, the whole prefix; the link unmeasured yet, the first chunk's read (of the
    # lowest level) measures it, and the others come from the top level; the load remembers the link
    t, stats = target(), Stats()
    chosen, job = load(open_store(url), speeds, t, prompt, stats)
    assert (chosen.level.quality, chosen.end, chosen.meets) == ("high", TOKENS, True)
    assert job.fault is None and job.given_back is None and job.recompute_blocks(BLOCK) == set()
    assert chunk_sources(t, references) == ["small"] + ["high"] * 3
    counts = stats.snapshot()
    assert counts["deadline_chunks_high"] == 3 and counts["deadline_chunks_degraded"] == 1

    # and now that it is remembered, every chunk from the top level
    t, stats = target(), Stats()
    chosen, job = load(open_store(url), speeds, t, prompt, stats)
    assert chosen.level.quality == "high" and chunk_sources(t, references) == ["high"] * 4
    assert "deadline_chunks_degraded" not in stats.snapshot()

    # the link slows (a new client, new connections at the new rate): the claim, from memory, is still the top
    # level; the worker's first read measures the slow link and takes the chunks from lower levels
    proxy.rate = SLOW
    t, stats = target(), Stats()
    began = time.monotonic()
    chosen, job = load(open_store(url), speeds, t, prompt, stats)
    took = time.monotonic() - began
    assert chosen.level.quality == "high" and job.fault is None and job.given_back is None
    sources = chunk_sources(t, references)
    counts = stats.snapshot()
    assert "?" not in sources and sources.count("high") < 4, sources
    assert counts["deadline_chunks_degraded"] == 4 - sources.count("high"), counts
    assert took < 417_130 / SLOW, took  # sooner than the top level alone would have come

    # now the link's memory is the slow one: the claim itself is a lower level
    chosen, *_ = claim(open_store(url), speeds, prompt)
    assert chosen.level is not None and chosen.level.quality in ("balanced", "small") and chosen.end == TOKENS

    # an engine whose prefill is far sooner than any load over this link claims nothing: vLLM computes the prompt
    quick = plans.EngineSpeeds(plans.speeds_name(MODEL, "cpu", "float32") + "-quick", 1e-5)
    chosen, *_ = claim(open_store(url), quick, prompt)
    assert chosen.level is None and chosen.end == 0 and chosen.meets


def test_a_store_that_stalls_mid_load_gives_the_blocks_back(served):
    """The header comes, then the store stops answering: the chunk's read is given up on once giving the whole
    load back to vLLM is all that still meets the deadline; no fault, nothing written, every block recomputed."""
    proxy, url, kv, keys, root = served
    prompt = kv.token_ids + list(range(8))
    speeds = plans.EngineSpeeds(plans.speeds_name(MODEL, "cpu", "float32"), 1e-3)  # the prompt in about 1 s
    store = open_store(url)

    def open_then_stall(key: str):
        src = open_ranged(store, key)
        src.read(0, 1)  # the header's read, as the load's first
        proxy.stalled.set()
        return src

    t, stats = target(), Stats()
    began = time.monotonic()
    try:
        chosen, job = load(store, speeds, t, prompt, stats, open_then_stall)
    finally:
        proxy.stalled.clear()
    assert chosen.level.quality == "high" and time.monotonic() - began < DEADLINE_S + 1
    assert job.fault is None and job.given_back == 0
    assert job.recompute_blocks(BLOCK) == set(range(TOKENS // BLOCK))
    assert not any(layer.any() for layer in t.layers)
    counts = stats.snapshot()
    assert counts["deadline_stalls"] == 1 and counts["deadline_chunks_given_back"] == 4
    assert counts["loaded_tokens"] == 0


def test_the_worker_gives_back_only_what_is_sooner_to_recompute_than_any_level():
    order = ["high", "balanced", "small"]
    rest = {"high": 3.0, "balanced": 2.0, "small": 1.0}
    assert plans.replan(rest, 5.0, 2.5, order) == ("balanced", True)  # the best level that fits
    assert plans.replan(rest, 5.0, 0.5, order) == ("small", False)  # none fits: the fastest
    assert plans.replan(rest, 0.9, 0.5, order) == (plans.GIVE_BACK, False)  # recomputing is sooner than any
    assert plans.replan(rest, 0.9, 10.0, order) == (plans.GIVE_BACK, True)
    assert plans.replan({}, 0.9, 10.0, order) == (plans.GIVE_BACK, True)  # no level left


@pytest.mark.parametrize("extra, message", [
    ({"deadline": "soon"}, "deadline 'soon'"), ({"deadline": 0}, "deadline '0'"), ({"deadline": True}, "deadline must"),
    ({"min_quality": "best"}, "min_quality must be one of")])
def test_bad_deadline_settings_stop_the_engine_at_start(extra, message):
    from kvcli.integrations.vllm.settings import Settings

    with pytest.raises(ValueError, match=message):
        Settings.from_extra({"store": "/x", **extra})


def test_a_deadline_is_read_as_generate_reads_it():
    from kvcli.integrations.vllm.settings import Settings

    assert Settings.from_extra({"store": "/x", "deadline": "1.5s"}).deadline == 1.5
    assert Settings.from_extra({"store": "/x", "deadline": "800ms"}).deadline == 0.8
    assert Settings.from_extra({"store": "/x", "deadline": 2}).deadline == 2.0
    assert Settings.from_extra({"store": "/x"}).deadline is None


def test_a_large_file_over_a_fast_link_is_loaded_not_given_back(tmp_path, monkeypatch):
    """vLLM computing the prompt takes 2 s, the 11.5 MB lossless file crosses loopback several times sooner:
    every chunk is loaded, none given back (with no remembered throughput, from the header read's probe, whose
    latency is the load's own size request)."""
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "cache"))
    gen = torch.Generator().manual_seed(5)
    tokens = 4096
    kv = KVCache(torch.randint(0, 1000, (tokens,), generator=gen).tolist(),
                 [torch.randn(HEADS, tokens, DIM, generator=gen) for _ in range(LAYERS)],
                 [torch.randn(HEADS, tokens, DIM, generator=gen) for _ in range(LAYERS)])
    root = tmp_path / "root"
    saver = Saver(DirStore(root, create=True), {"lossless": make_codec("lossless")}, MODEL, "float32", Stats(), 1)
    (key,) = saver.save(SaveJob(kv.token_ids, kv.keys, kv.values)).values()
    saver.close()
    prompt = kv.token_ids + [1]
    # vLLM computing the prompt: 2 s; the file (11.5 MB) crosses loopback several times faster
    speeds = plans.EngineSpeeds(plans.speeds_name(MODEL, "cpu", "float32"), 2.0 / len(prompt))
    with CacheServer(root) as server:
        store = open_store(server.url)
        began, seen = time.perf_counter(), time.time()
        hits = lookup(store, MODEL, "float32", prompt, Stats())
        spec = DeadlineSpec(seen + 30, len(prompt), tuple(plans.levels_of(hits, "small")), "lossless",
                            time.perf_counter() - began)
        t = PagedTarget([torch.zeros(-(-len(prompt) // BLOCK), HEADS, BLOCK, 2 * DIM) for _ in range(LAYERS)], "cpu",
                        BLOCK, HEADS, DIM, DIM, torch.float32)
        stats = Stats()
        loader = Loader(store, MODEL, t, stats, 1, 30, lambda k: open_ranged(store, k), speeds=speeds)
        job = LoadJob("r", key, prompt[:tokens], 0, tokens, list(range(len(t.layers[0]))), LAYERS, deadline=spec)
        loader.start(job)
        loader.finish(job, time.monotonic() + 30)
        loader.close()
    assert job.fault is None and job.given_back is None, stats.snapshot()
    assert stats.snapshot()["deadline_chunks_lossless"] == tokens // 256
