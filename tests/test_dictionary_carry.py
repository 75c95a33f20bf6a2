"""Dictionaries travel with the caches (issue 20, part 3): every store keeps them at dicts/SHA.kvd and takes a file
only after the dictionary it names; push, pull, the server and --cache-dir carry them; listings never see them.

The files here are containers that name a dictionary (servers.make_cache): what carries them checks containers, not
what they decode to."""

from __future__ import annotations

import json
import os
import time
import zlib

import httpx
import pytest
import torch
from servers import MODEL, CacheServer, make_cache

from kvcli.container import dictionary, format, keys, kvfile
from kvcli.errors import FormatError
from kvcli.storage import remote, store

pytestmark = pytest.mark.slow  # starts serve-cache and moto

TOKEN = "dict-token"
SHIPPED = dictionary.ShippedPlace.where


def made(seed: int) -> dictionary.Dictionary:
    return dictionary.parse(dictionary.build(bytes([seed]) * 4096, MODEL))


def naming(d: dictionary.Dictionary, seed: int, **kw) -> bytes:
    return make_cache(seed=seed, codec_params={"dictionary": d.sha}, **kw)


def seed_of(request) -> int:
    """One seed per test and store kind: the server's store is shared by the module's tests."""
    return zlib.crc32(request.node.name.encode()) % 100_000


def key_of(data: bytes) -> str:
    return keys.key_of_header(format.read_header(format.BytesSource(data)))


def refusal(sha: str, key: str, where: str) -> str:
    return (f"cache {key}: its dictionary {sha} is not in {where}: a store takes a file only after the dictionary it "
            f"names (kvcli push carries it; over HTTP, PUT /v1/dicts/{sha} first)")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def server_root(tmp_path_factory):
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def server(server_root, token_file):
    with CacheServer(server_root, "--writable", "--token-file", str(token_file)) as srv:
        yield srv


@pytest.fixture(params=["dir", "s3", "server"])
def any_store(request, tmp_path):
    """Opens a fresh store of each kind (again and again: a new object each call)."""
    name = request.node.name.replace("[", "-").rstrip("]")
    if request.param == "dir":
        return lambda: store.open_store(str(tmp_path / "root"), create=True)
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        return lambda: store.open_store(f"s3://caches/{name}")
    srv = request.getfixturevalue("server")
    return lambda: store.open_store(srv.url, token=TOKEN)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A user's cache directory that holds no dictionary: a reader on another machine."""
    path = tmp_path / "elsewhere-cache"
    path.mkdir()
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(path))
    return path


def test_every_store_takes_a_file_only_after_its_dictionary(any_store, request):
    st = any_store()
    d, other = made(1), made(2)
    data = naming(d, seed=seed_of(request))
    key = key_of(data)
    with pytest.raises(FormatError) as err:
        st.put(None, data)
    # (a server's client asks before it sends: the server's own refusal is tested below)
    assert err.value.exit_code == 4 and not st.exists(key)
    assert str(err.value) == refusal(d.sha, key, st.dicts_url)
    assert st.put_dictionary(d) is True and st.put_dictionary(d) is False  # idempotent
    again = any_store()  # nothing only in memory
    assert again.read_dictionary(d.sha) == d.data and again.has_dictionary(d.sha)
    assert again.read_dictionary(other.sha) is None and not again.has_dictionary(other.sha)
    assert again.put(None, data) == key
    # A reader of the stored file looks in the store's dicts/ first, whatever opened it.
    for opened in (again.open(key), store.open_ranged(again, key)):
        with opened as src:
            places = dictionary.places_for(src)
            assert places[0].where == again.dicts_url
            assert dictionary.find(d.sha, places, key).where == f"{again.dicts_url}/{d.sha}.kvd"
    # dicts/ is no cache: listings and the index see files alone (the server's store is shared by this module)
    listed = [e["key"] for e in again.list()]
    assert key in listed and all(store.KEY_PATTERN.fullmatch(k) and again.exists(k) for k in listed)
    if not isinstance(again, store.ServerStore):
        assert listed == [key] and again.rebuild_index()["files"] == 1
        assert again.read_dictionary(d.sha) == d.data


def test_an_upload_in_parts_waits_for_its_dictionary_with_its_parts_kept(any_store, request):
    st = any_store()
    d = made(3)
    data = naming(d, seed=seed_of(request))
    key = key_of(data)
    with format.BytesSource(data) as src:
        upload = store.header_digest(src, format.read_header(src))
    st.put_part(key, upload, 0, data)
    with pytest.raises(FormatError, match=f"its dictionary {d.sha} is not in"):
        st.complete_upload(key, upload, len(data))
    assert st.upload_state(key, upload)["parts"] == [[0, len(data)]]  # sending them again is not needed
    st.put_dictionary(d)
    assert st.complete_upload(key, upload, len(data)) == key and st.exists(key)


def test_the_server_checks_a_dictionary_against_its_name(server, server_root, token_file):
    d = made(4)
    url = f"{server.url}/v1/dicts/{d.sha}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(url).status_code == 404
    assert httpx.put(url, content=d.data).status_code == 401
    misnamed = httpx.put(f"{server.url}/v1/dicts/{made(5).sha}", content=d.data, headers=auth)
    assert misnamed.status_code == 422 and "damaged or misnamed" in misnamed.json()["error"]
    garbage = b"not a dictionary"
    bad = httpx.put(f"{server.url}/v1/dicts/{dictionary.sha_of(garbage)}", content=garbage, headers=auth)
    assert bad.status_code == 422 and "bad magic" in bad.json()["error"]
    assert httpx.put(f"{server.url}/v1/dicts/NOTHEX", content=d.data, headers=auth).status_code == 400
    cache = naming(d, seed=44)
    before = httpx.put(f"{server.url}/v1/caches/{key_of(cache)}", content=cache, headers=auth)
    assert before.status_code == 422
    assert before.json()["error"] == refusal(d.sha, key_of(cache), f"{server_root}/dicts")
    first = httpx.put(url, content=d.data, headers=auth)
    assert first.status_code == 201 and first.json() == {"sha256": d.sha, "url": url, "bytes": len(d.data)}
    assert httpx.put(url, content=d.data, headers=auth).status_code == 200
    got = httpx.get(url)
    assert got.status_code == 200 and got.content == d.data and got.headers["etag"] == f'"{d.sha}"'
    head = httpx.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(d.data)
    assert httpx.get(url, headers={"If-None-Match": f'"{d.sha}"'}).status_code == 304
    assert (server_root / d.name).read_bytes() == d.data
    assert httpx.put(f"{server.url}/v1/caches/{key_of(cache)}", content=cache, headers=auth).status_code == 201
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert set(paths["/v1/dicts/{sha}"]) == {"parameters", "get", "head", "put"}
    with CacheServer(server_root) as read_only:
        assert httpx.put(f"{read_only.url}/v1/dicts/{d.sha}", content=d.data, headers=auth).status_code == 405
        assert httpx.get(f"{read_only.url}/v1/dicts/{d.sha}").content == d.data


def write_by_hand(st, name: str, data: bytes, server_root) -> None:
    """Bytes put under a store's name past its checks (bit rot, a hand copy)."""
    if isinstance(st, store.DirStore):
        (st.root / "dicts").mkdir(exist_ok=True)
        (st.root / name).write_bytes(data)
    elif isinstance(st, store.FsspecStore):
        st.fs.pipe_file(f"{st.prefix}/{name}", data)
    else:
        (server_root / "dicts").mkdir(exist_ok=True)
        (server_root / name).write_bytes(data)


def test_a_damaged_stored_dictionary_takes_no_file_and_a_put_mends_it(any_store, request, server_root):
    st = any_store()
    d = made(100 + seed_of(request) % 100)  # one of its own: the server is shared
    damaged = d.data[:-1] + bytes([d.data[-1] ^ 1])  # the same size: only the bytes tell
    write_by_hand(st, d.name, damaged, server_root)
    data = naming(d, seed=seed_of(request))
    with pytest.raises(FormatError, match=f"{d.sha}.kvd: holds dictionary .* \\(damaged or misnamed\\)$") as err:
        st.put(None, data)
    assert err.value.exit_code == 4 and not st.exists(key_of(data))
    again = any_store()
    assert again.put_dictionary(d) is True and again.read_dictionary(d.sha) == d.data
    assert again.put(None, data) == key_of(data)


def test_a_store_takes_a_carried_dictionary_only_if_it_is_the_one_named(any_store, request):
    st = any_store()
    d, other = made(21), made(22)
    seed = seed_of(request)
    refused = {
        "another's": (naming(d, seed, aux={"dictionary": other.data}), f"holds dictionary {other.sha[:16]}…"),
        "unnamed": (make_cache(seed=seed + 1, aux={"dictionary": d.data}), "carries a dictionary its codec does not name"),
        "other model": (naming(foreign := dictionary.parse(dictionary.build(b"x" * 64, {**MODEL, "weights_digest": "e" * 64})),
                               seed + 2, aux={"dictionary": foreign.data}), "was made for model"),
    }
    for what, (data, message) in refused.items():
        with pytest.raises(FormatError, match=message):
            st.put(None, data)
        assert not st.exists(key_of(data)), what
    carrying = naming(d, seed + 3, aux={"dictionary": d.data})
    assert st.put(None, carrying) == key_of(carrying) and not st.has_dictionary(d.sha)


def test_the_server_reads_no_dictionary_that_is_not_a_regular_file(server, server_root):
    import os

    (server_root / "dicts").mkdir(exist_ok=True)
    fifo = server_root / "dicts" / f"{'ab' * 32}.kvd"
    os.mkfifo(fifo)
    try:
        for method in ("GET", "HEAD"):
            answer = httpx.request(method, f"{server.url}/v1/dicts/{'ab' * 32}", timeout=10)
            assert answer.status_code == 422, method
        assert "not a regular file" in httpx.get(f"{server.url}/v1/dicts/{'ab' * 32}", timeout=10).json()["error"]
    finally:
        with pytest.raises(OSError):  # no reader left blocked on it
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        fifo.unlink()


def test_a_dictionary_read_from_a_remote_store_is_bounded(s3_env, monkeypatch):
    from servers import foreign_server

    monkeypatch.setattr(dictionary, "MAX_FILE_BYTES", 1000)
    sha = "cd" * 32
    with foreign_server({"GET": (200, "application/octet-stream", b"z" * 5000)}) as url:
        with pytest.raises(FormatError, match="more than any dictionary's 1,000 bytes"):
            store.ServerStore(url).read_dictionary(sha)
    st = store.open_store("s3://caches/bounded")
    st.fs.pipe_file(f"{st.prefix}/dicts/{sha}.kvd", b"z" * 5000)
    with pytest.raises(FormatError, match="5,000 bytes, more than any dictionary"):
        st.read_dictionary(sha)


@pytest.fixture(params=["dir", "s3", "server"])
def target(request, tmp_path):
    """A store's location as the CLI takes it, the URL of a cache in it, and its dicts place."""
    name = request.node.name.replace("[", "-").rstrip("]").replace("_", "-")
    if request.param == "dir":
        root = tmp_path / "store"
        return str(root), lambda key: None, str(root / "dicts")
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        root = f"s3://caches/{name}"
        return root, lambda key: f"{root}/{key}.kvc", f"{root}/dicts"
    srv = request.getfixturevalue("server")
    return srv.url, lambda key: f"{srv.url}/v1/caches/{key}", f"{srv.url}/v1/dicts"


def test_push_carries_the_dictionary_first_and_pull_brings_it_beside_the_file(target, tmp_path, fresh_cache, cli,
                                                                            token_file, request):
    root, url_of, dicts = target
    d = made(6)
    data = naming(d, seed=seed_of(request))
    key = key_of(data)
    made_here = tmp_path / "made"
    (made_here / "dicts").mkdir(parents=True)
    (made_here / d.name).write_bytes(d.data)  # as a prefill -o writes it: beside the file
    (made_here / "doc.kvc").write_bytes(data)
    pushed = cli("push", made_here / "doc.kvc", root, "--token-file", token_file)
    assert pushed.exit_code == 0, pushed.stderr
    reopened = store.open_store(root, token=TOKEN)
    assert reopened.read_dictionary(d.sha) == d.data and reopened.exists(key)
    assert not (fresh_cache / "dicts").exists()  # taken from beside the file, not copied into the user's cache
    if url_of(key) is None:
        return  # pull takes URLs: a directory store is read in place
    out = tmp_path / "pulled" / "doc.kvc"
    out.parent.mkdir()
    pulled = cli("pull", url_of(key), "-o", out)
    assert pulled.exit_code == 0, pulled.stderr
    assert out.read_bytes() == data and (out.parent / d.name).read_bytes() == d.data


def test_a_reader_of_many_files_fetches_their_dictionary_once(server, tmp_path):
    st = store.open_store(server.url, token=TOKEN)
    d = made(14)
    st.put_dictionary(d)
    stored = [st.put(None, naming(d, seed=140 + i)) for i in range(3)]
    reader = store.open_store(server.url)
    asked = []
    reader.client.event_hooks["request"].append(lambda request: asked.append(request.url.path))
    for key in stored:
        with reader.open(key) as src:
            assert dictionary.find(d.sha, dictionary.places_for(src), key).data == d.data
    assert asked.count(f"/v1/dicts/{d.sha}") == 1


def test_push_of_a_stored_file_puts_its_missing_dictionary(target, tmp_path, fresh_cache, cli, token_file, request,
                                                           server_root):
    root, _, _ = target
    d = made(13 + seed_of(request) % 80)
    data = naming(d, seed=seed_of(request))
    st = store.open_store(root, token=TOKEN, create=True)
    if isinstance(st, store.DirStore):  # stored past the store's check (by hand, or by a kvcli before dictionaries)
        (st.root / f"{key_of(data)}.kvc").write_bytes(data)
    elif isinstance(st, store.FsspecStore):
        st.fs.pipe_file(st.path_of(key_of(data)), data)
    else:
        (server_root / f"{key_of(data)}.kvc").write_bytes(data)
    here = tmp_path / "here"
    dictionary.save(d, here)
    (here / "doc.kvc").write_bytes(data)
    pushed = cli("push", here / "doc.kvc", root, "--token-file", token_file, "--json")
    assert pushed.exit_code == 0, pushed.stderr
    assert json.loads(pushed.stdout)["uploaded"] is False  # the file was there
    assert store.open_store(root, token=TOKEN).read_dictionary(d.sha) == d.data


def test_push_without_the_dictionary_anywhere_is_one_line_and_sends_nothing(target, tmp_path, fresh_cache, cli,
                                                                          token_file, request):
    root, _, dicts = target
    d = made(7)
    alone = tmp_path / "alone"
    alone.mkdir()
    data = naming(d, seed=seed_of(request))
    (alone / "doc.kvc").write_bytes(data)
    result = cli("push", alone / "doc.kvc", root, "--token-file", token_file)
    assert result.exit_code == 4
    assert result.stderr == (f"Error: {alone}/doc.kvc: its dictionary {d.sha} is missing: looked in {alone}/dicts, "
                             f"{fresh_cache}/dicts, {SHIPPED}, {dicts}\n")
    reopened = store.open_store(root, token=TOKEN)
    assert not reopened.exists(key_of(data)) and not reopened.has_dictionary(d.sha)


def test_pull_of_a_file_whose_store_lacks_its_dictionary_names_every_place(server, server_root, tmp_path,
                                                                         fresh_cache, cli):
    d = made(8)
    data = naming(d, seed=88)
    key = key_of(data)
    (server_root / f"{key}.kvc").write_bytes(data)  # put there by hand, past the store's check
    out = tmp_path / "doc.kvc"
    try:
        result = cli("pull", f"{server.url}/v1/caches/{key}", "-o", out)
    finally:
        (server_root / f"{key}.kvc").unlink()
    assert result.exit_code == 4
    assert result.stderr == (f"Error: {server.url}/v1/caches/{key}: its dictionary {d.sha} is missing: looked in "
                             f"{server.url}/v1/dicts, {fresh_cache}/dicts, {SHIPPED}\n")
    assert not out.exists()


def copy_through(local: remote.LocalCache, url: str) -> None:
    with remote.open_source(url, local) as src:
        src.read(0, src.size)


def test_cache_dir_keeps_the_dictionaries_of_its_copies_and_evicts_only_unused_ones(server, tmp_path):
    st = store.open_store(server.url, token=TOKEN)
    d1, d2 = made(9), made(10)
    st.put_dictionary(d1)
    st.put_dictionary(d2)
    files = [naming(d1, seed=90), naming(d1, seed=91), naming(d2, seed=92)]
    keys_ = [st.put(None, data) for data in files]
    size = len(files[0])
    local = remote.LocalCache(tmp_path / "copies", max_bytes=2 * size + len(d1.data) + len(d2.data) + 100)
    for key in keys_[:2]:
        copy_through(local, f"{server.url}/v1/caches/{key}")
    assert (local.dir / d1.name).read_bytes() == d1.data
    with local.find(keys_[0]) as hit:
        assert dictionary.find(d1.sha, dictionary.places_for(hit), "x").where == f"{local.dir}/dicts/{d1.sha}.kvd"
    old = time.time() - 2 * remote.DICT_GRACE_S
    os.utime(local.dir / d1.name, (old, old))
    os.utime(local.dir / f"{keys_[0]}.kvc", (old, old))  # the least recently used copy
    copy_through(local, f"{server.url}/v1/caches/{keys_[2]}")
    # The oldest copy went; its dictionary stays, for the other copy that names it.
    assert sorted(p.name for p in local.dir.glob("*.kvc")) == sorted(f"{k}.kvc" for k in keys_[1:])
    assert (local.dir / d1.name).exists() and (local.dir / d2.name).exists()
    # Once no kept copy names it, it may go.
    os.utime(local.dir / f"{keys_[1]}.kvc", (old, old))
    local.max_bytes = size + len(d2.data) + 100
    local.evict(keep=keys_[2])
    assert [p.name for p in local.dir.glob("*.kvc")] == [f"{keys_[2]}.kvc"]
    assert not (local.dir / d1.name).exists() and (local.dir / d2.name).exists()
    # A copy whose dictionary vanished (another process's eviction) is a miss, fetched again with it.
    (local.dir / d2.name).unlink()
    assert local.find(keys_[2]) is None and not (local.dir / f"{keys_[2]}.kvc").exists()
    copy_through(local, f"{server.url}/v1/caches/{keys_[2]}")
    assert (local.dir / d2.name).read_bytes() == d2.data and local.find(keys_[2]) is not None


def test_cache_dir_mends_a_damaged_dictionary_of_a_kept_copy(server, tmp_path):
    st = store.open_store(server.url, token=TOKEN)
    d = made(12)
    st.put_dictionary(d)
    key = st.put(None, naming(d, seed=120))
    local = remote.LocalCache(tmp_path / "copies")
    copy_through(local, f"{server.url}/v1/caches/{key}")
    (local.dir / d.name).write_bytes(d.data[:-1] + bytes([d.data[-1] ^ 1]))  # bit rot
    # A miss, not a copy every later read refuses: both go, and the next fetch brings both back intact.
    assert local.find(key) is None and not (local.dir / d.name).exists()
    copy_through(local, f"{server.url}/v1/caches/{key}")
    assert (local.dir / d.name).read_bytes() == d.data and local.find(key) is not None


# ---------------------------------------------------------------- real files: kvq version 4 with a transform


@pytest.fixture(scope="module")
def transform_file(tiny_lm, tmp_path_factory):
    """A tiny model's cache coded by kvq version 4 with a per-head transform (orthonormal bases from random
    covariances), the dictionary holding it, and the codec: made in a writer's own cache directory, which no reader
    below sees. (path of the file with its dictionary beside it, dictionary, codec, the cache, the model)"""
    import numpy as np

    from kvcli.codecs.kvq import KvqCodec
    from kvcli.codecs.transform import Transforms
    from kvcli.modeling import inference
    from kvcli.reuse import pipeline

    lm = tiny_lm("llama")
    kv = inference.prefill(lm, list(range(3, 203)))
    rng = np.random.default_rng(5)
    bases = {}
    for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
        for kind, x in enumerate((k, v)):
            heads, dim = x.shape[0], x.shape[2]
            a = rng.standard_normal((heads, dim, dim))
            bases[(layer, kind)] = np.linalg.eigh(a @ a.transpose(0, 2, 1))[1][:, :, ::-1]  # by decreasing variance
    transforms = Transforms.from_bases(bases)
    d = dictionary.parse(dictionary.build(transforms.pack(), lm.identity))
    codec = KvqCodec(0.5, 4, version=4, transforms=transforms, dictionary=d.sha)
    written = tmp_path_factory.mktemp("writer") / "doc.kvc"
    old = os.environ.get("KVCLI_CACHE_DIR")
    os.environ["KVCLI_CACHE_DIR"] = str(written.parent / "writer-cache")
    try:
        dictionary.save_to_cache(d)
        pipeline.write_cache(str(written), kv, lm.identity, codec, 64)
    finally:
        os.environ["KVCLI_CACHE_DIR"] = old
    return written, d, codec, kv, lm


def decoded(src) -> list:
    with src:
        header = format.read_header(src)
        kv = kvfile.decode(src, header)
    return [t.clone() for t in kv.keys + kv.values]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_decoders_read_a_checked_dictionary_once_and_verify_reads_it_every_time(transform_file, fresh_cache, tmp_path,
                                                                              monkeypatch):
    written, d, _, _, _ = transform_file
    copy = tmp_path / "doc.kvc"
    copy.write_bytes(written.read_bytes())
    (tmp_path / "dicts").mkdir()
    (tmp_path / d.name).write_bytes(d.data)
    monkeypatch.setattr(dictionary.time, "time_ns", lambda: 1 << 62)  # long after the writes: not racy
    reads = []
    real = dictionary.read_file
    monkeypatch.setattr(dictionary, "read_file", lambda p: reads.append(str(p)) or real(p))
    from kvcli.codecs import kvq

    prepared = []
    real_prepare = kvq.transform_ops.prepare
    monkeypatch.setattr(kvq.transform_ops, "prepare", lambda m: prepared.append(1) or real_prepare(m))
    beside = str(tmp_path / d.name)
    first = decoded(format.FileSource(copy))
    once = len(prepared)
    assert same(first, decoded(format.FileSource(copy)))
    assert reads.count(beside) == 1
    assert len(prepared) == once  # the second file's decoder takes the matrices the first one prepared
    with format.FileSource(copy) as src:
        assert kvfile.verify(src, format.read_header(src))["dictionary"]["sha256"] == d.sha
    assert reads.count(beside) == 2


def test_a_transform_file_decodes_from_every_store_on_a_machine_without_its_dictionary(target, transform_file,
                                                                                     fresh_cache, cli, token_file,
                                                                                     tmp_path, request):
    root, url_of, dicts = target
    written, d, _, _, _ = transform_file
    assert (written.parent / d.name).read_bytes() == d.data  # the writer put it beside the file
    want = decoded(format.FileSource(written))
    pushed = cli("push", written, root, "--token-file", token_file, "--json")
    assert pushed.exit_code == 0, pushed.stderr
    key = json.loads(pushed.stdout)["key"]
    st = store.open_store(root, token=TOKEN)
    assert same(decoded(st.open(key)), want) and same(decoded(store.open_ranged(st, key)), want)
    assert not (fresh_cache / "dicts").exists()  # found in the store, not copied into the reader's cache
    if url_of(key) is not None:
        out = tmp_path / "pulled" / "doc.kvc"
        out.parent.mkdir()
        assert cli("pull", url_of(key), "-o", out).exit_code == 0
        verified = cli("verify", out)
        assert verified.exit_code == 0, verified.stderr
        assert f"dictionary {d.sha[:16]}… from {out.parent}/dicts/{d.sha}.kvd" in verified.stdout
        local = remote.LocalCache(tmp_path / "copies")
        assert same(decoded(remote.open_source(url_of(key), local)), want)
        assert (local.dir / d.name).read_bytes() == d.data
        assert same(decoded(remote.open_source(url_of(key), local)), want)  # now from the copy
    # A store whose dictionary went missing (removed by hand): the reader names it and every place looked in.
    if isinstance(st, store.DirStore):
        (st.root / d.name).unlink()
    elif isinstance(st, store.FsspecStore):
        st.fs.rm_file(f"{st.prefix}/{d.name}")
    else:
        (request.getfixturevalue("server_root") / d.name).unlink()
    with pytest.raises(dictionary.DictionaryMissing) as err:
        decoded(store.open_store(root, token=TOKEN).open(key))
    assert str(err.value) == (f"{st.url_for(key) if not isinstance(st, store.DirStore) else st.path_of(key)}: its "
                              f"dictionary {d.sha} is missing: looked in {dicts}, {fresh_cache}/dicts, {SHIPPED}")
    if isinstance(st, store.DirStore):
        refused = cli("verify", st.path_of(key))
        assert refused.exit_code == 4 and refused.stderr == f"Error: {err.value}\n"


def test_vllm_saves_put_the_dictionary_before_the_first_file(transform_file, tmp_path, fresh_cache, monkeypatch):
    from kvcli.integrations.vllm.saving import Saver, SaveJob
    from kvcli.integrations.vllm.stats import Stats

    written, d, codec, kv, lm = transform_file
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(written.parent / "writer-cache"))  # the engine's machine
    st = store.DirStore(tmp_path / "saved", create=True)
    stats = Stats()
    saver = Saver(st, {"balanced": codec}, lm.identity, "float32", stats, 1)
    try:
        stored = saver.save(SaveJob(kv.token_ids, kv.keys, kv.values))
    finally:
        saver.close()
    assert st.read_dictionary(d.sha) == d.data and stats.snapshot()["saved_files_balanced"] == 1
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(fresh_cache))  # a loading engine elsewhere
    got = decoded(store.open_ranged(st, stored["balanced"]))
    assert [t.shape for t in got] == [t.shape for t in kv.keys + kv.values]


def test_a_self_contained_file_needs_no_dictionary_in_the_store(transform_file, tmp_path, fresh_cache, cli,
                                                                monkeypatch):
    from kvcli.reuse import pipeline

    written, d, codec, kv, lm = transform_file
    alone = tmp_path / "alone.kvc"
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(written.parent / "writer-cache"))
    pipeline.write_cache(str(alone), kv, lm.identity, codec, 64, self_contained=True)
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(fresh_cache))
    assert not (tmp_path / "dicts").exists()
    pushed = cli("push", alone, tmp_path / "store", "--json")
    assert pushed.exit_code == 0, pushed.stderr
    st = store.open_store(str(tmp_path / "store"))
    assert not st.has_dictionary(d.sha)
    assert same(decoded(st.open(json.loads(pushed.stdout)["key"])), decoded(format.FileSource(written)))


def test_ingest_puts_the_dictionary_in_the_store_before_its_first_file(target, transform_file, fresh_cache,
                                                                     monkeypatch, request):
    """prefill --out-dir's (and the Ray path's) engine, over each store kind. Presets do not code with a transform
    yet (no profile names a dictionary for the tiny model), so the level's options give the test's transform codec."""
    from dataclasses import dataclass

    from kvcli.reuse import ingest, pipeline

    root, _, _ = target
    written, d, codec, _, lm = transform_file

    @dataclass(frozen=True)
    class TransformOptions(pipeline.EncodeOptions):
        def codec(self, lm):
            return codec

    monkeypatch.setenv("KVCLI_CACHE_DIR", str(written.parent / "writer-cache"))  # the ingesting machine
    st = store.open_store(root, token=TOKEN, create=True)
    text = f"Dictionaries travel first ({request.node.name}). " * 3
    engine = ingest.Ingest(lm, st, ingest.Settings(TransformOptions("balanced", chunk_tokens=64)))
    assert st.read_dictionary(d.sha) == d.data  # before any document is read
    lines = list(engine.run([ingest.record_source({"id": "a", "text": text}, "row 0")]))
    assert [line["status"] for line in lines] == ["written"], [line["error"] for line in lines]
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(fresh_cache))  # a reader elsewhere
    got = decoded(store.open_store(root, token=TOKEN).open(lines[0]["key"]))
    assert got[0].shape[1] == lines[0]["tokens"]
