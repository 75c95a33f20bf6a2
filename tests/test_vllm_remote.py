"""The connector over remote stores, without vLLM: real `serve-cache` and `moto_server` processes, synthetic paged
tensors in the CPU backend's layout, and the connector's own store access (store_access.py):

- a store killed while a load's bytes are on the wire: a fault of its kind, logged once, nothing written, the
  blocks given back for recomputation, no exception out of the loader;
- `cache_dir`: local copies of remote caches, reused by a later load (the store is stopped by then), bounded in
  bytes, least recently used evicted first; `token_file` for a serve-cache store that requires its token;
- an index whose entries name a file of the perturbed-weights model under the prompt's chunk keys: no hit, and
  the connector claims no tokens.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time

import pytest
import torch

from kvcli.container import format, keys
from kvcli.integrations.vllm import paged
from kvcli.integrations.vllm.loading import Loader, LoadJob, PagedTarget
from kvcli.integrations.vllm.settings import Settings
from kvcli.integrations.vllm.stats import Stats
from kvcli.integrations.vllm.store_access import claimable, file_opener, lookup, open_connector_store
from kvcli.storage import index
from kvcli.storage.store import DirStore, open_ranged, open_store
from servers import MODEL, CacheServer, ThrottleProxy, moto_server
from test_vllm_transfer import DIM, HEADS, LAYERS, random_cache, stored

BLOCK = 16
TOKEN = "gaps-token"


def paged_target(tokens: int) -> PagedTarget:
    blocks = -(-tokens // BLOCK)
    return PagedTarget([torch.zeros(blocks, HEADS, BLOCK, 2 * DIM) for _ in range(LAYERS)], "cpu", BLOCK, HEADS, DIM,
                       DIM, torch.float32)


def load(loader: Loader, key: str, kv, tokens: int) -> LoadJob:
    """One whole-file load into blocks 0.., waited for as vLLM's worker waits (every layer, then the settlement)."""
    job = LoadJob("r", key, kv.token_ids, 0, tokens, list(range(-(-tokens // BLOCK))), LAYERS)
    loader.start(job)
    deadline = time.monotonic() + 30
    for layer in range(LAYERS):
        loader.wait_layer(job, layer, deadline)
    loader.finish(job, deadline)
    return job


def written(t: PagedTarget, kv, tokens: int) -> bool:
    where = t.where(list(range(len(t.layers[0]))), 0, tokens)
    for layer in range(LAYERS):
        k, v = paged.read_tokens(t.layers[layer], "cpu", where, DIM, DIM)
        if not (torch.equal(k, kv.keys[layer][:, :tokens]) and torch.equal(v, kv.values[layer][:, :tokens])):
            return False
    return True


@contextlib.contextmanager
def s3_environment(monkeypatch):
    """A moto_server of this test's own (the test may kill it), its AWS environment in this process, a bucket."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    with moto_server() as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # kvcli's own retries stay: a dead endpoint fails in a second
        boto3.client("s3").create_bucket(Bucket="caches")
        yield env


# ---------------------------------------------------------------- a store killed mid-load

KILL_TOKENS = 8192  # about 3 MB lossless: seconds on the throttled link below
RATE = 200_000  # bytes/s per connection


def killed_mid_load(store, key: str, kv, stop_store, caplog) -> None:
    """Loads the stored file `key` through `store` (reached through a throttled proxy) twice over: the store is
    stopped once the first load has opened the file, while its bytes are still on the wire."""
    t, stats = paged_target(KILL_TOKENS), Stats()
    opened = []
    loader = Loader(store, MODEL, t, stats, 1, 30, lambda k: opened.append(k) or open_ranged(store, k))
    job = LoadJob("r", key, kv.token_ids, 0, KILL_TOKENS, list(range(KILL_TOKENS // BLOCK)), LAYERS)
    caplog.set_level(logging.WARNING, logger="kvcli.vllm")
    loader.start(job)
    deadline = time.monotonic() + 20
    while not opened and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the header's or the segments' bytes are coming at RATE
    assert opened and not job.done.is_set() and not job.events[0].is_set(), "the kill must land mid-transfer"
    stop_store()
    for layer in range(LAYERS):
        loader.wait_layer(job, layer, deadline)
    loader.finish(job, deadline)
    assert job.done.is_set() and job.fault == "store_unavailable"
    assert job.blocks(BLOCK) == set(range(KILL_TOKENS // BLOCK))  # all of them: vLLM recomputes them
    assert not any(layer.any() for layer in t.layers)  # nothing written, then or later
    # a second load meets the dead store: counted again, not logged again
    again = load(loader, key, kv, KILL_TOKENS)
    assert again.fault == "store_unavailable" and not any(layer.any() for layer in t.layers)
    assert stats.snapshot() == {"fault_store_unavailable": 2}
    logged = [r for r in caplog.records if r.name == "kvcli.vllm"]
    assert len(logged) == 1 and "store_unavailable" in logged[0].getMessage()


def test_serve_cache_killed_mid_load(tmp_path, caplog):
    root, kv = tmp_path / "root", random_cache(tokens=KILL_TOKENS, seed=3)
    key = stored(DirStore(root, create=True), kv)
    with CacheServer(root) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with ThrottleProxy(("127.0.0.1", port), rate=RATE) as proxy:
            store = open_store(f"http://127.0.0.1:{proxy.port}")
            killed_mid_load(store, key, kv, lambda: server.stop(signal.SIGKILL), caplog)


def test_s3_killed_mid_load(tmp_path, caplog, monkeypatch):
    with s3_environment(monkeypatch) as env:
        kv = random_cache(tokens=KILL_TOKENS, seed=3)
        key = stored(open_store("s3://caches/kill"), kv)
        port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        with ThrottleProxy(("127.0.0.1", port), rate=RATE) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
            store = open_store("s3://caches/kill")

            def kill() -> None:
                env.proc.kill()
                env.proc.wait(10)

            killed_mid_load(store, key, kv, kill, caplog)


# ---------------------------------------------------------------- cache_dir and token_file

COPY_TOKENS = 300  # one whole chunk, so the lookup finds it too


def copies(directory) -> set[str]:
    return {p.stem for p in directory.glob("*.kvc")}


def test_cache_dir_keeps_bounded_least_recently_used_copies_of_a_server_that_requires_its_token(tmp_path, monkeypatch):
    for name in ("KVCLI_TOKEN", "KVCLI_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    root, local = tmp_path / "root", tmp_path / "copies"
    kvs = [random_cache(tokens=COPY_TOKENS, seed=10 + i) for i in range(3)]
    src = DirStore(root, create=True)
    names = [stored(src, kv) for kv in kvs]
    sizes = [src.size(k) for k in names]
    bound = 2 * max(sizes) + min(sizes) // 2  # room for two copies, not three
    assert bound < sum(sizes)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with CacheServer(root, "--token-file", str(token_file), "--read-token") as server:
        stats = Stats()
        # without the token the server refuses the lookup: a miss, counted as the store's fault
        anonymous = open_connector_store(Settings(store=server.url, quality="none"))
        assert lookup(anonymous, MODEL, "float32", kvs[0].token_ids, stats) == []
        assert stats.snapshot() == {"lookups": 1, "fault_store_unavailable": 1}

        settings = Settings(store=server.url, token_file=str(token_file), quality="none", cache_dir=str(local),
                            cache_dir_bytes=bound)
        store = open_connector_store(settings)
        (hit,) = lookup(store, MODEL, "float32", kvs[0].token_ids + [7, 8], stats)
        assert hit.file_key == names[0] and hit.tokens == 256
        assert claimable(hit, COPY_TOKENS + 2, BLOCK, 0) == 256
        t = paged_target(COPY_TOKENS)
        opener = file_opener(store, settings, stats)
        loader = Loader(store, MODEL, t, stats, 1, 30, opener)

        def load_and_check(i: int) -> None:
            for layer in t.layers:
                layer.zero_()
            job = load(loader, names[i], kvs[i], COPY_TOKENS)
            opener.wait()  # the copy is made after the load, in the background
            assert job.fault is None and written(t, kvs[i], COPY_TOKENS)
            time.sleep(0.02)  # recency is the copy's mtime: keep the order unambiguous

        load_and_check(0)
        load_and_check(1)
        assert copies(local) == {names[0], names[1]}
        load_and_check(0)  # from its copy, which is now the most recently used
        load_and_check(2)  # over the bound: the least recently used copy (1) goes
        assert copies(local) == {names[0], names[2]}
        assert sum(p.stat().st_size for p in local.glob("*.kvc")) <= bound
    # the server is gone: the copies still serve, the evicted cache is a fault of the store
    load_and_check(0)
    load_and_check(2)
    for layer in t.layers:
        layer.zero_()
    gone = load(loader, names[1], kvs[1], COPY_TOKENS)
    assert gone.fault == "store_unavailable" and not any(layer.any() for layer in t.layers)
    assert stats.snapshot()["loads"] == 6 and stats.snapshot()["fault_store_unavailable"] == 2


def test_cache_dir_copies_from_s3_serve_after_the_store_is_gone(tmp_path, monkeypatch):
    kv = random_cache(tokens=COPY_TOKENS, seed=20)
    local = tmp_path / "copies"
    with s3_environment(monkeypatch) as env:
        settings = Settings(store="s3://caches/copies", quality="none", cache_dir=str(local), cache_dir_bytes=1 << 20)
        store = open_connector_store(settings)
        key = stored(store, kv)
        t, stats = paged_target(COPY_TOKENS), Stats()
        opener = file_opener(store, settings, stats)
        loader = Loader(store, MODEL, t, stats, 1, 30, opener)
        assert load(loader, key, kv, COPY_TOKENS).fault is None
        opener.wait()
        assert copies(local) == {key}
        env.proc.kill()
        env.proc.wait(10)
        for layer in t.layers:
            layer.zero_()
        assert load(loader, key, kv, COPY_TOKENS).fault is None and written(t, kv, COPY_TOKENS)
    assert stats.snapshot() == {"loads": 2, "loaded_tokens": 2 * COPY_TOKENS, "cache_dir_copies": 1}


def test_a_load_of_a_prefix_over_a_slow_link_reads_the_prefix_and_leaves_a_whole_copy(tmp_path):
    """The file spans more fetch blocks than a download runs at once, and the load needs only its first chunk:
    the load must not wait for the rest of the file, and the copy must still be whole (a download cut short when
    the load closed its file used to leave none, so every load fetched again)."""
    root, local = tmp_path / "root", tmp_path / "copies"
    kv = random_cache(tokens=24576, seed=21)  # about 10 MB: 10 blocks of 1 MiB, 4 fetched at once
    key = stored(DirStore(root, create=True), kv)
    stats = Stats()
    with CacheServer(root) as server:
        with ThrottleProxy(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), rate=4_000_000) as proxy:
            settings = Settings(store=f"http://127.0.0.1:{proxy.port}", quality="none", cache_dir=str(local))
            store = open_connector_store(settings)
            t = paged_target(256)
            opener = file_opener(store, settings, stats)
            loader = Loader(store, MODEL, t, stats, 1, 30, opener)
            job = load(loader, key, kv, 256)
            assert job.fault is None and written(t, kv, 256)
            opener.wait()
    assert copies(local) == {key} and (local / f"{key}.kvc").read_bytes() == (root / f"{key}.kvc").read_bytes()
    for layer in t.layers:
        layer.zero_()
    assert load(loader, key, kv, 256).fault is None and written(t, kv, 256)  # the store is gone: from the copy
    assert stats.snapshot() == {"loads": 2, "loaded_tokens": 512, "cache_dir_copies": 1}


# ---------------------------------------------------------------- an index naming another model's file

@pytest.mark.parametrize("served", [False, True], ids=["dir", "serve-cache"])
def test_an_index_naming_a_file_of_the_perturbed_model_gives_no_hit_and_no_claim(tmp_path, served):
    """The file was made by the same architecture with perturbed weights (its identity's weights digest differs);
    entries written by hand under the engine model's chunk keys of the prompt name it. The lookup reads the file's
    header, whose chunk keys are the other model's: no hit, so the connector claims nothing."""
    root = tmp_path / "root"
    store = DirStore(root, create=True)
    kv = random_cache(tokens=600, seed=5)
    perturbed = dict(MODEL, weights_digest="e" * 64)
    key = stored(store, kv, perturbed)
    src = format.open_source(str(root / f"{key}.kvc"))
    header = format.read_header(src)
    src.close()
    info = index.file_chunks(header, store.size(key))
    for i, chunk in enumerate(keys.chunk_keys(MODEL, header.dtype, kv.token_ids)):
        (root / index.INDEX / chunk).mkdir(parents=True)
        (root / index.INDEX / chunk / key).write_bytes(keys.canonical_json(info.hit(key, i + 1).to_json()) + b"\n")
    prompt = kv.token_ids + [1, 2, 3]
    with contextlib.ExitStack() as stack:
        if served:
            store = open_store(stack.enter_context(CacheServer(root)).url)
        stats = Stats()
        # the file itself is sound and indexed: the perturbed model finds it
        (hit,) = lookup(store, perturbed, header.dtype, prompt, stats)
        assert claimable(hit, len(prompt), BLOCK, 0) == 512
        assert lookup(store, MODEL, header.dtype, prompt, stats) == [] and claimable(None, len(prompt), BLOCK, 0) == 0
        assert stats.snapshot() == {"lookups": 2, "lookup_hits": 1, "lookup_hit_tokens": 512}
