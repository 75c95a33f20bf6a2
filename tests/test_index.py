"""The prefix index: chunk keys (golden), index entries kept by every store, lookups that trust only the files,
and reading the first N tokens of a stored file (docs/format.md, "Chunk keys" and "Prefix index")."""

from __future__ import annotations

import hashlib
import json
import struct

import httpx
import pytest
import torch
from servers import MODEL, CacheServer, foreign_server

from kvcli.codecs.presets import PRESET_CODECS, make_codec
from kvcli.container import format, keys, kvfile, level
from kvcli.errors import FormatError, StorageError
from kvcli.modeling.kvcache import KVCache
from kvcli.reuse.ingest import encode_file
from kvcli.storage import index, remote, store

GOLDEN_IDS = list(range(1000, 1600))  # 600 tokens: two full chunks and a partial one
GOLDEN_KEYS = ["c2166be209bfbf6c8623ccbff24640984ea127c9e1a2519b68cd733f617cbc28",
               "ab33c2154c0338b8ffd406c33b180709e3319c4b843e134da8d33f5d4a2423f7"]
TOKEN = "s3cret-token"


def document(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n,), generator=gen).tolist()


def cache_file(token_ids: list[int], quality: str = "raw", seed: int = 0, chunk: int = 64) -> bytes:
    """A real .kvc of random K/V (2 layers, 2 heads, dim 16, float32) written by kvfile.encode with a preset."""
    gen = torch.Generator().manual_seed(seed)
    n = len(token_ids)
    kv = KVCache(list(token_ids), [torch.randn(2, n, 16, generator=gen) for _ in range(2)],
                 [torch.randn(2, n, 16, generator=gen) for _ in range(2)])
    meta, parts = kvfile.encode(kv, MODEL, make_codec(quality), chunk_tokens=chunk)
    return encode_file(meta, parts)


def file_key(data: bytes) -> str:
    return keys.key_of_header(format.read_header(format.BytesSource(data)))


# ---------------------------------------------------------------- chunk keys


def spec_chunk_keys(model: dict, dtype: str, ids: list[int]) -> list[str]:
    """docs/format.md's byte layout written out again, independently of keys.chunk_keys."""
    ident = {f: model[f] for f in ("architecture", "config_digest", "weights_digest", "tokenizer_digest")}
    ident["dtype"] = dtype
    context = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode() + b"\0"
    out, prev = [], b"\0" * 32
    for start in range(0, len(ids) // 256 * 256, 256):
        prev = hashlib.sha256(b"kvcli-chunk-key-v1\0" + prev + context
                              + struct.pack("<256I", *ids[start : start + 256])).digest()
        out.append(prev.hex())
    return out


def test_chunk_keys_golden():
    got = keys.chunk_keys(MODEL, "float16", GOLDEN_IDS)
    assert got == spec_chunk_keys(MODEL, "float16", GOLDEN_IDS)
    assert got == GOLDEN_KEYS


def test_chunk_keys_chain_and_what_they_depend_on():
    ids = document(1, 800)
    full = keys.chunk_keys(MODEL, "float32", ids)
    assert len(full) == 3 and keys.chunk_keys(MODEL, "float32", ids[:255]) == []
    assert keys.chunk_keys(MODEL, "float32", ids[:512] + [7] * 100) == full[:2]  # a prefix's keys prefix the chain
    changed = ids[:300] + [ids[300] + 1] + ids[301:]
    assert keys.chunk_keys(MODEL, "float32", changed)[:2] == full[:1] + [keys.chunk_keys(MODEL, "float32", changed)[1]]
    assert keys.chunk_keys(MODEL, "float32", changed)[1:] != full[1:]  # chained: every later key changes too
    assert keys.chunk_keys({**MODEL, "name": "other"}, "float32", ids) == full  # a display name is no identity
    assert keys.chunk_keys(MODEL, "float16", ids)[0] != full[0]
    assert keys.chunk_keys({**MODEL, "weights_digest": "e" * 64}, "float32", ids)[0] != full[0]
    assert len(keys.chunk_keys(MODEL, "float32", ids, chunk_tokens=100)) == 8


def test_preset_names_of_codecs_agree_with_the_presets():
    for quality, cls in PRESET_CODECS.items():
        if cls.name in level.PRESET_OF_CODEC:
            assert level.PRESET_OF_CODEC[cls.name] == quality
    assert set(PRESET_CODECS) == set(level.QUALITY_RANK)  # every preset is a level, and nothing else is
    assert level.quality_of({"name": "kvq", "params": {"quality": "small"}}) == "small"
    # A step-scaled kvq file is no preset's: not a level, and listed by its codec's name.
    scaled = {"name": "kvq", "params": {"quality": "small", "step_scale": 1.5}}
    assert level.quality_of(scaled) is None and level.label_of(scaled) == "kvq"


# ---------------------------------------------------------------- reading the first N tokens


@pytest.mark.parametrize("quality", ["raw", "lossless", "balanced"])
def test_prefix_reader_matches_the_full_decode(quality):
    data = cache_file(document(2, 600), quality, chunk=64)
    header = format.read_header(format.BytesSource(data))
    full = kvfile.decode(format.BytesSource(data), header, threads=1)
    reads = []

    class Counting(format.BytesSource):
        def read(self, offset, length):
            reads.append((offset, length))
            return super().read(offset, length)

    reader = kvfile.PrefixReader(Counting(data), header, 300)
    for layer in range(2):
        k, v = reader.layer(layer)
        assert k.shape == (2, 300, 16) and torch.equal(k, full.keys[layer][:, :300])
        assert torch.equal(v, full.values[layer][:, :300])
    # chunks of 64: tokens [0, 320) are 5 chunks of 20 segments; nothing past them is read
    last = max(s.offset + s.length for s in header.segments if s.kind != "aux" and s.token_start < 300)
    assert max(offset + length for offset, length in reads) == header.data_offset + last < len(data)
    assert reader.cache().token_ids == header.token_ids[:300]


def test_prefix_reader_names_a_damaged_segment_and_refuses_bad_lengths():
    data = bytearray(cache_file(document(3, 300)))
    header = format.read_header(format.BytesSource(bytes(data)))
    seg = next(s for s in header.segments if s.layer == 1 and s.kind == "v" and s.token_start == 64)
    data[header.data_offset + seg.offset] ^= 0x40
    reader = kvfile.PrefixReader(format.BytesSource(bytes(data)), header, 100)
    reader.layer(0)  # a good layer decodes
    with pytest.raises(FormatError, match=r"layer 1 V tokens \[64, 128\).*checksum"):
        reader.layer(1)
    for bad in (0, 301, 1.5):
        with pytest.raises(ValueError):
            kvfile.PrefixReader(format.BytesSource(bytes(data)), header, bad)


# ---------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN)
    return str(path)


@pytest.fixture(params=["dir", "s3", "http"])
def any_store(request, tmp_path, token_file):
    """A writable store and, for the checks that look inside, the directory store under it (None for S3)."""
    if request.param == "dir":
        yield store.open_store(str(tmp_path / "root"), create=True), store.DirStore(tmp_path / "root")
    elif request.param == "s3":
        request.getfixturevalue("s3_env")
        url = f"s3://caches/{request.node.name.replace('[', '-').rstrip(']')}"
        yield store.open_store(url), store.open_store(url)
    else:
        (tmp_path / "root").mkdir()
        with CacheServer(tmp_path / "root", "--writable", "--token-file", token_file) as server:
            client = store.open_store(server.url, token=TOKEN)
            yield client, store.DirStore(tmp_path / "root")
            client.close()


def test_put_indexes_every_full_chunk_and_lookups_find_the_longest_prefix(any_store):
    st, inside = any_store
    doc = document(4, 600)
    key = st.put(None, cache_file(doc))
    chunks = keys.chunk_keys(MODEL, "float32", doc)
    assert sorted(inside._entries()) == sorted((c, key) for c in chunks)
    assert inside._index_files(chunks[1]) == [key]

    hit = st.lookup_prefix(MODEL, "float32", doc + document(5, 40))  # the document and a question
    assert hit == index.PrefixHit(key, 512, "raw", "raw", hit.bytes, 600) and hit.bytes == st.size(key)
    assert st.lookup_prefix(MODEL, "float32", doc[:300] + document(6, 500)).tokens == 256  # shares 300 tokens
    assert st.lookup_prefix(MODEL, "float32", doc + document(7, 2000)).tokens == 512  # a longer document
    assert st.lookup_prefix(MODEL, "float32", doc[:255]) is None
    assert st.lookup_prefix(MODEL, "float16", doc) is None
    assert st.lookup_prefix({**MODEL, "weights_digest": "e" * 64}, "float32", doc) is None
    assert st.lookup_prefix(MODEL, "float32", document(8, 900)) is None


def test_levels_of_one_prefix_and_the_preferred_quality(any_store):
    st, _ = any_store
    doc = document(9, 520)
    exact = st.put(None, cache_file(doc, "lossless"))
    lossy = st.put(None, cache_file(doc, "balanced"))
    shorter = st.put(None, cache_file(doc[:300], "raw"))
    hits = st.prefix_hits(MODEL, "float32", doc + [1, 2, 3])
    assert [(h.file_key, h.quality, h.tokens) for h in hits] == [(exact, "lossless", 512), (lossy, "balanced", 512)]
    assert st.lookup_prefix(MODEL, "float32", doc, quality="balanced").file_key == lossy
    assert st.lookup_prefix(MODEL, "float32", doc).file_key == exact
    assert {h.file_key for h in st.prefix_hits(MODEL, "float32", doc[:400])} == {exact, lossy, shorter}


def test_stale_and_damaged_entries_are_skipped(any_store):
    st, inside = any_store
    doc, other = document(10, 600), document(11, 600)
    key = st.put(None, cache_file(doc))
    other_key = st.put(None, cache_file(other))
    chunks = keys.chunk_keys(MODEL, "float32", doc)
    # an entry that names a file of other tokens: the file is read and does not match
    inside._write_entry(chunks[1], other_key, b"{not json")
    assert st.lookup_prefix(MODEL, "float32", doc).file_key == key
    # a name in the index that is no key (a temporary left by a crash, a stray file) is never read
    if isinstance(inside, store.DirStore):
        (inside.root / index.INDEX / chunks[0] / ".junk.kvcli-x.tmp").write_bytes(b"x")
        (inside.root / index.INDEX / chunks[0] / "README").write_bytes(b"x")
    assert st.lookup_prefix(MODEL, "float32", doc).file_key == key
    # an entry whose file is gone (deleted behind the store's back): skipped, the lookup falls back to nothing
    inside._remove(key)
    assert st.lookup_prefix(MODEL, "float32", doc) is None
    # a file damaged in place: its header no longer reads, so it is no hit
    data = cache_file(doc[:512])
    damaged = st.put(None, data)
    inside._write(damaged, format.BytesSource(data[:30]))
    assert st.lookup_prefix(MODEL, "float32", doc) is None
    # delete() removes the file's own entries with it; the foreign one planted above waits for a rebuild
    assert st.delete(other_key)
    assert [chunk for chunk, name in inside._entries() if name == other_key] == [chunks[1]]


def test_litter_where_the_index_keeps_folders_is_no_error(tmp_path):
    """A file or a symbolic link named like a chunk key in .index (a hand edit, a copy tool): lookups skip it, and the
    next write of an entry there replaces it rather than failing or writing through the link."""
    (tmp_path / "root").mkdir()
    st = store.DirStore(tmp_path / "root")
    doc = document(12, 300)
    chunk = keys.chunk_keys(MODEL, "float32", doc)[0]
    (tmp_path / "root" / index.INDEX).mkdir()
    (tmp_path / "root" / index.INDEX / chunk).write_bytes(b"a file, not a folder")
    assert st.lookup_prefix(MODEL, "float32", doc) is None
    key = st.put(None, cache_file(doc))
    assert st.lookup_prefix(MODEL, "float32", doc).file_key == key
    outside = tmp_path / "outside"
    outside.mkdir()
    st._remove_entry(chunk, key)
    (tmp_path / "root" / index.INDEX / chunk).symlink_to(outside)
    assert st.lookup_prefix(MODEL, "float32", doc) is None  # a link names no file the index wrote
    assert st.rebuild_index()["entries"] == 1
    assert list(outside.iterdir()) == [] and st.lookup_prefix(MODEL, "float32", doc).file_key == key
    # a folder where an entry belongs: the rebuild removes the one of no file and rewrites the file's own
    (tmp_path / "root" / index.INDEX / ("f" * 64) / ("e" * 64) / "x").mkdir(parents=True)
    st._remove_entry(chunk, key)
    (tmp_path / "root" / index.INDEX / chunk / key).mkdir(parents=True)
    assert st.rebuild_index() == {"store": st.url, "files": 1, "indexed": 1, "entries": 1, "removed": 1}
    assert sorted(st._entries()) == [(chunk, key)] and (tmp_path / "root" / index.INDEX / chunk / key).is_file()


def test_a_delete_racing_a_put_of_the_same_file_never_leaves_it_unfound(tmp_path):
    """Another writer's put of the same file lands right after delete() removed it: the file is stored again and
    must stay findable, so delete() may not remove entries after the file."""
    data = cache_file(document(13, 300))

    class Racing(store.DirStore):
        def _remove(self, key):
            removed = super()._remove(key)
            store.DirStore(self.root).put(None, data)  # the other writer, between this delete's steps
            return removed

    (tmp_path / "root").mkdir()
    st = Racing(tmp_path / "root")
    key = store.DirStore(tmp_path / "root").put(None, data)
    assert st.delete(key)
    assert st.exists(key) and st.lookup_prefix(MODEL, "float32", document(13, 300)).file_key == key


@pytest.mark.parametrize("parts", [False, True])
def test_an_upload_of_a_stored_file_mends_its_missing_entries(tmp_path, token_file, parts):
    """A server killed between a file and its entries answers the client's retry with 200 (the file stays): that
    retry, a PUT or an upload in parts, writes the entries the killed one did not."""
    import shutil

    (tmp_path / "root").mkdir()
    doc = document(15, 600)
    data = cache_file(doc)
    with CacheServer(tmp_path / "root", "--writable", "--token-file", token_file) as server:
        client = store.ServerStore(server.url, token=TOKEN)
        key = client.put(None, data)
        before = sorted(store.DirStore(tmp_path / "root")._entries())
        shutil.rmtree(tmp_path / "root" / index.INDEX)
        assert client.lookup_prefix(MODEL, "float32", doc) is None
        if parts:
            with format.BytesSource(data) as src:
                upload = store.header_digest(src, format.read_header(src))
            client.put_part(key, upload, 0, data)
            client.complete_upload(key, upload, len(data))
        else:
            client.put(None, data)
        assert sorted(store.DirStore(tmp_path / "root")._entries()) == before
        assert client.lookup_prefix(MODEL, "float32", doc).file_key == key
        client.close()


def test_a_server_answer_that_is_not_json_is_a_storage_error(tmp_path):
    """A proxy in front of a server that answers 200 with an HTML page: exit 8's error, not a JSON traceback."""
    with foreign_server({"POST": (200, "text/html", b"<html>signed out</html>")}) as url:
        client = store.ServerStore(url, timeout_s=5)
        with pytest.raises(StorageError, match="an unusable answer"):
            client.prefix_hits(MODEL, "float32", document(14, 300))
        client.close()


def test_an_entry_naming_another_models_file_of_the_same_tokens_is_no_hit(any_store):
    st, inside = any_store
    doc = document(18, 600)
    gen = torch.Generator().manual_seed(0)
    kv = KVCache(doc, [torch.randn(2, 600, 16, generator=gen) for _ in range(2)],
                 [torch.randn(2, 600, 16, generator=gen) for _ in range(2)])
    perturbed = dict(MODEL, weights_digest="d" * 64)  # the same architecture and tokenizer, other weights
    meta, parts = kvfile.encode(kv, perturbed, make_codec("raw"), chunk_tokens=64)
    foreign = st.put(None, encode_file(meta, parts))
    for chunk in keys.chunk_keys(MODEL, "float32", doc):  # planted under this model's chunks
        inside._write_entry(chunk, foreign, b"{}")
    assert st.lookup_prefix(MODEL, "float32", doc) is None
    assert st.lookup_prefix(perturbed, "float32", doc).file_key == foreign
    assert st.lookup_prefix(MODEL, "float16", doc) is None


def test_rebuild_from_the_files_alone_is_idempotent(any_store):
    st, inside = any_store  # over a server, the rebuild runs on the server's own store
    docs = [document(20 + i, n) for i, n in enumerate((300, 600, 800))]
    stored = [st.put(None, cache_file(d)) for d in docs]
    before = sorted(inside._entries())
    for chunk, key in before[:4]:
        inside._remove_entry(chunk, key)
    inside._write_entry("f" * 64, stored[0], b"stale")
    inside._remove(stored[2])
    summary = inside.rebuild_index()
    left_of_gone = sum(key == stored[2] for _, key in before[4:])
    assert summary == {"store": inside.url, "files": 2, "indexed": 2, "entries": 1 + 2, "removed": 1 + left_of_gone}
    kept = sorted(e for e in before if e[1] != stored[2])
    assert sorted(inside._entries()) == kept
    assert inside.rebuild_index()["removed"] == 0 and sorted(inside._entries()) == kept
    assert st.lookup_prefix(MODEL, "float32", docs[1] + [9]).tokens == 512
    assert st.lookup_prefix(MODEL, "float32", docs[2]) is None


def test_a_rebuild_keeps_the_entries_of_a_file_stored_while_it_runs(tmp_path):
    """On a live store a put lands after the rebuild listed the files: its entries are not in the rebuild's list,
    and must not be removed as stale (the file would be unfindable until the next rebuild)."""
    (tmp_path / "root").mkdir()
    doc = document(16, 600)

    class Live(store.DirStore):
        def _entries(self):
            store.DirStore(self.root).put(None, cache_file(doc))  # another writer, after the listing of files
            return super()._entries()

    st = Live(tmp_path / "root")
    st.put(None, cache_file(document(17, 300)))
    st._write_entry("f" * 64, "e" * 64, b"{}")  # litter, still removed
    assert st.rebuild_index()["removed"] == 1
    assert store.DirStore(tmp_path / "root").lookup_prefix(MODEL, "float32", doc).tokens == 512


def test_http_lookup_is_one_request_and_checks_its_input(tmp_path, token_file):
    (tmp_path / "root").mkdir()
    seen = []
    with CacheServer(tmp_path / "root", "--writable", "--token-file", token_file) as server:
        doc = document(30, 1100)
        store.DirStore(tmp_path / "root").put(None, cache_file(doc))
        hooks = httpx.HTTPTransport()
        counting = type("Counting", (httpx.BaseTransport,), {
            "handle_request": lambda self, request: seen.append(request.url.path) or hooks.handle_request(request)})()
        client = store.ServerStore(server.url, transport=counting)
        assert client.lookup_prefix(MODEL, "float32", doc + [5]).tokens == 1024
        assert seen == ["/v1/prefix"]
        client.close()
        for body in (b"[]", b"{\"chunk_keys\": [\"xyz\"]}", b"not json", b"[" * 200_000, json.dumps({"chunk_keys": ["0" * 64] * 20000}).encode()):
            r = httpx.post(f"{server.url}/v1/prefix", content=body)
            assert r.status_code in (400, 413) and "error" in r.json(), (body[:30], r.status_code)
        assert httpx.post(f"{server.url}/v1/prefix", json={"chunk_keys": []}).json() == {"hits": []}
        spec = httpx.get(f"{server.url}/openapi.json").json()
        lookup = spec["paths"]["/v1/prefix"]["post"]
        assert lookup["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PrefixLookup")
        assert "PrefixHits" in json.dumps(lookup["responses"]["200"])


def test_a_hit_is_read_in_ranges_of_only_what_its_prefix_needs(any_store):
    st, _ = any_store
    doc = document(40, 2000)  # 1 MB of raw float32: far past the first 64 KiB read
    data = cache_file(doc, chunk=256)
    key = st.put(None, data)
    hit = st.lookup_prefix(MODEL, "float32", doc[:700])
    reads = []
    plain = st.read
    st.read = lambda k, offset, length: reads.append((offset, length)) or plain(k, offset, length)
    with store.open_ranged(st, hit.file_key, hit.bytes) as src:
        header = format.read_header(src)
        kv = kvfile.PrefixReader(src, header, hit.tokens).cache()
    full = kvfile.decode(format.BytesSource(data), format.read_header(format.BytesSource(data)), threads=1)
    assert torch.equal(kv.keys[1], full.keys[1][:, :512]) and torch.equal(kv.values[0], full.values[0][:, :512])
    span_end = header.data_offset + max(s.offset + s.length for s in header.segments if s.token_start < 512)
    assert len(reads) <= 2 and max(o + n for o, n in reads) == span_end  # the head, then one span
    assert sum(n for _, n in reads) <= span_end + remote.HEAD_PREFETCH and span_end < len(data) // 3


def test_prefix_reader_on_the_triton_path_matches_the_torch_path(device, short_lanes):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(5)
    n = 40
    kv = KVCache(list(range(n)), [torch.randn(2, n, 8, generator=gen) * 3 for _ in range(2)],
                 [torch.randn(2, n, 8, generator=gen) for _ in range(2)])
    meta, parts = kvfile.encode(kv, MODEL, make_codec("balanced"), chunk_tokens=16)
    data = encode_file(meta, parts)
    header = format.read_header(format.BytesSource(data))
    torch_path = kvfile.PrefixReader(format.BytesSource(data), header, 20)
    triton_path = kvfile.PrefixReader(format.BytesSource(data), header, 20, backend="triton")
    for layer in range(2):
        for a, b in zip(torch_path.layer(layer), triton_path.layer(layer, device)):
            assert b.device.type == device.type and torch.equal(a, b.cpu())
