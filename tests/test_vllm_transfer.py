"""The connector's load and save machinery without vLLM: a real store, synthetic paged tensors in the CPU
backend's layout, and each fault a load can meet ending in its blocks reported for recomputation, counted by kind,
with nothing written after the fault."""

from __future__ import annotations

import time

import pytest
import torch

from kvcli.codecs.presets import make_codec
from kvcli.container import format, keys, kvfile
from kvcli.integrations.vllm import paged
from kvcli.integrations.vllm.loading import Loader, LoadJob, PagedTarget
from kvcli.integrations.vllm.saving import Saver, SaveJob
from kvcli.integrations.vllm.stats import Stats
from kvcli.modeling.kvcache import KVCache
from kvcli.storage.store import DirStore, open_store
from servers import MODEL, free_port

HEADS, DIM, LAYERS, TOKENS, BLOCK = 2, 8, 3, 40, 16
BLOCK_IDS = [3, 0, 5]  # the request's blocks; the first one vLLM's own prefix cache already held


def random_cache(tokens: int = TOKENS, seed: int = 0) -> KVCache:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (tokens,), generator=gen).tolist()
    return KVCache(ids, [torch.randn(HEADS, tokens, DIM, generator=gen) for _ in range(LAYERS)],
                   [torch.randn(HEADS, tokens, DIM, generator=gen) for _ in range(LAYERS)])


def stored(store, kv: KVCache, model: dict = MODEL) -> str:
    meta, parts = kvfile.encode(kv, model, make_codec("lossless"), 8)
    return store.put(None, format.build_header(meta, parts) + b"".join(p.data for p in parts))


def target(heads: int = HEADS) -> PagedTarget:
    return PagedTarget([torch.zeros(6, heads, BLOCK, 2 * DIM) for _ in range(LAYERS)], "cpu", BLOCK, heads, DIM, DIM,
                       torch.float32)


def run(loader: Loader, job: LoadJob) -> LoadJob:
    loader.start(job)
    deadline = time.monotonic() + 30
    for layer in range(job.layers):
        loader.wait_layer(job, layer, deadline)
    loader.finish(job, deadline)
    return job


def test_a_load_writes_the_missing_tokens_into_the_request_blocks(tmp_path):
    store, kv, stats = DirStore(tmp_path, create=True), random_cache(), Stats()
    key = stored(store, kv)
    t = target()
    job = run(Loader(store, MODEL, t, stats, 2, 30), LoadJob("r", key, kv.token_ids, BLOCK, TOKENS, BLOCK_IDS, LAYERS))
    assert job.fault is None
    where = t.where(BLOCK_IDS, BLOCK, TOKENS)
    for layer in range(LAYERS):
        k, v = paged.read_tokens(t.layers[layer], "cpu", where, DIM, DIM)
        assert torch.equal(k, kv.keys[layer][:, BLOCK:]) and torch.equal(v, kv.values[layer][:, BLOCK:])
        assert not t.layers[layer][BLOCK_IDS[0]].any()  # the locally held block is not touched
    assert stats.snapshot() == {"loads": 1, "loaded_tokens": TOKENS - BLOCK}


def other_model(store, kv):
    return stored(store, kv, dict(MODEL, weights_digest="d" * 64)), target(), kv.token_ids


def other_shapes(store, kv):
    return stored(store, kv), target(heads=HEADS + 1), kv.token_ids


def damaged(store, kv):
    key = stored(store, kv)
    path = store.root / f"{key}.kvc"
    src = format.open_source(str(path))
    header = format.read_header(src)
    src.close()
    seg = next(s for s in header.segments if s.kind == "k" and s.layer == LAYERS - 1)
    data = bytearray(path.read_bytes())
    data[header.data_offset + seg.offset] ^= 1
    path.write_bytes(bytes(data))
    return key, target(), kv.token_ids


def other_tokens(store, kv):
    return stored(store, kv), target(), [t + 1 for t in kv.token_ids]


@pytest.mark.parametrize("make, kind, layers_written", [
    (other_model, "model_mismatch", 0), (other_shapes, "shape_mismatch", 0), (other_tokens, "corrupt", 0),
    (damaged, "corrupt", LAYERS - 1)])
def test_each_fault_reports_the_blocks_and_writes_nothing_after_it(tmp_path, make, kind, layers_written):
    store, kv, stats = DirStore(tmp_path, create=True), random_cache(), Stats()
    key, t, prompt = make(store, kv)
    job = run(Loader(store, MODEL, t, stats, 1, 30), LoadJob("r", key, prompt, BLOCK, TOKENS, BLOCK_IDS, LAYERS))
    assert job.fault == kind
    assert job.blocks(BLOCK) == {0, 5}  # the blocks of tokens [16, 40): vLLM recomputes them
    assert [bool(layer.any()) for layer in t.layers] == [True] * layers_written + [False] * (LAYERS - layers_written)
    assert stats.snapshot() == {f"fault_{kind}": 1}


def test_a_store_that_is_down_is_a_fault_not_an_error(tmp_path):
    store, stats = open_store(f"http://127.0.0.1:{free_port()}"), Stats()  # nothing listens there
    kv = random_cache()
    job = run(Loader(store, MODEL, target(), stats, 1, 30),
              LoadJob("r", keys.derive_key(MODEL, "float32", {"name": "zstd", "params": {}}, kv.token_ids),
                      kv.token_ids, 0, TOKENS, BLOCK_IDS, LAYERS))
    assert job.fault == "store_unavailable" and stats.snapshot() == {"fault_store_unavailable": 1}


def test_saves_are_idempotent_by_key_and_a_full_queue_skips(tmp_path):
    store, stats = DirStore(tmp_path, create=True), Stats()
    saver = Saver(store, {"lossless": make_codec("lossless")}, MODEL, "float32", stats, max_pending=1)
    small = random_cache(seed=1)
    key = saver.save(SaveJob(small.token_ids, small.keys, small.values))["lossless"]
    assert store.exists(key) and key == saver.key_of(small.token_ids, "lossless")
    big = random_cache(tokens=4096, seed=2)  # keeps the thread encoding while the queue fills
    assert saver.submit(SaveJob(big.token_ids, big.keys, big.values))
    accepted = [saver.submit(SaveJob(small.token_ids, small.keys, small.values)) for _ in range(3)]
    saver.close()
    counts = stats.snapshot()
    assert accepted.count(False) >= 2 and counts["saves_skipped_queue_full"] == accepted.count(False)
    # the prefix already stored is not encoded again; the big one is stored once
    assert counts["saves"] == 2 and counts.get("saves_already_stored", 0) == accepted.count(True)
    assert sorted(e["tokens"] for e in store.list()) == [TOKENS, 4096]


def test_a_store_that_never_answers_times_out_and_nothing_is_written_after(tmp_path):
    """A listening socket nobody accepts from: the connection opens, no answer comes. The load gives up at its
    deadline, and the job can no longer write (vLLM recomputes those blocks meanwhile)."""
    import socket

    from kvcli.storage.store import ServerStore, open_ranged

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        store, stats, kv = ServerStore(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=3), Stats(), random_cache()
        t = target()
        loader = Loader(store, MODEL, t, stats, 1, 0.5, lambda key: open_ranged(store, key))
        key = keys.derive_key(MODEL, "float32", {"name": "zstd", "params": {}}, kv.token_ids)
        job = LoadJob("r", key, kv.token_ids, 0, TOKENS, BLOCK_IDS, LAYERS)
        loader.start(job)
        began = time.monotonic()
        loader.wait_layer(job, 0, time.monotonic() + 0.5)
        assert time.monotonic() - began < 2.5 and job.fault == "timeout" and job.cancelled
        assert job.done.wait(10)  # the client's own timeout ends the thread; the fault stays the first one
        assert job.fault == "timeout" and not any(layer.any() for layer in t.layers)
        assert stats.snapshot() == {"fault_timeout": 1}
    finally:
        silent.close()
