"""The prefix index of a store: chunk key -> the stored files that hold that chunk (docs/format.md, "Prefix index").

    hit = store.lookup_prefix(model, "float32", prompt_ids)   # the longest stored prefix, or None
    hit.file_key, hit.tokens, hit.codec, hit.quality, hit.bytes
    store.prefix_hits(model, "float32", prompt_ids)           # every file (quality level) that holds that prefix

Every full 256-token chunk of a stored file has an entry `.index/CHUNK_KEY/FILE_KEY`, a small JSON object written
after the file (so an entry never names a file that is not there yet), each in one atomic write: no entry is ever
read, modified and written back, so concurrent writers of files that share chunks never lose one another's entries.
A lookup lists the folder of each of the prompt's chunk keys (one request each, all at once on a remote store), takes
the files named at the deepest chunks, and reads their headers: the files are the truth, the index only a hint. A
file that is gone, damaged, or whose tokens differ from the prompt's is skipped.

This module holds what the stores share; the storage calls are FileStore's (store.py) and the server's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..container import format
from ..container.keys import CHUNK_TOKENS, KEY_PATTERN, canonical_json, chunk_keys
from ..container.level import QUALITY_RANK, label_of
from ..errors import UsageError

INDEX = ".index"  # beside ".uploads": never a key, so listings of caches never see it
MAX_CHUNKS = format.MAX_TOKENS // CHUNK_TOKENS  # a lookup of more chunk keys than any file can hold is refused


@dataclass(frozen=True)
class PrefixHit:
    """One stored file that holds the first `tokens` tokens of a prompt (a multiple of 256)."""

    file_key: str
    tokens: int
    codec: str  # the codec's name: "kvq", "zstd", "raw"
    quality: str  # the --quality preset: "lossless", "high", "balanced", "small", "raw"
    bytes: int  # the whole file's size
    file_tokens: int  # tokens in the whole file (>= tokens)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj, where: str) -> "PrefixHit":
        """A hit as a server sent it, every field checked: a client must not act on a malformed answer."""
        fields = {"file_key": str, "tokens": int, "codec": str, "quality": str, "bytes": int, "file_tokens": int}
        if not isinstance(obj, dict) or any(type(obj.get(name)) is not kind for name, kind in fields.items()):
            raise ValueError(f"{where}: a prefix hit needs {', '.join(fields)} of the right types")
        if (not KEY_PATTERN.fullmatch(obj["file_key"]) or obj["tokens"] <= 0 or obj["tokens"] % CHUNK_TOKENS
                or obj["tokens"] > obj["file_tokens"] or obj["bytes"] <= 0):
            raise ValueError(f"{where}: the prefix hit {canonical_json(obj)[:200]!r} is not a possible one")
        return cls(**{name: obj[name] for name in fields})


@dataclass(frozen=True)
class FileChunks:
    """What a lookup needs of one stored file, from its header: its chunk keys and what a hit reports."""

    chunks: tuple[str, ...]
    codec: str
    quality: str
    bytes: int
    file_tokens: int

    def hit(self, file_key: str, chunks: int) -> PrefixHit:
        return PrefixHit(file_key, chunks * CHUNK_TOKENS, self.codec, self.quality, self.bytes, self.file_tokens)


def indexable(header: format.Header) -> bool:
    """Whether every chunk-aligned prefix of the file can be served from it. A layer whose window dropped its
    first tokens (token_start > 0) holds only the end of the document: such a file serves no shorter prefix."""
    return all(shape.token_start == 0 for shape in header.layers)


def file_chunks(header: format.Header, size: int) -> FileChunks:
    keys = chunk_keys(header.model, header.dtype, header.token_ids) if indexable(header) else []
    return FileChunks(tuple(keys), header.codec["name"], label_of(header.codec), size, header.num_tokens)


def entries(file_key: str, info: FileChunks) -> list[tuple[str, bytes]]:
    """(chunk key, entry bytes) for every full chunk of a stored file."""
    return [(chunk, canonical_json(info.hit(file_key, i + 1).to_json()) + b"\n") for i, chunk in enumerate(info.chunks)]


def check_chunk_keys(keys) -> list[str]:
    if not isinstance(keys, list) or not all(isinstance(k, str) and KEY_PATTERN.fullmatch(k) for k in keys):
        raise UsageError("chunk_keys must be a list of chunk keys (64 lowercase hex digits each)")
    if len(keys) > MAX_CHUNKS:
        raise UsageError(f"at most {MAX_CHUNKS} chunk keys in one lookup, not {len(keys)}")
    return keys


def common_chunks(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def rank(hit: PrefixHit, prefer: str | None = None) -> tuple:
    """Longest first; between hits of equal length, the preferred quality, then exact copies, then the finer lossy
    presets (files of no preset last), then the smaller file."""
    return (-hit.tokens, hit.quality != prefer, -QUALITY_RANK.get(hit.quality, -1), hit.bytes,
            hit.file_key)


def best_hits(keys: list[str], listings: list[list[str]], info_of, map_all) -> list[PrefixHit]:
    """The verified hits of the longest stored prefix of the chunk chain `keys`.

    listings[i]: the files the index names under keys[i]; info_of(file key) -> FileChunks or None (gone, damaged);
    map_all(fn, items) -> [fn(item)...], concurrently on remote stores. Files are read deepest entry first, and
    none whose entries end before the longest verified prefix is read at all."""
    deepest: dict[str, int] = {}
    for depth, files in enumerate(listings, 1):
        for file_key in files:
            deepest[file_key] = depth
    by_depth: dict[int, list[str]] = {}
    for file_key, depth in deepest.items():
        by_depth.setdefault(depth, []).append(file_key)
    best, hits = 0, []
    for depth in sorted(by_depth, reverse=True):
        if depth < best:
            break
        files = sorted(by_depth[depth])
        for file_key, info in zip(files, map_all(info_of, files)):
            chunks = common_chunks(info.chunks, keys) if info is not None else 0
            if chunks and chunks >= best:
                if chunks > best:
                    best, hits = chunks, []
                hits.append(info.hit(file_key, chunks))
    return sorted(hits, key=rank)


class PrefixLookup:
    """The lookups every store offers, over its prefix_hits_for(chunk keys)."""

    def prefix_hits_for(self, keys: list[str]) -> list[PrefixHit]:
        raise NotImplementedError

    def prefix_hits(self, model: dict, dtype: str, token_ids) -> list[PrefixHit]:
        """Every stored file that holds the longest stored chunk-aligned prefix of `token_ids`, best first (exact
        copies, then finer presets, then smaller files); [] when not even the first 256 tokens are stored."""
        keys = chunk_keys(model, dtype, token_ids)
        return self.prefix_hits_for(keys) if keys else []

    def lookup_prefix(self, model: dict, dtype: str, token_ids, quality: str | None = None) -> PrefixHit | None:
        """The longest stored prefix of `token_ids` (a multiple of 256 tokens), or None. Among files that hold it,
        one of `quality` if there is one, else the first of prefix_hits."""
        hits = self.prefix_hits(model, dtype, token_ids)
        return min(hits, key=lambda hit: rank(hit, quality)) if hits else None

