"""How the connector reaches its store, apart from vLLM so that it is tested without an engine: the store its
settings name (with the serve-cache token of `token_file`), how a load opens a stored file, and the scheduler's
lookup and claim of a request's stored prefix."""

from __future__ import annotations

from typing import Callable

from ...container import format
from ...storage import remote
from ...storage.index import PrefixHit
from ...storage.store import DirStore, open_ranged, open_store
from .settings import Settings
from .stats import Stats


def open_connector_store(settings: Settings):
    token = remote.read_token(None, settings.token_file) if settings.token_file else None
    # A directory store is made when saves are on; a remote one must exist already.
    return open_store(settings.store, token, create=settings.saves and "://" not in settings.store)


def file_opener(store, settings: Settings) -> Callable[[str], format.ByteSource]:
    """How a load opens a stored file: from the store, or through the bounded local copies of remote caches."""
    if not settings.cache_dir or isinstance(store, DirStore):
        return lambda key: open_ranged(store, key)  # only the prefix's bytes travel
    local = remote.LocalCache(settings.cache_dir, settings.cache_dir_bytes)
    token = getattr(store, "token", None)
    return lambda key: remote.open_source(store.url_for(key), local, token)


def lookup(store, identity: dict, dtype: str, token_ids: list[int], stats: Stats) -> PrefixHit | None:
    """The longest stored prefix of a prompt, in one index lookup; a store that is down or refuses is a miss."""
    stats.add("lookups")
    try:
        hit = store.lookup_prefix(identity, dtype, token_ids)
    except Exception as err:  # never a failed request
        stats.fault("store_unavailable", f"the prefix lookup failed: {type(err).__name__}: {err}")
        return None
    if hit is not None:
        stats.add("lookup_hits")
        stats.add("lookup_hit_tokens", hit.tokens)
    return hit


def claimable(hit: PrefixHit | None, prompt_tokens: int, block_size: int, computed: int) -> int:
    """The tokens beyond the `computed` ones that the connector claims: the hit in whole blocks, never the prompt's
    last token (vLLM computes at least one)."""
    if hit is None:
        return 0
    usable = min(hit.tokens, prompt_tokens - 1) // block_size * block_size
    return max(0, usable - computed)
