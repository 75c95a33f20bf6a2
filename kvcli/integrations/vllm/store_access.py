"""How the connector reaches its store, apart from vLLM so that it is tested without an engine: the store its
settings name (with the serve-cache token of `token_file`), how a load opens a stored file, and the scheduler's
lookup and claim of a request's stored prefix."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ...container import format
from ...storage import remote
from ...storage.index import PrefixHit
from ...errors import InputError
from ...storage.store import DirStore, StoredSource, open_ranged, open_store
from .settings import Settings
from .stats import Stats


def open_connector_store(settings: Settings):
    token = remote.read_token(None, settings.token_file) if settings.token_file else None
    # A directory store is made when saves are on; a remote one must exist already.
    return open_store(settings.store, token, create=settings.saves and "://" not in settings.store)


def file_opener(store, settings: Settings, stats: Stats) -> Callable[[str], format.ByteSource]:
    """How a load opens a stored file: from the store (only the prefix's bytes travel), or from its local copy when
    `cache_dir` keeps copies of a remote store's caches."""
    if not settings.cache_dir or isinstance(store, DirStore):
        return lambda key: open_ranged(store, key)
    return LocalCopies(store, remote.LocalCache(settings.cache_dir, settings.cache_dir_bytes), stats)


class LocalCopies:
    """Whole local copies of a remote store's caches, bounded and least recently used first out (LocalCache).

    A load without a copy reads only its prefix from the store; the whole file is copied after that load has
    closed it, on one background thread. A load that read the file whole instead would wait for every byte of it,
    and one cut short by its prefix would leave no copy behind (a partial download is never kept)."""

    def __init__(self, store, local: remote.LocalCache, stats: Stats):
        self.store, self.local, self.stats = store, local, stats
        self._token = getattr(store, "token", None)
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcli-copy")

    def __call__(self, key: str) -> format.ByteSource:
        copy = self.local.find(key)
        if copy is not None:
            return copy
        size = self.store.size(key)
        if size is None:
            raise InputError(f"{self.store.url}: no cache {key}")
        return _ThenCopy(self.store, key, size, lambda: self._copy_later(key))

    def _copy_later(self, key: str) -> None:
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        try:
            self._pool.submit(self._copy, key)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._pending.discard(key)

    def _copy(self, key: str) -> None:
        try:
            src = remote.open_source(self.store.url_for(key), self.local, self._token)
            try:
                src.read(0, src.size)  # every block: a complete, verified download is kept when it closes
            finally:
                src.close()
            self.stats.add("cache_dir_copies")
        except Exception:  # the copy only saves a later fetch; the store's faults are counted where loads meet them
            self.stats.add("cache_dir_copy_failures")
        finally:
            with self._lock:
                self._pending.discard(key)

    def wait(self) -> None:
        """Until every copy started so far has settled."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _ThenCopy(StoredSource):
    """A stored file read by ranges, that asks for its whole local copy once closed."""

    def __init__(self, store, key: str, size: int, then: Callable[[], None]):
        super().__init__(store, key, size)
        self._then = then

    def close(self) -> None:
        super().close()
        self._then()


def lookup(store, identity: dict, dtype: str, token_ids: list[int], stats: Stats) -> list[PrefixHit]:
    """Every stored file (each quality level) that holds the longest stored prefix of a prompt, best first
    (store.prefix_hits: one index lookup); a store that is down or refuses is a miss ([])."""
    stats.add("lookups")
    try:
        hits = store.prefix_hits(identity, dtype, token_ids)
    except Exception as err:  # never a failed request
        stats.fault("store_unavailable", f"the prefix lookup failed: {type(err).__name__}: {err}")
        return []
    if hits:
        stats.add("lookup_hits")
        stats.add("lookup_hit_tokens", hits[0].tokens)
    return hits


def claimable(hit: PrefixHit | None, prompt_tokens: int, block_size: int, computed: int) -> int:
    """The tokens beyond the `computed` ones that the connector claims: the hit in whole blocks, never the prompt's
    last token (vLLM computes at least one)."""
    if hit is None:
        return 0
    usable = min(hit.tokens, prompt_tokens - 1) // block_size * block_size
    return max(0, usable - computed)
