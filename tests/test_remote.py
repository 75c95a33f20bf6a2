"""Reading caches over the network: read-ahead in file order, damaged responses detected and fetched again,
local LRU copies, S3 URLs, and `generate --cache URL` end to end on a tiny model."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import CacheServer, make_cache, moto_server

from kvcli.container import format, keys
from kvcli.errors import FormatError, InputError, StorageError, UsageError
from kvcli.storage import remote, store

pytestmark = pytest.mark.slow  # starts servers, moto or Ray: outside the fast `-m 'not slow'` loop

TOKEN = "remote-token"


class Tampering(httpx.BaseTransport):
    """A real HTTP transport whose range responses pass through `damage(index, content)` first; it also records
    the requested ranges and the most requests ever in flight at once."""

    def __init__(self, damage=None, delay_s: float = 0.0):
        self.inner = httpx.HTTPTransport()
        self.damage = damage or (lambda i, content: content)
        self.delay_s = delay_s
        self.ranges: list[str] = []
        self.lock = threading.Lock()
        self.active = self.peak = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            index = len(self.ranges)
            self.ranges.append(request.headers.get("range", ""))
        try:
            time.sleep(self.delay_s)
            response = self.inner.handle_request(request)
            content = response.read()
            if not request.headers.get("range") or response.status_code != 206:
                return httpx.Response(response.status_code, headers=response.headers, content=content)
            damaged = self.damage(index, content)
            headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
            return httpx.Response(response.status_code, headers=headers, content=damaged)
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-store")
    token = root.parent / "remote-token"
    token.write_text(TOKEN)
    with CacheServer(root, "--writable", "--token-file", str(token)) as srv:
        yield srv


@pytest.fixture(scope="module")
def cached(server) -> tuple[str, bytes]:
    data = make_cache(seed=21, tokens=512, dim=128, chunk=32)  # 128 segments of 8 KiB
    key = store.open_store(server.url, token=TOKEN).put(None, data)
    return f"{server.url}/v1/caches/{key}", data


def read_all(src) -> bytes:
    """Header, then every segment in file order through format.read_segment, as kvfile.decode reads them."""
    header = format.read_header(src)
    body = [format.read_segment(src, header, seg) for seg in header.segments]
    return src.read(0, header.data_offset) + b"".join(body)


def open_remote(url: str, transport, **kwargs) -> remote.RemoteSource:
    return remote.RemoteSource(remote.HttpFetcher(url, transport=transport), block_bytes=64 << 10, **kwargs)


def test_fetches_ahead_in_file_order_with_bounded_concurrency(cached):
    url, data = cached
    transport = Tampering(delay_s=0.05)
    with remote.RemoteSource(remote.HttpFetcher(url, transport=transport), workers=3, block_bytes=16 << 10) as src:
        opened = time.perf_counter()
        header = src.header
        assert format.read_segment(src, header, header.segments[0])
        first_s = time.perf_counter() - opened
        assert read_all(src) == data
        total_s = time.perf_counter() - opened
    starts = [int(r.split("=")[1].split("-")[0]) for r in transport.ranges if r][1:]  # after the header's
    assert len(starts) >= 30
    # Requested in file order, give or take the workers racing each other to their next block.
    assert all(abs(i - sorted(starts).index(s)) < 3 for i, s in enumerate(starts))
    assert transport.peak <= 3
    assert first_s < total_s / 4  # the first segment is there long before the last one


@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
def test_damaged_responses_are_detected_and_fetched_again(cached, how):
    url, data = cached
    hit = set()

    def damage(index: int, content: bytes) -> bytes:
        if index % 3 != 2 or index in hit:  # every third response is damaged, once
            return content
        hit.add(index)
        if how == "flip":
            return content[:100] + bytes([content[100] ^ 0xFF]) + content[101:]
        return content[: len(content) // 2] if how == "truncate" else b""

    with open_remote(url, Tampering(damage)) as src:
        assert read_all(src) == data
        assert src.refetches >= 2


def test_the_header_is_fetched_again_when_damaged(cached):
    url, data = cached
    damaged = Tampering(lambda i, c: c[:30] + b"X" + c[31:] if i == 0 else c)
    with open_remote(url, damaged) as src:
        assert read_all(src) == data


def test_damage_that_persists_is_a_format_error_naming_the_segment(cached, tmp_path):
    url, data = cached
    header = format.read_header(format.BytesSource(data))
    seg = header.segments[5]
    at = header.data_offset + seg.offset + 3

    def damage(index: int, content: bytes) -> bytes:
        return content  # replaced below by a response that always lies

    class Liar(Tampering):
        def handle_request(self, request):
            response = super().handle_request(request)
            if "range" not in request.headers:
                return response
            first = int(request.headers["range"].split("=")[1].split("-")[0])
            body = bytearray(response.content)
            if first <= at < first + len(body):
                body[at - first] ^= 1
            headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
            return httpx.Response(response.status_code, headers=headers, content=bytes(body))

    src = remote.RemoteSource(remote.HttpFetcher(url, transport=Liar(damage)), block_bytes=64 << 10, backoff_s=0.01,
                              on_complete=lambda buf: pytest.fail("a corrupt file must not be kept"))
    with src:
        with pytest.raises(FormatError, match=r"layer \d+ [KV] tokens .* checksum mismatch"):
            read_all(src)


def test_server_errors_are_retried_then_reported(cached):
    url, data = cached

    class Flaky(httpx.BaseTransport):
        def __init__(self, failures: int):
            self.inner, self.failures = httpx.HTTPTransport(), failures

        def handle_request(self, request):
            if self.failures > 0:
                self.failures -= 1
                raise httpx.ConnectError("connection refused (test)")
            return self.inner.handle_request(request)

    with open_remote(url, Flaky(2), backoff_s=0.01) as src:
        assert read_all(src) == data
    with pytest.raises(StorageError, match="after 3 attempts"):
        open_remote(url, Flaky(100), retries=2, backoff_s=0.01)
    with pytest.raises(InputError, match="no such cache"):
        remote.open_source(url[:-64] + "0" * 64)


def test_cache_dir_keeps_verified_copies_and_evicts_the_least_recently_used(server, tmp_path):
    client = store.open_store(server.url, token=TOKEN)
    blobs = [make_cache(seed=30 + i, tokens=64) for i in range(4)]
    urls = [client.url_for(client.put(None, b)) for b in blobs]
    cache_dir = tmp_path / "local"
    size = len(blobs[0])
    os.environ[remote.CACHE_DIR_BYTES_ENV] = str(int(size * 2.5))  # room for two copies
    try:
        for url, blob in zip(urls[:2], blobs):
            with remote.open_source(url, str(cache_dir)) as src:
                assert isinstance(src, remote.RemoteSource) and read_all(src) == blob
        time.sleep(0.05)
        with remote.open_source(urls[0], str(cache_dir)) as src:  # a hit: no network, and now the most recent
            assert isinstance(src, format.FileSource) and read_all(src) == blobs[0]
        time.sleep(0.05)
        with remote.open_source(urls[2], str(cache_dir)) as src:
            read_all(src)
        kept = sorted(p.name for p in cache_dir.glob("*.kvc"))
        assert kept == sorted(u.rsplit("/", 1)[1] + ".kvc" for u in (urls[0], urls[2]))
        with remote.open_source(urls[3], str(cache_dir)) as src:  # an abandoned read leaves no copy
            format.read_header(src)
    finally:
        del os.environ[remote.CACHE_DIR_BYTES_ENV]
    assert len(list(cache_dir.glob("*.kvc"))) == 2
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]


def test_eviction_takes_only_copies_kvcli_made(server, tmp_path):
    """--cache-dir pointed at a directory that holds a user's own .kvc files: eviction removed every *.kvc, the
    user's 63 MB mine.kvc included (seen with `generate --cache-dir . --cache-dir-bytes 100000`)."""
    client = store.open_store(server.url, token=TOKEN)
    blob = make_cache(seed=38, tokens=64)
    url = client.url_for(client.put(None, blob))
    cache_dir = tmp_path / "work"
    cache_dir.mkdir()
    mine = cache_dir / "mine.kvc"
    mine.write_bytes(make_cache(seed=39, tokens=200))
    os.utime(mine, (1, 1))  # the oldest file there
    with remote.open_source(url, remote.LocalCache(cache_dir, max_bytes=len(blob))) as src:
        assert read_all(src) == blob
    assert mine.exists() and (cache_dir / f"{url.rsplit('/', 1)[1]}.kvc").read_bytes() == blob


def test_s3_urls_stream_through_fsspec(tmp_path):
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    with moto_server() as env:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            boto3.client("s3").create_bucket(Bucket="stream")
            data = make_cache(seed=40, tokens=256, dim=64)
            key = store.open_store("s3://stream/p").put(None, data)
            with remote.open_source(f"s3://stream/p/{key}.kvc", str(tmp_path / "c")) as src:
                assert read_all(src) == data
            assert (tmp_path / "c" / f"{key}.kvc").read_bytes() == data
            with pytest.raises(InputError):
                remote.open_source(f"s3://stream/p/{'0' * 64}.kvc")
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_generate_from_a_url_matches_generate_from_the_file(cli, tiny_model_dir, doc_file, server, tmp_path):
    model = str(tiny_model_dir("llama"))
    kvc = tmp_path / "doc.kvc"
    assert cli("prefill", doc_file, "-o", kvc, "--model", model, "--chunk-tokens", "8", "-q", "lossless").exit_code == 0
    key = store.open_store(server.url, token=TOKEN).put(None, kvc)
    local = cli("generate", "--cache", kvc, "--model", model, "-n", "8", "Question:")
    assert local.exit_code == 0, local.stderr
    url = f"{server.url}/v1/caches/{key}"
    streamed = cli("generate", "--cache", url, "--cache-dir", tmp_path / "copies", "--model", model, "-n", "8",
                   "Question:")
    assert streamed.exit_code == 0, streamed.stderr
    assert streamed.stdout == local.stdout
    assert (tmp_path / "copies" / f"{key}.kvc").read_bytes() == kvc.read_bytes()
    missing = cli("generate", "--cache", f"{server.url}/v1/caches/{'0' * 64}", "--model", model, "x")
    assert missing.exit_code == 3 and "no such cache" in missing.stderr
    bad = cli("generate", "--cache", f"{server.url}/v1/caches/nothex", "--model", model, "x")
    assert bad.exit_code == 2 and "not a cache key" in bad.stderr


def test_cache_dir_bytes_bounds_the_local_copies(cli, tiny_model_dir, doc_file, server, tmp_path, monkeypatch):
    model = str(tiny_model_dir("llama"))
    kvc = tmp_path / "doc.kvc"
    assert cli("prefill", doc_file, "-o", kvc, "--model", model, "--chunk-tokens", "8", "-q", "lossless").exit_code == 0
    url = store.open_store(server.url, token=TOKEN).url_for(store.open_store(server.url, token=TOKEN).put(None, kvc))
    size = kvc.stat().st_size
    monkeypatch.setenv(remote.CACHE_DIR_BYTES_ENV, "1")  # the option, when given, is the bound, not the environment
    for bound, kept in ((size, True), (size - 1, False)):
        copies = tmp_path / f"copies-{bound}"
        result = cli("generate", "--cache", url, "--cache-dir", copies, "--cache-dir-bytes", bound, "--model", model,
                     "-n", "2", "Question:")
        assert result.exit_code == 0, result.stderr
        assert [p.name for p in copies.iterdir()] == ([url.rsplit("/", 1)[1] + ".kvc"] if kept else [])
    from_env = tmp_path / "copies-env"
    assert cli("generate", "--cache", url, "--cache-dir", from_env, "--model", model, "-n", "2", "Q").exit_code == 0
    assert list(from_env.iterdir()) == []  # $KVCLI_CACHE_DIR_BYTES=1 is the bound without the option
    monkeypatch.setenv(remote.CACHE_DIR_BYTES_ENV, "lots")
    refused = cli("generate", "--cache", url, "--cache-dir", from_env, "--model", model, "Q")
    assert refused.exit_code == 2 and "KVCLI_CACHE_DIR_BYTES" in refused.stderr
    alone = cli("generate", "--cache", url, "--cache-dir-bytes", "10", "--model", model, "Q")
    assert alone.exit_code == 2 and "--cache-dir" in alone.stderr


def mislabel(server, right: bytes, wrong: bytes) -> str:
    """Put `wrong`'s bytes in the server's store under the key of `right` (a store that swapped two objects) and
    return that key's URL."""
    key = keys.key_of_header(format.read_header(format.BytesSource(right)))
    (Path(server.args[0]) / f"{key}.kvc").write_bytes(wrong)
    return f"{server.url}/v1/caches/{key}"


def test_a_url_serving_another_caches_bytes_is_refused_and_nothing_is_kept(server, tmp_path):
    url = mislabel(server, make_cache(seed=50), make_cache(seed=51))
    copies = tmp_path / "copies"
    with pytest.raises(FormatError, match="does not match the file's content"):
        remote.open_source(url, str(copies))
    assert list(copies.iterdir()) == []


def test_a_local_copy_that_is_not_sound_is_dropped_and_fetched_again(server, tmp_path):
    client = store.open_store(server.url, token=TOKEN)
    data = make_cache(seed=52)
    url = client.url_for(client.put(None, data))
    copies = tmp_path / "copies"
    copies.mkdir()
    poisoned = copies / f"{url.rsplit('/', 1)[1]}.kvc"
    flipped = bytearray(data)
    flipped[-3] ^= 0x40
    for bad in (make_cache(seed=53), data[:100], bytes(flipped)):  # another cache's bytes, truncated, a bit flipped
        poisoned.write_bytes(bad)
        with remote.open_source(url, str(copies)) as src:
            assert isinstance(src, remote.RemoteSource) and read_all(src) == data
        assert poisoned.read_bytes() == data


def test_pull_and_generate_refuse_a_cache_whose_content_key_is_not_the_urls(cli, server, llama, tmp_path):
    url = mislabel(server, make_cache(seed=54), make_cache(seed=55))
    out = tmp_path / "pulled" / "x.kvc"
    out.parent.mkdir()
    pulled = cli("pull", url, "-o", out)
    assert pulled.exit_code == 4 and "does not match the file's content" in pulled.stderr
    assert list(out.parent.iterdir()) == []  # neither the file nor a partial to resume
    copies = tmp_path / "copies"
    answered = cli("generate", "--cache", url, "--cache-dir", copies, "--model", llama, "-n", "2", "Question:")
    assert answered.exit_code == 4 and "does not match the file's content" in answered.stderr
    assert answered.stdout == "" and list(copies.iterdir()) == []


def test_a_cache_dir_that_cannot_be_written(cli, server, llama, tmp_path):
    client = store.open_store(server.url, token=TOKEN)
    url = client.url_for(client.put(None, make_cache(seed=56)))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user whom permissions do not stop")
        refused = cli("generate", "--cache", url, "--cache-dir", locked, "--model", "/nonexistent/model", "Q")
        assert refused.exit_code == 8 and "not writable" in refused.stderr  # before the model load (exit 7)
    finally:
        locked.chmod(0o700)


def test_prefill_into_a_server_checks_the_token_before_the_model_loads(cli, server, doc_file, tmp_path, monkeypatch):
    monkeypatch.delenv(remote.TOKEN_ENV, raising=False)
    monkeypatch.delenv(remote.TOKEN_FILE_ENV, raising=False)
    args = ("prefill", doc_file, "--out-dir", server.url, "--model", tmp_path / "no-model")
    refused = cli(*args)
    assert refused.exit_code == 8 and "a token is required" in refused.stderr and refused.stdout == ""
    monkeypatch.setenv(remote.TOKEN_ENV, TOKEN)
    allowed = cli(*args)
    assert allowed.exit_code == 7, allowed.stderr  # the store took the check; the missing model comes next


def test_a_local_copy_that_does_not_fit_on_the_disk_is_skipped_with_one_line(server, kvc, llama, tmp_path):
    """`ulimit -f` below the cache's size stands in for a full disk: the answer comes, the copy does not."""
    import resource
    import subprocess

    from servers import KVCLI, REPO

    client = store.open_store(server.url, token=TOKEN)
    url = client.url_for(client.put(None, kvc))
    limit = kvc.stat().st_size // 2
    copies = tmp_path / "copies"
    done = subprocess.run(KVCLI + ["generate", "--cache", url, "--cache-dir", str(copies), "--model", llama, "-n", "2",
                                   "Question:"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 0 and done.stdout, done.stderr
    assert done.stderr.startswith("kvcli: no local copy kept: ")
    assert done.stderr.endswith("write failed: the file size limit was reached (ulimit -f)\n")
    assert done.stderr.count("\n") == 1 and list(copies.iterdir()) == []  # no temporary left either


def test_push_with_a_wrong_token_is_refused_even_when_the_cache_is_stored(cli, server, tmp_path, monkeypatch):
    monkeypatch.delenv(remote.TOKEN_ENV, raising=False)
    monkeypatch.delenv(remote.TOKEN_FILE_ENV, raising=False)
    path = tmp_path / "c.kvc"
    path.write_bytes(make_cache(seed=57))
    store.open_store(server.url, token=TOKEN).put(None, path)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    refused = cli("push", path, server.url, "--token-file", wrong)
    assert refused.exit_code == 8 and "the token was refused" in refused.stderr and refused.stdout == ""
    assert refused.stderr.startswith(f"Error: {server.url}: cannot write: ")  # the server, not the probe's URL
    anonymous = cli("push", path, server.url, "--json")  # no token: no more told that it is there
    assert anonymous.exit_code == 8 and "a token is required" in anonymous.stderr and anonymous.stdout == ""


def test_malformed_urls_are_usage_errors_before_any_request(cli, server, kvc, tmp_path):
    """A newline or tab in a URL (urlsplit drops it, httpx refuses it), a broken IPv6 host, a port out of range
    and an http URL without a host: exit 10 ("a bug in kvcli") or a connection failure after 4 attempts before."""
    key = "0" * 64
    for url in (f"{server.url}/v1/caches/{key}\n", f"{server.url}/v1/caches/{key}\t", f"http://[::1/v1/caches/{key}",
                f"http://127.0.0.1:99999/v1/caches/{key}", f"http:///v1/caches/{key}"):
        for args in (("pull", url, "-o", tmp_path / "out.kvc"), ("push", kvc, url.replace(f"/v1/caches/{key}", "")),
                     ("generate", "--cache", url, "--model", "/nonexistent/model", "Q")):
            result = cli(*args)
            assert result.exit_code == 2, (args, result.stderr)
            assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, (args, result.stderr)
    assert not (tmp_path / "out.kvc").exists()


def test_pull_refuses_a_fifo_or_device_as_its_output(cli, server, tmp_path):
    """pull renames its verified partial file over -o: over a FIFO (or, as root, /dev/null) that replaced the node."""
    import stat

    url = store.open_store(server.url, token=TOKEN).url_for(store.open_store(server.url, token=TOKEN)
                                                            .put(None, make_cache(seed=57)))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused = cli("pull", url, "-o", fifo)
    assert refused.exit_code == 2 and refused.stderr.startswith("Error: pull needs a file name")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]
    with pytest.raises(UsageError):  # the same guard in every atomic write
        format.atomic_write(str(fifo), [b"x"])
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_pull_from_a_server_that_is_down_names_the_url(cli, tmp_path):
    """The fetcher's retries ended in 'Error: ConnectError: [Errno 111] Connection refused (after 4 attempts)'."""
    from servers import free_port

    url = f"http://127.0.0.1:{free_port()}/v1/caches/{'7' * 64}"  # nothing listens there
    failed = cli("pull", url, "-o", tmp_path / "out.kvc")
    assert failed.exit_code == 8 and failed.stderr.startswith(f"Error: {url}: "), failed.stderr
    assert failed.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []
