"""Cache keys: the content address of a .kvc file in a store (docs/format.md, "Cache keys").

The key depends only on what decides the cache's contents: the model identity, the dtype, the codec with its
parameters, and the token ids. It never depends on Python's hash(), a random seed, the clock or the machine.
"""

from __future__ import annotations

import array
import hashlib
import json
import re
import sys

from ..errors import FormatError, UsageError

KEY_DOMAIN = b"kvcli-cache-key-v1\0"
KEY_PATTERN = re.compile(r"\A[0-9a-f]{64}\Z")  # \Z, not $: "$" also matches before a trailing newline
MODEL_FIELDS = ("architecture", "config_digest", "weights_digest", "tokenizer_digest")


def canonical_json(obj) -> bytes:
    """Sorted keys, no spaces, ASCII only; floats in Python's shortest round-trip repr."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def token_bytes(token_ids) -> bytes:
    """The token ids as u32 little-endian, the byte string both keys and tokens_sha256 hash."""
    try:
        ids = array.array("I", token_ids)  # C unsigned int: 4 bytes wherever torch runs; the range check is C's
    except (OverflowError, TypeError):
        raise ValueError("token ids must be a flat list of integers in [0, 2**32)") from None
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()


def tokens_sha256(token_ids) -> str:
    return hashlib.sha256(token_bytes(token_ids)).hexdigest()


def derive_key(model: dict, dtype: str, codec: dict, token_ids) -> str:
    """SHA-256 hex of the domain tag, the canonical JSON of what makes the cache, a NUL, and the token bytes."""
    what = {field: model[field] for field in MODEL_FIELDS}
    what.update(dtype=dtype, codec={"name": codec["name"], "params": codec["params"]})
    digest = hashlib.sha256(KEY_DOMAIN)
    digest.update(canonical_json(what))
    digest.update(b"\0")
    digest.update(token_bytes(token_ids))
    return digest.hexdigest()


def key_of_header(header) -> str:
    """The key of a parsed format.Header: what a store files it under and what a server checks an upload against."""
    return derive_key(header.model, header.dtype, header.codec, header.token_ids)


def checked_key(key: str | None, header, where: str) -> str:
    """The key a parsed header gives; a caller's key that differs is a FormatError: the bytes are not what their
    name claims (an upload under the wrong key, or a store serving another document's file under this one)."""
    actual = key_of_header(header)
    if key is not None and check_key(key) != actual:
        raise FormatError(f"{where}: the key {key} does not match the file's content (its key is {actual})")
    return actual


def check_key(key: str) -> str:
    """A key is exactly 64 lowercase hex digits, so no path can ever be formed from one."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        shown = key[:80] if isinstance(key, str) else type(key).__name__
        raise UsageError(f"{shown!r} is not a cache key (64 lowercase hex digits)")
    return key


CHUNK_DOMAIN = b"kvcli-chunk-key-v1\0"
CHUNK_TOKENS = 256


def chunk_keys(model: dict, dtype: str, token_ids, chunk_tokens: int = CHUNK_TOKENS) -> list[str]:
    """The chained key of every full `chunk_tokens` chunk of `token_ids` (docs/format.md, "Chunk keys").

    Key i is SHA-256 of the domain tag, key i-1's 32 bytes (32 zero bytes for the first chunk), the canonical JSON
    of the model identity and dtype, a NUL and chunk i's token bytes: equal keys mean equal tokens from position 0
    to the chunk's end for one model and dtype, whichever file or process computed them. A partial last chunk has
    no key."""
    if type(chunk_tokens) is not int or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, not {chunk_tokens!r}")
    what = {field: model[field] for field in MODEL_FIELDS}
    what["dtype"] = dtype
    context = canonical_json(what) + b"\0"
    data = token_bytes(token_ids)
    width = 4 * chunk_tokens
    keys, previous = [], bytes(32)
    for start in range(0, len(data) - width + 1, width):
        digest = hashlib.sha256(CHUNK_DOMAIN)
        digest.update(previous)
        digest.update(context)
        digest.update(data[start : start + width])
        previous = digest.digest()
        keys.append(previous.hex())
    return keys
