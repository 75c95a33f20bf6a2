"""Reading a .kvc file over the network as a format.ByteSource: HTTP(S) range requests or any fsspec URL (s3://...).

The header is fetched first; then every segment is fetched in file order, in blocks of whole segments, by a few
threads, while the reader (kvfile.decode) consumes earlier blocks, so download and decode overlap. Each block is
checked against the segment CRCs of the header as it arrives: a corrupted or truncated response is fetched again,
with backoff, instead of failing the decode. Only damage that survives every retry (a corrupt stored file) reaches
the reader, which names the bad segment.
"""

from __future__ import annotations

import bisect
import collections
import functools
import importlib
import os
import re
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from ..container import dictionary, format
from ..container.keys import KEY_PATTERN, check_key, checked_key
from ..errors import FormatError, InputError, StorageError, UsageError
from ..stdio import write_stderr_text

HEAD_PREFETCH = 64 << 10  # one request usually holds the preamble and the whole header
BLOCK_BYTES = 1 << 20
WORKERS = 4
S3_CONNECTIONS = 32  # concurrent requests to one S3 endpoint (a prefix lookup sends one per chunk of a prompt)
RETRIES = 4
BACKOFF_S = 0.1
DEFAULT_CACHE_DIR_BYTES = 4 << 30
CACHE_DIR_BYTES_ENV = "KVCLI_CACHE_DIR_BYTES"
DICT_GRACE_S = 60.0  # a cache directory's dictionary this fresh may be about to get its copy: never evicted
TOKEN_ENV = "KVCLI_TOKEN"
TOKEN_FILE_ENV = "KVCLI_TOKEN_FILE"
_URL_KEY = re.compile(r"([0-9a-f]{64})(?:\.kvc)?\Z")


class Transient(Exception):
    """A failure worth retrying: a dropped connection, a 5xx, a short or corrupt body."""


class ConnectionFailed(StorageError):
    """The network failed (refused, reset, timed out): the operation may succeed if tried again."""


# ---------------------------------------------------------------- object-store failures as kvcli errors


@functools.cache
def store_exceptions() -> tuple[type[BaseException], ...]:
    """What an object store's client stack raises when the store, not kvcli, failed: OSError (s3fs turns S3's error
    codes into OSError subclasses), botocore's errors (credentials, endpoints, retries given up), aiohttp's and
    fsspec's timeouts. Imported only where installed: s3fs is an optional extra."""
    found: list[type[BaseException]] = [OSError]
    for module, names in (("botocore.exceptions", ("BotoCoreError", "ClientError")), ("aiohttp", ("ClientError",)),
                          ("fsspec.exceptions", ("FSTimeoutError",))):
        try:
            loaded = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(loaded, name) for name in names if hasattr(loaded, name)]
    return tuple(found)


def storage_error(err: BaseException, where: str) -> StorageError:
    """The one mapping from an object store's failure to the line a user sees: ConnectionFailed (worth another
    try) for a network failure, else a StorageError. A missing object is the caller's business, not this one's."""
    kind = type(err).__name__
    text = " ".join(str(err).split()) or kind
    if kind in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return StorageError(f"{where}: no usable S3 credentials ({text}); set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(err, PermissionError):
        return StorageError(f"{where}: access denied ({text}); check the credentials and the bucket's policy")
    network = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
               "ProxyConnectionError", "ConnectionError", "HTTPClientError", "FSTimeoutError")
    if kind in network or isinstance(err, (TimeoutError, ConnectionError)) or type(err).__module__.startswith("aiohttp"):
        return ConnectionFailed(f"{where}: {text}")
    return StorageError(f"{where}: {text}")


# ---------------------------------------------------------------- fetchers: one range at a time


class HttpFetcher:
    """Range GETs against a kvcli server (or any HTTP server that honours Range)."""

    def __init__(self, url: str, token: str | None = None, transport=None, timeout_s: float = 30.0):
        import httpx

        self.name = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(transport=transport, headers=headers, follow_redirects=False,
                                   timeout=httpx.Timeout(timeout_s, connect=10.0))

    def size(self) -> int:
        response = self._request("HEAD", {})
        try:
            return int(response.headers["content-length"])
        except (KeyError, ValueError):
            raise StorageError(f"{self.name}: the server sent no Content-Length") from None

    def fetch(self, offset: int, length: int) -> bytes:
        response = self._request("GET", {"Range": f"bytes={offset}-{offset + length - 1}"})
        if response.status_code != 206:
            raise StorageError(f"{self.name}: expected 206 Partial Content, got {response.status_code}")
        return response.content

    def _request(self, method: str, headers: dict):
        import httpx

        try:
            response = self.client.request(method, self.name, headers=headers)
        except httpx.TransportError as err:
            raise Transient(f"{type(err).__name__}: {err}") from None
        check_status(response, self.name)
        return response

    def close(self) -> None:
        self.client.close()


def check_status(response, where: str) -> None:
    """HTTP statuses as kvcli errors: 404 is a missing input, 5xx and 429 are worth retrying."""
    code = response.status_code
    if code < 400:
        return
    if code == 429 or code >= 500:
        raise Transient(f"HTTP {code}")
    detail = server_message(response)
    if code == 400:
        raise UsageError(f"{where}: the server refused the request{detail}")
    if code == 404:
        raise InputError(f"{where}: no such cache{detail}")
    if code in (401, 403):
        raise StorageError(f"{where}: {'a token is required' if code == 401 else 'the token was refused'} "
                           f"(HTTP {code}){detail}; pass the server's bearer token")
    if code == 422:
        raise FormatError(f"{where}: refused by the server{detail}")
    raise StorageError(f"{where}: HTTP {code}{detail}")


def server_message(response) -> str:
    try:
        return f": {response.json()['error']}"
    except Exception:  # noqa: BLE001 - a body that is not our JSON error carries nothing worth showing
        return ""


class FsspecFetcher:
    """Range reads of one object through fsspec (s3fs for s3://)."""

    def __init__(self, url: str):
        self.name = url
        self.fs, self.path = filesystem(url)

    def size(self) -> int:
        return int(self._call(self.fs.size, self.path))

    def fetch(self, offset: int, length: int) -> bytes:
        return self._call(self.fs.cat_file, self.path, start=offset, end=offset + length)

    def _call(self, fn, *args, **kwargs):
        """A network failure is Transient (the reader tries again); anything else the store said is final."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise InputError(f"{self.name}: no such cache") from None
        except store_exceptions() as err:
            failure = storage_error(err, self.name)
            if isinstance(failure, ConnectionFailed):
                raise Transient(" ".join(str(err).split()) or type(err).__name__) from None
            raise failure from None

    def close(self) -> None:
        pass


def filesystem(url: str, **options):
    """The fsspec filesystem and path for a URL. For S3, endpoint and credentials come from the usual AWS
    environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as for any AWS client."""
    import fsspec

    protocol = urlsplit(url).scheme
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
        # Listings must see other replicas' writes at once: no listing cache.
        options.setdefault("use_listings_cache", False)
        # botocore retries a request, s3fs retries a timeout around that, and kvcli's own retries wrap both: against
        # an endpoint that accepts connections and never answers, one push took over 6 minutes before it failed.
        # One layer below kvcli's: botocore's standard mode (3 attempts, throttling such as SlowDown included)
        # unless the environment chooses, and no second loop in s3fs (below).
        if not (os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")):
            options.setdefault("config_kwargs", {}).setdefault("retries", {"mode": "standard"})
        # A prefix lookup lists one folder per chunk of the prompt at once (store.FsspecStore.index_workers):
        # botocore's 10 connections would queue them.
        options.setdefault("config_kwargs", {}).setdefault("max_pool_connections", S3_CONNECTIONS)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        raise UsageError(f"{url}: cannot open this URL: {err}") from None
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop: a class attribute its constructor does not take
    return fs, path


def retried(fn, transient: type | tuple = (Transient, ConnectionFailed), attempts: int = RETRIES,
            backoff_s: float = 2 * BACKOFF_S):
    """fn(), tried again with exponential backoff while it fails with a network error."""
    for attempt in range(attempts):
        try:
            return fn()
        except transient as err:
            if attempt == attempts - 1:
                if isinstance(err, Transient):
                    raise ConnectionFailed(f"{err} (after {attempts} attempts)") from None
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the read-ahead source


class RemoteSource(format.Source):
    """A format.ByteSource over a fetcher, fetching every segment ahead of the reader (see the module doc).

    `refetches` counts ranges fetched again after a transient failure or a checksum mismatch. With `key`, a header
    whose content key differs is refused (FormatError) before any segment is fetched: a store that serves another
    document's bytes under a key never reaches the reader or a local copy."""

    def __init__(self, fetcher, workers: int = WORKERS, block_bytes: int = BLOCK_BYTES, retries: int = RETRIES,
                 backoff_s: float = BACKOFF_S, on_complete=None, key: str | None = None,
                 dictionary_places: list | None = None):
        self.fetcher = fetcher
        self.path = fetcher.name
        self.dictionary_places = dictionary_places or []  # where the file's store keeps dictionaries (dictionary.py)
        self.retries, self.backoff_s = retries, backoff_s
        self.refetches = 0
        self._on_complete = on_complete
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._starts: list[int] = []
        self._futures: list[Future] = []
        self._head = 0  # bytes held before the segment fetches start: the preamble and header
        self._clean = True
        try:
            self.size = self._call(fetcher.size)
            self._buf = bytearray(self.size)
            self.header = self._fetch_header()
            checked_key(key, self.header, self.path)
            self._start(workers, block_bytes)
        except BaseException:
            self.close()
            raise

    # -- ByteSource

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read [{offset}, {offset + length}) outside a {self.size}-byte file")
        if not self._futures and offset + length > self._head:
            raise ValueError(f"read [{offset}, {offset + length}) before the segments are being fetched")
        first = bisect.bisect_right(self._starts, offset) - 1
        i = max(first, 0)
        while i < len(self._starts) and self._starts[i] < offset + length:
            self._futures[i].result()
            i += 1
        return bytes(self._buf[offset : offset + length])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            complete = all(not f.cancelled() and f.exception() is None for f in self._futures)
            if complete and self._clean and self._on_complete:
                self._on_complete(self._buf)
        self.fetcher.close()

    # -- fetching

    def _fetch_header(self) -> format.Header:
        """Preamble and header, refetched while the header CRC fails (a damaged response, not yet a bad file)."""
        for attempt in range(self.retries + 1):
            prefix = self._call(self.fetcher.fetch, 0, min(self.size, HEAD_PREFETCH)) if self.size else b""
            if len(prefix) >= format.PREAMBLE_SIZE:
                hlen = format.PREAMBLE.unpack(prefix[: format.PREAMBLE_SIZE])[3]
                end = format.PREAMBLE_SIZE + hlen
                if len(prefix) < end <= min(self.size, format.PREAMBLE_SIZE + format.MAX_HEADER_BYTES):
                    prefix += self._call(self.fetcher.fetch, len(prefix), end - len(prefix))
            self._buf[: len(prefix)] = prefix[: self.size]
            self._head = len(prefix)
            try:
                return format.read_header(self)
            except FormatError:
                if attempt == self.retries or len(prefix) < format.PREAMBLE_SIZE or prefix[:8] != format.MAGIC:
                    raise
                self._retry_wait(attempt)
        raise AssertionError("unreachable")

    def _start(self, workers: int, block_bytes: int) -> None:
        """Blocks of whole segments in file order, so each can be checked against its CRCs as it lands."""
        header = self.header
        blocks: list[list[format.Segment]] = []
        for seg in header.segments:
            if blocks and sum(s.length for s in blocks[-1]) + seg.length <= block_bytes:
                blocks[-1].append(seg)
            else:
                blocks.append([seg])
        self._starts = [header.data_offset + b[0].offset for b in blocks]
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvcli-fetch")
        self._futures: list[Future] = [self._pool.submit(self._fetch_block, b) for b in blocks]

    def _fetch_block(self, segs: list[format.Segment]) -> None:
        base = self.header.data_offset
        start = base + segs[0].offset
        length = segs[-1].offset + segs[-1].length - segs[0].offset
        for attempt in range(self.retries + 1):
            data = self._call(self.fetcher.fetch, start, length)
            bad = len(data) != length or any(
                zlib.crc32(data[s.offset - segs[0].offset : s.offset - segs[0].offset + s.length]) != s.crc32
                for s in segs)
            if not bad:
                break
            if attempt == self.retries:
                if len(data) != length:
                    raise StorageError(f"{self.path}: bytes [{start}, {start + length}) arrived truncated "
                                       f"{self.retries + 1} times")
                self._clean = False  # the stored file itself is corrupt: the reader names the segment
                break
            with self._lock:
                self.refetches += 1
            self._retry_wait(attempt)
        self._buf[start : start + length] = data

    def _call(self, fn, *args):
        """fn(*args), retried with exponential backoff while it fails transiently."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except Transient as err:
                if attempt == self.retries:
                    raise StorageError(f"{self.path}: {err} (after {self.retries + 1} attempts)") from None
                with self._lock:
                    self.refetches += 1
                self._retry_wait(attempt)
        raise AssertionError("unreachable")

    def _retry_wait(self, attempt: int) -> None:
        time.sleep(self.backoff_s * (2**attempt))


# ---------------------------------------------------------------- local copies


def cache_dir_bytes() -> int:
    """The default bound on a cache directory: $KVCLI_CACHE_DIR_BYTES, else 4 GiB."""
    env = os.environ.get(CACHE_DIR_BYTES_ENV, "").strip()
    if not env:
        return DEFAULT_CACHE_DIR_BYTES
    if not env.isdigit():
        raise UsageError(f"${CACHE_DIR_BYTES_ENV} must be a number of bytes, not {env[:40]!r}")
    return int(env)


class LocalCache:
    """Local copies of remote caches as DIR/KEY.kvc, at most `max_bytes` in all; the least recently used go first.
    A copy that names a dictionary has it at DIR/dicts/SHA.kvd, written before the copy and counted in the bound;
    eviction removes a dictionary only once no kept copy names it.

    Recency is the file's mtime, touched on every hit, so several processes sharing DIR agree on it."""

    def __init__(self, directory: str | Path, max_bytes: int | None = None):
        self.dir = Path(directory)
        self.max_bytes = cache_dir_bytes() if max_bytes is None else max_bytes
        if self.max_bytes < 0:
            raise UsageError(f"the bound on the cache directory must be at least 0 bytes, not {self.max_bytes}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"{self.dir}: cannot create the cache directory: {err.strerror}") from None
        # Refused before any work, as for --out-dir: a copy that cannot be kept would be found out only at the end.
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise StorageError(f"{self.dir}: the cache directory is not writable")

    def find(self, key: str) -> format.FileSource | None:
        """The local copy of `key`, opened, if there is a sound one: every CRC holds and the content is that key's.
        A copy that is not (a damaged disk, a copy left by a kvcli that did not check) is removed, and the caller
        fetches the cache again; one that stayed would fail every later run. Checking reads the copy once more,
        from a local disk, before the decoder does."""
        from .store import validate  # store.py imports this module

        path = self.dir / f"{key}.kvc"
        try:
            os.utime(path)
            src = format.FileSource(path)
        except (OSError, InputError):
            return None
        try:
            header = validate(src)
            checked_key(key, header, str(path))
            sha = dictionary.named_by(header)
            if sha is not None and not dictionary.embeds(header):
                # Evicted by another process sharing DIR meanwhile, or damaged (then removed): a miss, and fetching
                # the copy again brings both back.
                dictionary.find(sha, [dictionary.CachePlace(self.dir)], str(path))
        except FormatError:
            src.close()
            path.unlink(missing_ok=True)
            return None
        return src

    def add(self, key: str, data: bytes | bytearray, places: list | None = None) -> None:
        """Keep a verified download, after its dictionary (from DIR/dicts or `places`, the file's store). The copy
        only saves a later fetch: failing to write it (a full disk, a dictionary not found) is said on stderr and is
        not the command's failure."""
        if len(data) > self.max_bytes:
            return
        path = self.dir / f"{key}.kvc"
        try:
            src = format.BytesSource(bytes(data), str(path))
            found = dictionary.to_carry(src, format.read_header(src), str(path),
                                        [dictionary.DirPlace(self.dir), *(places or [])])
            if found is not None:
                os.utime(dictionary.save(found, self.dir))  # fresh: evict() leaves it while this copy is written
            format.atomic_write(str(path), [data])
        except (FormatError, StorageError) as err:
            write_stderr_text(f"kvcli: no local copy kept: {err}\n")
            return
        self.evict(keep=key)

    def evict(self, keep: str = "") -> int:
        """Remove least recently used copies until the total (dictionaries included) fits, and with each the
        dictionaries no kept copy names; returns the bytes removed."""
        copies = [(st.st_mtime, path, st.st_size) for path, st in _stats(self.dir.glob("*.kvc"))
                  if KEY_PATTERN.fullmatch(path.stem)]  # anything else is not a copy kvcli made: a user's own file
        dicts = {path.stem: (path, st) for path, st in _stats((self.dir / dictionary.DICT_DIR).glob("*.kvd"))
                 if dictionary.SHA.fullmatch(path.stem)}
        total = sum(size for _, _, size in copies) + sum(st.st_size for _, st in dicts.values())
        if total <= self.max_bytes:
            return 0
        names = {path: _dictionary_named(path) for _, path, _ in copies}
        users = collections.Counter(names.values())
        removed = 0

        def drop(path: Path, size: int) -> None:
            nonlocal total, removed
            try:
                path.unlink()
            except OSError:
                return
            total -= size
            removed += size

        fresh = time.time() - DICT_GRACE_S
        for sha, (path, st) in dicts.items():  # unused: they save no fetch
            if not users[sha] and st.st_mtime < fresh:
                drop(path, st.st_size)
        for _, path, size in sorted(copies):
            if total <= self.max_bytes:
                break
            if path.stem == keep:
                continue
            drop(path, size)
            sha = names[path]
            users[sha] -= 1
            if sha in dicts and not users[sha] and dicts[sha][1].st_mtime < fresh:
                drop(dicts[sha][0], dicts[sha][1].st_size)
        return removed


def _stats(paths) -> Iterator[tuple[Path, os.stat_result]]:
    for path in paths:
        try:
            yield path, path.stat()
        except OSError:
            continue


def _dictionary_named(path: Path) -> str | None:
    """The dictionary a kept copy needs beside it (None: none, its own, or a copy whose header does not read)."""
    try:
        with format.FileSource(path) as src:
            header = format.read_header(src)
            return None if dictionary.embeds(header) else dictionary.named_by(header)
    except (FormatError, InputError, StorageError):
        return None


# ---------------------------------------------------------------- entry point


def url_key(location: str) -> str | None:
    """The cache key a URL names in its last path component (KEY or KEY.kvc), if it names one."""
    match = _URL_KEY.search(urlsplit(location).path)
    return match.group(1) if match else None


def read_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """A bearer token: given, from a file (first line), or from $KVCLI_TOKEN / $KVCLI_TOKEN_FILE."""
    if token:
        return token
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV)
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise InputError(f"{token_file}: cannot read the token file: {err.strerror}") from None
        if not text:
            raise InputError(f"{token_file}: the token file is empty")
        return text.splitlines()[0].strip()
    return os.environ.get(TOKEN_ENV) or None


def check_url(location: str) -> str:
    """A URL refused as a usage error (exit 2) before any request: control characters (urlsplit drops a
    newline that httpx then refuses), a malformed host or port, an http(s) URL without a host. These reached the
    user as "a bug in kvcli" (exit 10), or as a connection failure after 4 attempts."""
    bad = next((c for c in location if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise UsageError(f"{location!r}: a URL cannot hold {bad!r}; percent-encode it or remove it")
    try:
        parts = urlsplit(location)
        parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535
    except ValueError as err:
        raise UsageError(f"{location}: not a valid URL ({err})") from None
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise UsageError(f"{location}: the URL names no host")
    return location


def make_fetcher(location: str, token: str | None = None, transport=None):
    parts = urlsplit(check_url(location))
    if parts.scheme in ("http", "https"):
        if "/v1/caches/" in parts.path:
            check_key(parts.path.rsplit("/", 1)[1])
        return HttpFetcher(location, read_token(token), transport)
    return FsspecFetcher(location)


def open_source(location: str, cache_dir: str | LocalCache | None = None, token: str | None = None, transport=None,
                workers: int = WORKERS):
    """A ByteSource for a local path, an http(s) URL (…/v1/caches/KEY) or an fsspec URL (s3://…/KEY.kvc).

    A URL that names a key (KEY or KEY.kvc as its last component) is a promise about the content: a header whose
    key differs is a FormatError. With `cache_dir` (a directory, bounded by $KVCLI_CACHE_DIR_BYTES, or a LocalCache
    with its own bound), such a cache is read from a local copy when there is one, and a complete, verified download
    leaves one behind."""
    if "://" not in location:
        return format.open_source(location)
    from .store import url_place  # store.py imports this module

    key = url_key(check_url(location))
    local = None
    if cache_dir and key:
        local = cache_dir if isinstance(cache_dir, LocalCache) else LocalCache(cache_dir)
    if local:
        hit = local.find(key)
        if hit is not None:
            return hit
    place = url_place(location, read_token(token), transport)
    places = [place] if place is not None else []
    return RemoteSource(make_fetcher(location, token, transport), workers=workers, key=key, dictionary_places=places,
                        on_complete=(lambda data: local.add(key, data, places)) if local else None)
