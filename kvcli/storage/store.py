"""The cache store: content-addressed .kvc files under one root, shared by the server, push/pull and prefill.

    store = open_store("caches/")                       # a directory
    store = open_store("s3://bucket/prefix")            # any fsspec URL; S3 settings from the AWS environment
    store = open_store("http://host:8088", token="…")   # a `kvcli serve-cache` server
    key = store.put(None, "doc.kvc")    # validated (header, every CRC), then stored atomically; returns the key
    store.exists(key); store.size(key); store.read(key, offset, length); store.open(key)  # a format.ByteSource
    store.list(model=weights_digest); store.lookup(tokens_sha256=…); store.url_for(key); store.delete(key)
    push(store, "doc.kvc")              # put, or for a large file an upload in parts that resumes where it stopped
    store.lookup_prefix(model, dtype, token_ids); store.prefix_hits(…)  # the prefix index (index.py)

Objects are ROOT/KEY.kvc, KEY from kvcli.container.keys, and the prefix index's entries
ROOT/.index/CHUNK/KEY. Nothing lives only in memory: listing and lookup read the files'
headers (a per-process cache of parsed headers is keyed by key and size, and is only ever a copy of the files).
Writes are atomic: a temporary file renamed into place on filesystems, one PUT (or one completed multipart
upload) on object stores, so readers never see a torn file and two writers of one key leave one valid file.

Dictionaries (kvcli/container/dictionary.py) live at ROOT/dicts/SHA256.kvd, content-addressed, put before the first
file that names one: a store refuses a file naming a dictionary it lacks (DictionaryNotStored), so no reader of a
store ever meets a file whose dictionary is not there. Listings, the index and sweeps never look under dicts/.

Resumable uploads stage parts in the store itself, under ROOT/.uploads/KEY/UPLOAD/OFFSET (UPLOAD: the header
digest, so two files of one key never mix), and complete by validating the assembled parts like any put: any
replica over the same store can take the next part or the completion, and a restart loses nothing.

Listing entries are dicts: key, bytes, model (the weights digest: what `model=` filters on), model_name,
architecture, dtype, tokens, tokens_sha256, codec, quality (the --quality preset), created_at, source_sha256.
The levels of one document are the entries of `lookup(model=…, tokens_sha256=…)`, one file per quality.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlsplit

from ..container import dictionary, format, level
from ..container.keys import KEY_PATTERN, check_key, checked_key, tokens_sha256
from ..errors import FormatError, InputError, StorageError, UsageError
from . import index, remote
from .index import INDEX, FileChunks, PrefixHit

COPY_BLOCK = 1 << 20
PART_BYTES = 8 << 20  # an upload part; a push of a larger file goes in parts and resumes where it broke off
STALE_UPLOAD_S = 24 * 3600  # staged parts untouched this long belong to an upload nobody will finish
HEADER_CACHE_ITEMS = 65536  # per cache of what headers say (FileStore._from_header)
REBUILD_WORKERS = 8  # rebuild_index's concurrent header reads and entry writes, on any store
UPLOADS = ".uploads"  # the staging prefix in a store: never a key, so listings never see it
_PART_NAME = re.compile(r"[0-9a-f]{16}")

Data = bytes | str | Path | BinaryIO


# ---------------------------------------------------------------- validation shared by every store


class FdSource(format.Source):
    """Positional reads from an open binary file (a spooled upload), without taking ownership of it."""

    def __init__(self, fh: BinaryIO, name: str = "<upload>"):
        self._fd = fh.fileno()
        self.size = os.fstat(self._fd).st_size
        self.path = name

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FormatError(f"{self.path}: file changed while being read")
        return data


def validate(src: format.ByteSource) -> format.Header:
    """Everything a store checks before a file becomes visible: magic, version, header, every segment's CRC."""
    header = format.read_header(src)
    for seg in header.segments:
        format.read_segment(src, header, seg)
    return header


def open_data(data: Data, name: str = "<upload>"):
    """A ByteSource over what put() accepts: bytes, a path, or an open binary file."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return format.BytesSource(bytes(data), name)
    if isinstance(data, (str, Path)):
        return format.FileSource(data)
    return FdSource(data, getattr(data, "name", name) if isinstance(getattr(data, "name", None), str) else name)


def iter_blocks(src: format.ByteSource, block: int = COPY_BLOCK) -> Iterator[bytes]:
    for offset in range(0, src.size, block):
        yield src.read(offset, min(block, src.size - offset))


def describe(key: str, header: format.Header, size: int) -> dict:
    """The listing entry for one stored file."""
    return {
        "key": key,
        "bytes": size,
        "model": header.model["weights_digest"],
        "model_name": header.model.get("name", ""),
        "architecture": header.model["architecture"],
        "dtype": header.dtype,
        "tokens": header.num_tokens,
        "tokens_sha256": tokens_sha256(header.token_ids),
        "codec": header.codec["name"],
        "quality": level.label_of(header.codec),
        "created_at": header.created_at or None,
        "source_sha256": (header.source or {}).get("sha256"),
    }


def matches(entry: dict, model: str | None = None, tokens_sha256: str | None = None,
            source_sha256: str | None = None) -> bool:
    return all(want is None or entry.get(field) == want
               for field, want in (("model", model), ("tokens_sha256", tokens_sha256), ("source_sha256", source_sha256)))


def check_hex(value: str | None, what: str) -> str | None:
    if value is not None and not KEY_PATTERN.fullmatch(value):
        raise UsageError(f"{what} must be 64 lowercase hex digits, got {value[:80]!r}")
    return value


# ---------------------------------------------------------------- dictionaries: what every store shares


class DictionaryNotStored(dictionary.DictionaryMissing):
    """A file offered to a store that lacks the dictionary the file names: the dictionary must go first."""

    def __init__(self, sha: str, needed_by: str, where: str):
        super().__init__(sha, needed_by, [where])
        self.args = (f"{needed_by}: its dictionary {sha} is not in {where}: a store takes a file only after the "
                     f"dictionary it names (kvcli push carries it; over HTTP, PUT /v1/dicts/{sha} first)",)


class StorePlace:
    """A store's dicts/ as a place a reader looks for dictionaries (dictionary.Place)."""

    def __init__(self, store):
        self.store = store
        self.where = store.dicts_url

    def read(self, sha: str) -> bytes | None:
        return self.store.held_dictionary(sha)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePlace) and other.where == self.where

    def __hash__(self) -> int:
        return hash(self.where)


class DictionaryShelf:
    """The dictionary methods every store shares over its own _dict_size, _read_dict and _write_dict."""

    url: str
    dicts_url: str
    # Dictionaries found stored and intact: content-addressed and never deleted by kvcli, so asked for once per store
    # object (a reader of many files fetches one dictionary once, not once per file).
    _dicts_held: dict[str, bytes]

    def dictionary_place(self) -> StorePlace:
        return StorePlace(self)

    def read_dictionary(self, sha: str) -> bytes | None:
        """The stored bytes of dictionary `sha`, None when the store lacks it (a reader checks them against `sha`)."""
        return self._read_dict(dictionary.check_sha(sha, self.dicts_url))

    def dictionary_size(self, sha: str) -> int | None:
        return self._dict_size(dictionary.check_sha(sha, self.dicts_url))

    def held_dictionary(self, sha: str) -> bytes | None:
        """read_dictionary, kept once intact: what a reader of the store's files uses. A damaged copy is read again
        each time, so that one mended meanwhile is seen."""
        sha = dictionary.check_sha(sha, self.dicts_url)
        data = self._dicts_held.get(sha)
        if data is None:
            data = self._read_dict(sha)
            if data is not None and dictionary.sha_of(data) == sha:
                self._dicts_held[sha] = data
        return data

    def has_dictionary(self, sha: str) -> bool:
        """Whether the store holds dictionary `sha`, read and checked against its name the first time: a damaged copy
        is a FormatError naming it, so that no file is taken whose dictionary no reader could use."""
        sha = dictionary.check_sha(sha, self.dicts_url)
        if sha in self._dicts_held:
            return True
        data = self._read_dict(sha)
        if data is None:
            return False
        self._dicts_held[sha] = dictionary.parse(data, sha, f"{self.dicts_url}/{sha}{dictionary.SUFFIX}").data
        return True

    def put_dictionary(self, found: dictionary.Dictionary) -> bool:
        """Store a checked dictionary under its name, atomically, before any file that names it; True if written.
        A stored copy stays only when it is these very bytes: anything else under the name (damaged, even at the
        same size; not a regular file) is replaced, so a push mends what a reader would refuse."""
        if self._dicts_held.get(found.sha) == found.data:
            with contextlib.suppress(FormatError):  # read intact before and still there: one stat or HEAD, not the
                if self._dict_size(found.sha) == len(found.data):  # whole dictionary again
                    return False
        try:
            stored = self._read_dict(found.sha)
        except FormatError:  # not a file at all (a FIFO, a device): replaced
            stored = b""
        if stored != found.data:
            self._write_dict(found)
        self._dicts_held[found.sha] = found.data
        return stored != found.data

    def check_dictionary(self, src: format.ByteSource, header: format.Header, name: str) -> None:
        """DictionaryNotStored unless the file needs no dictionary, carries its own, or the store has it. A file
        carrying one is taken only if it is the dictionary its codec names, made for its model (as a reader checks)."""
        sha = dictionary.named_by(header)
        if dictionary.carried(src, header, name) is None and sha is not None and not self.has_dictionary(sha):
            raise DictionaryNotStored(sha, name, self.dicts_url)

    def _dict_size(self, sha: str) -> int | None: ...
    def _read_dict(self, sha: str) -> bytes | None: ...
    def _write_dict(self, found: dictionary.Dictionary) -> None: ...


# ---------------------------------------------------------------- resumable uploads: what every store shares


class UploadConflict(UsageError):
    """The staged parts do not make the declared file (a gap, or a part that vanished while being read): send
    the missing parts, then complete again."""


def header_digest(src: format.ByteSource, header: format.Header) -> str:
    """An upload's id: SHA-256 of the bytes before the first segment. The header lists every segment's length and
    CRC, so it pins the whole file: parts of two different files with one key never mix."""
    return hashlib.sha256(src.read(0, header.data_offset)).hexdigest()


def check_part(offset: int, length: int, part_bytes: int) -> None:
    """Parts start at multiples of the part size and hold at most one part's bytes, so no two overlap."""
    if offset < 0 or offset % part_bytes:
        raise UsageError(f"a part starts at a multiple of {part_bytes} bytes, not at {offset}")
    if not 0 < length <= part_bytes:
        raise UsageError(f"a part holds 1 to {part_bytes} bytes, not {length}")


def check_layout(parts: list[tuple[int, int]], size: int) -> None:
    """The parts (offset, length), sorted, must cover [0, size) exactly."""
    end = 0
    for offset, length in parts:
        if offset != end:
            raise UploadConflict(f"the upload lacks bytes [{end}, {offset}) of {size}; send them and complete again")
        end = offset + length
    if end != size:
        what = f"lacks bytes [{end}, {size})" if end < size else f"holds {end} bytes, more than the declared {size}"
        raise UploadConflict(f"the upload {what}; send the missing parts and complete again")


def resumable_prefix(parts: list[tuple[int, int]], part_bytes: int, size: int) -> int:
    """How many bytes from the start a new run need not send again: the first gap."""
    have = dict(parts)
    end = 0
    while end < size and have.get(end) == min(part_bytes, size - end):
        end += have[end]
    return end


class PartsSource(format.Source):
    """An upload's staged parts read as one file, holding one part at a time (validation reads in order)."""

    def __init__(self, store: "FileStore", key: str, upload: str, parts: list[tuple[int, int]], size: int):
        self.store, self.key, self.upload, self.size = store, key, upload, size
        self.path = f"upload {upload[:12]} of {key}"
        self._starts = [offset for offset, _ in parts]
        self._lengths = [length for _, length in parts]
        self._held: tuple[int, bytes] = (-1, b"")

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read [{offset}, {offset + length}) outside a {self.size}-byte upload")
        out = bytearray()
        while length:
            i = bisect.bisect_right(self._starts, offset) - 1
            start = self._starts[i]
            if self._held[0] != start:
                data = self.store._read_part(self.key, self.upload, start)
                if len(data) != self._lengths[i]:
                    raise UploadConflict(f"{self.path}: the part at {start} changed while being read")
                self._held = (start, data)
            piece = self._held[1][offset - start : offset - start + length]
            out += piece
            offset += len(piece)
            length -= len(piece)
        return bytes(out)


# ---------------------------------------------------------------- stores over files


class FileStore(DictionaryShelf, index.PrefixLookup):
    """What directory and object stores share: validation, listing and lookup from the files' headers, and the
    prefix index (index.py).

    Subclasses provide _size, _read, _keys (key, size pairs), _write (from a validated source) and _remove, and for
    the index _index_files, _write_entry, _remove_entry and _entries."""

    url: str
    index_workers = 1  # concurrent requests of one index lookup or update; a remote store raises it

    def __init__(self):
        self._dicts_held = {}
        self._headers: dict[tuple[str, int], dict] = {}
        self._chunks: dict[tuple[str, int], FileChunks] = {}
        self._lock = threading.Lock()

    def path_of(self, key: str) -> str:
        raise NotImplementedError

    def url_for(self, key: str) -> str:
        return self.path_of(check_key(key))

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def probe(self) -> None:
        """Touch the storage (a health check): a StorageError when it cannot be reached."""
        self._size("0" * 64)

    def check_writable(self) -> None:
        """A StorageError now, before any work, if this store cannot take a write."""
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        return self._size(check_key(key))

    def read(self, key: str, offset: int, length: int) -> bytes:
        return self._read(check_key(key), offset, length)

    def open(self, key: str) -> format.ByteSource:
        size = self.size(key)
        if size is None:
            raise InputError(f"{self.url}: no cache {key}")
        return StoredSource(self, key, size)

    def put(self, key: str | None, data: Data, exclusive: bool = False) -> str:
        """Validate the whole file, check it against `key` (None: take the content's key), store it atomically,
        return its key. Storing a key that exists replaces it with an equally valid file; with `exclusive` the
        stored file stays and this raises FileExistsError (first writer wins, also against a concurrent put)."""
        with open_data(data) as src:
            header = validate(src)
            key = checked_key(key, header, getattr(src, "path", "<upload>"))
            self.check_dictionary(src, header, f"cache {key}")
            try:
                self._write(key, src, exclusive)
            except FileExistsError:
                self.mend_entries(key, header)
                raise
            self._record(key, header, src.size)
        return key

    def mend_entries(self, key: str, header: format.Header | None = None) -> None:
        """An upload of a stored key leaves the file, and still indexes it if its writer was killed before its
        entries (a client's retry after a server died mid-put mends what it left), for one existence check.
        `header`: the upload's, whose chunk keys are the stored file's (equal keys, equal tokens); None: read."""
        info = index.file_chunks(header, 0) if header is not None else self.chunks_of(key)
        if info is not None:
            self.ensure_indexed(key, list(info.chunks))

    def delete(self, key: str) -> bool:
        """Remove a cache's index entries, then the cache; False if there was none. Entries first: a put of the same
        key racing with this leaves at worst entries of a file that is gone (a lookup skips them, a rebuild removes
        them), never a stored file that no lookup finds."""
        info = self.chunks_of(key)
        if info is not None:
            self._map(lambda chunk: self._remove_entry(chunk, key), info.chunks)
        return self._remove(key)

    def list(self, model: str | None = None) -> list[dict]:
        check_hex(model, "model")
        entries = []
        for key, size in sorted(self._keys()):
            entry = self.entry(key, size)
            if entry is not None and matches(entry, model):
                entries.append(entry)
        return entries

    def lookup(self, model: str | None = None, tokens_sha256: str | None = None,
               source_sha256: str | None = None) -> list[dict]:
        for value, what in ((model, "model"), (tokens_sha256, "tokens_sha256"), (source_sha256, "source_sha256")):
            check_hex(value, what)
        return [e for e in self.list(model) if matches(e, None, tokens_sha256, source_sha256)]

    # -- resumable uploads (module doc); `part_bytes` may be lowered on an instance, as tests do

    part_bytes = PART_BYTES

    def upload_state(self, key: str, upload: str) -> dict:
        """The part size and the parts (offset, length) already staged: a client resumes from the first gap."""
        parts = self._parts(check_key(key), check_hex(upload, "upload"))
        return {"key": key, "upload": upload, "part_bytes": self.part_bytes, "parts": [list(p) for p in parts]}

    def put_part(self, key: str, upload: str, offset: int, data: bytes) -> None:
        """Stage one part atomically (sending a part again replaces it); checked before anything is written."""
        check_key(key)
        check_hex(upload, "upload")
        check_part(offset, len(data), self.part_bytes)
        self._write_part(key, upload, offset, data)

    def complete_upload(self, key: str, upload: str, size: int, exclusive: bool = False) -> str:
        """Validate the assembled parts as put() validates a file, store them atomically, drop the staging.
        A gap is an UploadConflict (the parts stay); a file that fails validation drops them, since sending the
        same parts again cannot mend it; so does `exclusive` (as for put) when the key is stored."""
        parts = self._parts(check_key(key), check_hex(upload, "upload"))
        if not parts:
            raise InputError(f"{self.url}: no upload {upload} of {key}")
        check_layout(parts, size)
        with PartsSource(self, key, upload, parts, size) as src:
            try:
                header = validate(src)
                checked_key(key, header, src.path)
                if header_digest(src, header) != upload:
                    raise FormatError(f"{src.path}: its header is not the one the upload id names")
            except FormatError:
                self._remove_upload(key, upload)
                raise
            self.check_dictionary(src, header, f"cache {key}")  # the parts stay: complete again once it is stored
            try:
                self._write(key, src, exclusive)
            except FileExistsError:
                self._remove_upload(key, upload)
                self.mend_entries(key, header)
                raise
            self._record(key, header, size)
        self._remove_upload(key, upload)
        return key

    def abort_upload(self, key: str, upload: str) -> bool:
        """Drop an upload's staged parts; False if there were none."""
        return self._remove_upload(check_key(key), check_hex(upload, "upload"))

    def sweep_uploads(self, max_age_s: float = STALE_UPLOAD_S) -> int:
        """Drop every upload whose newest part is older than `max_age_s`; returns how many were dropped."""
        cutoff = time.time() - max_age_s
        removed = 0
        for key, upload, touched in list(self._uploads()):
            if touched < cutoff and self._remove_upload(key, upload):
                removed += 1
        return removed

    def entry(self, key: str, size: int) -> dict | None:
        """The listing entry of a stored file, from its header; None if it vanished or is not a valid cache."""
        return self._from_header(self._headers, key, size, lambda header: describe(key, header, size))

    def _from_header(self, cache: dict, key: str, size: int, make):
        """make(the stored file's header), kept in `cache` by key and size; None if the file vanished or is damaged.
        A cache is a copy of what the files say, so dropping it all when it is full costs only rereads."""
        with self._lock:
            cached = cache.get((key, size))
        if cached is not None:
            return cached
        try:
            with StoredSource(self, key, size) as src:
                header = format.read_header(src)
        except (FormatError, InputError):
            return None
        return self._keep(cache, key, size, make(header))

    def _keep(self, cache: dict, key: str, size: int, value):
        with self._lock:
            if len(cache) >= HEADER_CACHE_ITEMS:
                cache.clear()
            cache[(key, size)] = value
        return value

    # -- the prefix index (index.py)

    def _map(self, fn, items, workers: int | None = None) -> list:
        items = list(items)
        workers = self.index_workers if workers is None else workers
        if workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))

    def _record(self, key: str, header: format.Header, size: int) -> None:
        """Index a file just stored: called after the write, so no entry names a file that is not there."""
        info = self._keep(self._chunks, key, size, index.file_chunks(header, size))
        self._write_entries(key, index.entries(key, info))

    def _write_entries(self, key: str, found: list[tuple[str, bytes]]) -> None:
        """The last chunk's entry goes last: once it is there, all of the file's are (ensure_indexed's check)."""
        self._map(lambda entry: self._write_entry(entry[0], key, entry[1]), found[:-1])
        if found:
            self._write_entry(found[-1][0], key, found[-1][1])

    def ensure_indexed(self, key: str, chunks: list[str]) -> bool:
        """Index a stored file whose entries a writer killed between the file and its last entry never wrote (one
        existence check when they are there). `chunks`: the file's chunk keys, known to a caller that has its
        tokens. True if entries were written."""
        if not chunks or self._has_entry(chunks[-1], key):
            return False
        info = self.chunks_of(key)
        if info is None or not info.chunks:
            return False
        self._write_entries(key, index.entries(key, info))
        return True

    def chunks_of(self, key: str) -> FileChunks | None:
        """A stored file's chunk keys and what a hit reports, from its header; None if it is gone or damaged."""
        size = self.size(key)
        if size is None:
            return None
        return self._from_header(self._chunks, key, size, lambda header: index.file_chunks(header, size))

    def prefix_hits_for(self, keys: list[str]) -> list[PrefixHit]:
        """The verified hits of the longest stored prefix of a chunk-key chain (index.best_hits)."""
        keys = index.check_chunk_keys(keys)
        return index.best_hits(keys, self._map(self._index_files, keys), self._verified_chunks, self._map)

    def _verified_chunks(self, key: str) -> FileChunks | None:
        """chunks_of, with a store that fails mid-lookup counted as a missing file: a hint is never an error."""
        try:
            return self.chunks_of(key)
        except StorageError:
            return None

    def rebuild_index(self) -> dict:
        """Make the index what the files say, from the files alone: every entry of every stored file written
        (again: the same bytes), every other entry removed. Idempotent; returns counts. Headers are read, entries
        written and removed REBUILD_WORKERS at a time, on a directory too: there each entry costs a synchronous
        metadata write, and thousands of them one by one took seconds per thousand (docs/format.md)."""
        workers = max(self.index_workers, REBUILD_WORKERS)
        keys = sorted(key for key, _ in self._keys())
        found = [(key, index.entries(key, info)) for key, info in zip(keys, self._map(self.chunks_of, keys, workers))
                 if info is not None and info.chunks]
        # every file's last entry after all its others, as _write_entries orders them
        self._map(lambda entry: self._write_entry(*entry),
                  [(chunk, key, data) for key, entries in found for chunk, data in entries[:-1]], workers)
        self._map(lambda entry: self._write_entry(*entry),
                  [(entries[-1][0], key, entries[-1][1]) for key, entries in found], workers)
        expected = {(chunk, key) for key, entries in found for chunk, _ in entries}
        unlisted = [pair for pair in self._entries() if pair not in expected]
        # a file stored since the listing above (a live store) has entries that are no litter: those stay
        stale = [pair for pair, gone in zip(unlisted, self._map(self._names_no_file, unlisted, workers)) if gone]
        self._map(lambda pair: self._remove_entry(*pair), stale, workers)
        return {"store": self.url, "files": len(keys), "indexed": len(found), "entries": len(expected),
                "removed": len(stale)}

    def _names_no_file(self, pair: tuple[str, str]) -> bool:
        chunk, key = pair
        info = self.chunks_of(key)
        return info is None or chunk not in info.chunks

    # subclasses
    def _size(self, key: str) -> int | None: ...
    def _read(self, key: str, offset: int, length: int) -> bytes: ...
    def _keys(self) -> Iterator[tuple[str, int]]: ...
    def _write(self, key: str, src: format.ByteSource, exclusive: bool = False) -> None: ...
    def _remove(self, key: str) -> bool: ...
    def _parts(self, key: str, upload: str) -> list[tuple[int, int]]: ...
    def _read_part(self, key: str, upload: str, offset: int) -> bytes: ...
    def _write_part(self, key: str, upload: str, offset: int, data: bytes) -> None: ...
    def _remove_upload(self, key: str, upload: str) -> bool: ...
    def _uploads(self) -> Iterator[tuple[str, str, float]]: ...  # key, upload, time of the newest part
    def _index_files(self, chunk: str) -> list[str]: ...  # the file keys named under one chunk key
    def _has_entry(self, chunk: str, key: str) -> bool: ...
    def _write_entry(self, chunk: str, key: str, data: bytes) -> None: ...
    def _remove_entry(self, chunk: str, key: str) -> None: ...
    def _entries(self) -> Iterator[tuple[str, str]]: ...  # every (chunk key, file key) in the index


class StoredSource(format.Source):
    """A ByteSource over one stored file in any store. Its first `head_bytes` (64 KiB unless asked otherwise: that
    usually holds the preamble and the whole header, so listing a remote store costs one request per file) are
    fetched once, at the first read, and kept; any other range is its own request."""

    def __init__(self, store, key: str, size: int, head_bytes: int = remote.HEAD_PREFETCH):
        self.store, self.key, self.size = store, key, size
        self.path = store.url_for(key)
        self.dictionary_places = [store.dictionary_place()]
        self.head_bytes = head_bytes
        self._head: bytes | None = None

    @property
    def head(self) -> bytes:
        if self._head is None:
            self._head = self.store.read(self.key, 0, min(self.size, self.head_bytes))
        return self._head

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read [{offset}, {offset + length}) outside a {self.size}-byte file")
        if offset + length <= len(self.head):
            return self.head[offset : offset + length]
        data = self.store.read(self.key, offset, length)
        if len(data) != length:
            raise FormatError(f"{self.path}: changed or truncated while being read")
        return data


def open_ranged(target, key: str, size: int | None = None) -> StoredSource:
    """A stored file of any store as a ByteSource that fetches only the ranges read (the first read: 64 KiB, which
    usually holds the header), where store.open() of a remote store downloads the whole file ahead of the reader.
    `size`, when known (a PrefixHit's bytes), saves asking for it; a file of another size then fails to parse."""
    if size is None:
        size = target.size(key)
        if size is None:
            raise InputError(f"{target.url}: no cache {key}")
    return StoredSource(target, check_key(key), size)


class DirStore(FileStore):
    """A local directory (or a shared filesystem mounted on every replica)."""

    def __init__(self, root: str | Path, create: bool = False):
        super().__init__()
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(f"{self.root}: cannot create the store: {err.strerror}") from None
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such store directory")
        self.dicts_url = str(self.root / dictionary.DICT_DIR)

    def path_of(self, key: str) -> str:
        return str(self.root / f"{key}.kvc")

    def probe(self) -> None:
        # A missing file says nothing about a directory that was unmounted or removed: look at the root itself.
        if not self.root.is_dir():
            raise StorageError(f"{self.root}: the store directory is gone (unmounted or removed?)")

    def check_writable(self) -> None:
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"{self.root}: the store directory is not writable")

    def _size(self, key: str) -> int | None:
        try:
            return os.stat(self.path_of(key)).st_size
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StorageError(f"{self.path_of(key)}: {err.strerror}") from None

    def _read(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(self.path_of(key), "rb") as fh:
                return os.pread(fh.fileno(), length, offset)
        except FileNotFoundError:
            raise InputError(f"{self.url}: no cache {key}") from None
        except OSError as err:
            raise StorageError(f"{self.path_of(key)}: {err.strerror}") from None

    def open(self, key: str) -> format.ByteSource:
        try:
            return format.FileSource(self.path_of(check_key(key)))
        except InputError:
            raise InputError(f"{self.url}: no cache {key}") from None

    def _keys(self) -> Iterator[tuple[str, int]]:
        try:
            with os.scandir(self.root) as it:
                for entry in it:
                    stem, dot, ext = entry.name.partition(".")
                    if ext == "kvc" and KEY_PATTERN.fullmatch(stem) and entry.is_file(follow_symlinks=False):
                        try:
                            yield stem, entry.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            continue
        except OSError as err:
            raise StorageError(f"{self.root}: cannot list: {err.strerror}") from None

    def _write(self, key: str, src: format.ByteSource, exclusive: bool = False) -> None:
        format.atomic_write(self.path_of(key), iter_blocks(src), exclusive)

    def _dict_size(self, sha: str) -> int | None:
        path = self.root / dictionary.name_of(sha)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise StorageError(f"{path}: {err.strerror}") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device says size 0: no dictionary is one (dictionary.read_file)
            raise FormatError(f"{path}: not a regular file, so not a dictionary")
        return st.st_size

    def _read_dict(self, sha: str) -> bytes | None:
        try:
            return dictionary.read_file(self.root / dictionary.name_of(sha))
        except OSError as err:
            raise StorageError(f"{self.root / dictionary.name_of(sha)}: {err.strerror}") from None

    def _write_dict(self, found: dictionary.Dictionary) -> None:
        dictionary.save(found, self.root)  # concurrent writers rename the same bytes into place

    def _remove(self, key: str) -> bool:
        try:
            os.unlink(self.path_of(key))
            return True
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StorageError(f"{self.path_of(key)}: cannot delete: {err.strerror}") from None

    def _index_files(self, chunk: str) -> list[str]:
        try:
            names = os.listdir(self.root / INDEX / chunk)
        except (FileNotFoundError, NotADirectoryError):  # a stray file where a folder belongs names no file
            return []
        except OSError as err:
            raise StorageError(f"{self.root / INDEX / chunk}: cannot list: {err.strerror}") from None
        return [name for name in names if KEY_PATTERN.fullmatch(name)]

    def _has_entry(self, chunk: str, key: str) -> bool:
        return (self.root / INDEX / chunk / key).is_file()

    def _write_entry(self, chunk: str, key: str, data: bytes) -> None:
        directory = self.root / INDEX / chunk
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                # litter where only kvcli writes folders (a file, a link that would lead writes out of the store)
                directory.unlink()
        for attempt in range(2):  # a removal of the chunk's last entry elsewhere may remove the folder meanwhile
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(f"{directory}: cannot create: {err.strerror}") from None
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(directory / key).st_mode):  # litter where an entry belongs, as above
                    shutil.rmtree(directory / key, ignore_errors=True)
            try:
                format.atomic_write(str(directory / key), [data])
                return
            except StorageError:
                if attempt or directory.is_dir():
                    raise

    def _remove_entry(self, chunk: str, key: str) -> None:
        directory = self.root / INDEX / chunk
        try:
            os.unlink(directory / key)
        except FileNotFoundError:
            return
        except IsADirectoryError:  # litter named like an entry (rmtree never follows a link out of the store)
            shutil.rmtree(directory / key, ignore_errors=True)
        except OSError as err:
            raise StorageError(f"{directory / key}: cannot delete: {err.strerror}") from None
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if no other file's entry is there

    def _entries(self) -> Iterator[tuple[str, str]]:
        try:
            chunks = [d.name for d in (self.root / INDEX).iterdir() if KEY_PATTERN.fullmatch(d.name)]
        except FileNotFoundError:
            return
        except OSError as err:
            raise StorageError(f"{self.root / INDEX}: cannot list: {err.strerror}") from None
        for chunk in chunks:
            for key in self._index_files(chunk):
                yield chunk, key

    def _upload_dir(self, key: str, upload: str) -> Path:
        return self.root / UPLOADS / key / upload

    def _parts(self, key: str, upload: str) -> list[tuple[int, int]]:
        parts = []
        try:
            with os.scandir(self._upload_dir(key, upload)) as it:
                for entry in it:
                    if _PART_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            parts.append((int(entry.name, 16), entry.stat(follow_symlinks=False).st_size))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StorageError(f"{self._upload_dir(key, upload)}: cannot list: {err.strerror}") from None
        return sorted(parts)

    def _read_part(self, key: str, upload: str, offset: int) -> bytes:
        path = self._upload_dir(key, upload) / f"{offset:016x}"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise UploadConflict(f"upload {upload[:12]} of {key}: the part at {offset} vanished (completed or "
                                 "aborted meanwhile)") from None
        except OSError as err:
            raise StorageError(f"{path}: {err.strerror}") from None

    def _write_part(self, key: str, upload: str, offset: int, data: bytes) -> None:
        directory = self._upload_dir(key, upload)
        for attempt in range(2):  # a completion or sweep elsewhere may remove the directory between the two steps
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except FileExistsError:  # not a folder: only kvcli writes in the index, so it is litter, replaced
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    directory.unlink()
                continue
            except OSError as err:
                raise StorageError(f"{directory}: cannot create: {err.strerror}") from None
            try:
                format.atomic_write(str(directory / f"{offset:016x}"), [data])
                return
            except StorageError:
                if attempt or directory.is_dir():
                    raise

    def _remove_upload(self, key: str, upload: str) -> bool:
        directory = self._upload_dir(key, upload)
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StorageError(f"{directory}: cannot remove: {err.strerror}") from None
        with contextlib.suppress(OSError):
            directory.parent.rmdir()  # only if no other upload of the key is staged
        return True

    def _uploads(self) -> Iterator[tuple[str, str, float]]:
        staging = self.root / UPLOADS
        try:
            key_dirs = [d for d in staging.iterdir() if KEY_PATTERN.fullmatch(d.name)]
        except FileNotFoundError:
            return
        except OSError as err:
            raise StorageError(f"{staging}: cannot list: {err.strerror}") from None
        for key_dir in key_dirs:
            with contextlib.suppress(OSError):
                for directory in key_dir.iterdir():
                    if KEY_PATTERN.fullmatch(directory.name):
                        stamps = [directory.stat().st_mtime]
                        stamps += [p.stat().st_mtime for p in directory.iterdir()]
                        yield key_dir.name, directory.name, max(stamps)


class FsspecStore(FileStore):
    """Any fsspec URL; s3://bucket/prefix on any S3-compatible service."""

    # A lookup lists one folder per chunk key of the prompt, this many at once.
    index_workers = remote.S3_CONNECTIONS

    def __init__(self, url: str, **options):
        super().__init__()
        self.url = url.rstrip("/")
        self.fs, self.prefix = remote.filesystem(self.url, **options)
        self.prefix = self.prefix.rstrip("/")
        self.dicts_url = f"{self.url}/{dictionary.DICT_DIR}"

    def path_of(self, key: str) -> str:
        return f"{self.prefix}/{key}.kvc"

    def url_for(self, key: str) -> str:
        return f"{self.url}/{check_key(key)}.kvc"

    def check_writable(self) -> None:
        """An empty object written and removed under the staging prefix: a missing bucket, credentials that cannot
        write or an endpoint that does not answer show now, not after a model load and a prefill."""
        probe = f"{self.prefix}/{UPLOADS}/probe-{secrets.token_hex(8)}"
        try:
            self.fs.pipe_file(probe, b"")
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}: cannot write") from None
        with contextlib.suppress(*remote.store_exceptions()):  # a store that lets us write but not delete is usable
            self.fs.rm_file(probe)

    def _size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(self.path_of(key)))
        except FileNotFoundError:
            return None
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, self.url_for(key)) from None

    def _read(self, key: str, offset: int, length: int) -> bytes:
        try:
            return self.fs.cat_file(self.path_of(key), start=offset, end=offset + length)
        except FileNotFoundError:
            raise InputError(f"{self.url}: no cache {key}") from None
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, self.url_for(key)) from None

    def open(self, key: str) -> format.ByteSource:
        if self.size(key) is None:
            raise InputError(f"{self.url}: no cache {key}")
        return remote.RemoteSource(remote.FsspecFetcher(self.url_for(key)),
                                   dictionary_places=[self.dictionary_place()])

    def _dict_size(self, sha: str) -> int | None:
        try:
            return int(self.fs.size(f"{self.prefix}/{dictionary.name_of(sha)}"))
        except FileNotFoundError:
            return None
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{dictionary.name_of(sha)}") from None

    def _read_dict(self, sha: str) -> bytes | None:
        size = self._dict_size(sha)  # asked first: an object of any size may sit under the name
        if size is None:
            return None
        if size > dictionary.MAX_FILE_BYTES:
            raise FormatError(f"{self.url}/{dictionary.name_of(sha)}: {size:,} bytes, more than any dictionary "
                              f"({dictionary.MAX_FILE_BYTES:,})")
        try:
            return self.fs.cat_file(f"{self.prefix}/{dictionary.name_of(sha)}", start=0, end=size)
        except FileNotFoundError:
            return None
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{dictionary.name_of(sha)}") from None

    def _write_dict(self, found: dictionary.Dictionary) -> None:
        try:
            self.fs.pipe_file(f"{self.prefix}/{found.name}", found.data)  # one PUT: atomic
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{found.name}: cannot write") from None

    def _keys(self) -> Iterator[tuple[str, int]]:
        try:
            listing = self.fs.ls(self.prefix, detail=True)
        except FileNotFoundError:
            return
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}: cannot list") from None
        for info in listing:
            stem, dot, ext = info["name"].rsplit("/", 1)[-1].partition(".")
            if ext == "kvc" and KEY_PATTERN.fullmatch(stem) and info.get("type") == "file":
                yield stem, int(info["size"])

    def _write(self, key: str, src: format.ByteSource, exclusive: bool = False) -> None:
        """One streamed upload that becomes visible only when it completes (one PUT, or a completed multipart
        upload); a failure discards it instead of letting close() commit a torn object."""
        if exclusive and self._size(key) is not None:
            # Checked, not atomic (no conditional PUT here): two writers of one key at the same moment may both write.
            raise FileExistsError(errno.EEXIST, "the key is stored", self.url_for(key))
        path = self.path_of(key)
        try:
            fh = self.fs.open(path, "wb")
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url_for(key)}: cannot write") from None
        try:
            for block in iter_blocks(src):
                fh.write(block)  # past the block size this sends a part
            fh.close()
        except BaseException as err:
            with contextlib.suppress(Exception):  # the store may be gone: the failure worth naming is the first
                discard = getattr(fh, "discard", None)
                if discard:
                    discard()  # aborts a multipart upload
            fh.closed = True  # else garbage collection would close() it, committing what was sent so far
            if isinstance(err, remote.store_exceptions()):
                raise remote.storage_error(err, f"{self.url_for(key)}: write failed") from None
            raise

    def _remove(self, key: str) -> bool:
        if self._size(key) is None:
            return False
        try:
            self.fs.rm_file(self.path_of(key))
            return True
        except FileNotFoundError:
            return False
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url_for(key)}: cannot delete") from None

    def _index_files(self, chunk: str) -> list[str]:
        try:
            listing = self.fs.ls(f"{self.prefix}/{INDEX}/{chunk}", detail=False)
        except FileNotFoundError:
            return []
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{INDEX}/{chunk}: cannot list") from None
        return [name for path in listing if KEY_PATTERN.fullmatch(name := path.rstrip("/").rsplit("/", 1)[-1])]

    def _has_entry(self, chunk: str, key: str) -> bool:
        try:
            return bool(self.fs.exists(f"{self.prefix}/{INDEX}/{chunk}/{key}"))
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{INDEX}/{chunk}/{key}") from None

    def _write_entry(self, chunk: str, key: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(f"{self.prefix}/{INDEX}/{chunk}/{key}", data)  # one PUT: atomic
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{INDEX}/{chunk}/{key}: cannot write") from None

    def _remove_entry(self, chunk: str, key: str) -> None:
        try:
            self.fs.rm_file(f"{self.prefix}/{INDEX}/{chunk}/{key}")
        except FileNotFoundError:
            pass
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{INDEX}/{chunk}/{key}: cannot delete") from None

    def _entries(self) -> Iterator[tuple[str, str]]:
        root = f"{self.prefix}/{INDEX}"
        try:
            found = self.fs.find(root)
        except FileNotFoundError:
            return
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{INDEX}: cannot list") from None
        for path in found:
            names = path[len(root) + 1 :].split("/")
            if len(names) == 2 and all(KEY_PATTERN.fullmatch(name) for name in names):
                yield names[0], names[1]

    def _upload_path(self, key: str, upload: str) -> str:
        return f"{self.prefix}/{UPLOADS}/{key}/{upload}"

    def _parts(self, key: str, upload: str) -> list[tuple[int, int]]:
        try:
            listing = self.fs.ls(self._upload_path(key, upload), detail=True)
        except FileNotFoundError:
            return []
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}: cannot list upload {upload}") from None
        return sorted((int(name, 16), int(info["size"])) for info in listing
                      if info.get("type") == "file" and _PART_NAME.fullmatch(name := info["name"].rsplit("/", 1)[-1]))

    def _read_part(self, key: str, upload: str, offset: int) -> bytes:
        path = f"{self._upload_path(key, upload)}/{offset:016x}"
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise UploadConflict(f"upload {upload[:12]} of {key}: the part at {offset} vanished (completed or "
                                 "aborted meanwhile)") from None
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{UPLOADS}/{key}/{upload}") from None

    def _write_part(self, key: str, upload: str, offset: int, data: bytes) -> None:
        try:
            self.fs.pipe_file(f"{self._upload_path(key, upload)}/{offset:016x}", data)  # one PUT: atomic
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}: cannot stage a part of upload {upload}") from None

    def _remove_upload(self, key: str, upload: str) -> bool:
        paths = [f"{self._upload_path(key, upload)}/{offset:016x}" for offset, _ in self._parts(key, upload)]
        if not paths:
            return False
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            pass
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}: cannot remove upload {upload}") from None
        return True

    def _uploads(self) -> Iterator[tuple[str, str, float]]:
        staging = f"{self.prefix}/{UPLOADS}"
        try:
            found = self.fs.find(staging, detail=True)
        except FileNotFoundError:
            return
        except remote.store_exceptions() as err:
            raise remote.storage_error(err, f"{self.url}/{UPLOADS}: cannot list") from None
        newest: dict[tuple[str, str], float] = {}
        for path, info in found.items():
            names = path[len(staging) + 1 :].split("/")
            if len(names) == 3 and KEY_PATTERN.fullmatch(names[0]) and KEY_PATTERN.fullmatch(names[1]):
                which = (names[0], names[1])
                newest[which] = max(newest.get(which, 0.0), modified(info))
        for (key, upload), touched in newest.items():
            yield key, upload, touched


def modified(info: dict) -> float:
    """An fsspec listing entry's modification time as a POSIX timestamp (s3fs: LastModified; local: mtime)."""
    stamp = info.get("LastModified") or info.get("mtime") or info.get("created") or 0.0
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


# ---------------------------------------------------------------- a kvcli server as a store


class ServerStore(DictionaryShelf, index.PrefixLookup):
    """The same API over HTTP against `kvcli serve-cache` (docs/server.md), with an optional bearer token."""

    def __init__(self, url: str, token: str | None = None, transport=None, timeout_s: float = 60.0):
        import httpx

        self.url = url.rstrip("/")
        self.dicts_url = f"{self.url}/v1/dicts"
        self._dicts_held = {}
        self.token = remote.read_token(token)
        self.transport = transport
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                   timeout=httpx.Timeout(timeout_s, connect=10.0))

    def url_for(self, key: str) -> str:
        return f"{self.url}/v1/caches/{check_key(key)}"

    def _request(self, method: str, path: str, missing_ok: bool = False, **kwargs):
        """The response; a 404 is returned, not raised, for HEAD, DELETE and with `missing_ok`."""
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise remote.ConnectionFailed(f"{self.url}{path}: {type(err).__name__}: {err}") from None
        return self._checked(response, method, path, missing_ok)

    def _checked(self, response, method: str, path: str, missing_ok: bool = False):
        if response.status_code == 409:
            raise UploadConflict(f"{self.url}{path}: refused{remote.server_message(response)}")
        if response.status_code != 404 or not (missing_ok or method in ("HEAD", "DELETE")):
            try:
                remote.check_status(response, f"{self.url}{path}")
            except remote.Transient as err:
                raise remote.ConnectionFailed(f"{self.url}{path}: {err}{remote.server_message(response)}") from None
        return response

    def size(self, key: str) -> int | None:
        response = self._request("HEAD", f"/v1/caches/{check_key(key)}")
        return None if response.status_code == 404 else int(response.headers["content-length"])

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def read(self, key: str, offset: int, length: int) -> bytes:
        response = self._request("GET", f"/v1/caches/{check_key(key)}",
                                 headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        if response.status_code != 206 or len(response.content) != length:
            raise StorageError(f"{self.url_for(key)}: asked for {length} bytes at {offset}, got "
                               f"{len(response.content)} (HTTP {response.status_code})")
        return response.content

    def open(self, key: str) -> format.ByteSource:
        return remote.RemoteSource(remote.HttpFetcher(self.url_for(key), self.token, self.transport),
                                   dictionary_places=[self.dictionary_place()])

    def _dict_size(self, sha: str) -> int | None:
        response = self._request("HEAD", f"/v1/dicts/{sha}")
        return None if response.status_code == 404 else int(response.headers["content-length"])

    def _read_dict(self, sha: str) -> bytes | None:
        import httpx

        path = f"/v1/dicts/{sha}"
        try:  # streamed and bounded: a server answering without end never fills this process's memory
            with self.client.stream("GET", path) as response:
                if response.status_code == 404:
                    return None
                if response.status_code != 200:
                    response.read()  # the error's message
                    self._checked(response, "GET", path)
                    raise StorageError(f"{self.url}{path}: HTTP {response.status_code} where a dictionary was asked for")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > dictionary.MAX_FILE_BYTES:
                        raise FormatError(f"{self.url}{path}: more than any dictionary's "
                                          f"{dictionary.MAX_FILE_BYTES:,} bytes")
                return bytes(data)
        except httpx.TransportError as err:
            raise remote.ConnectionFailed(f"{self.url}{path}: {type(err).__name__}: {err}") from None

    def _write_dict(self, found: dictionary.Dictionary) -> None:
        # The server checks the bytes against the name and parses them before they are visible.
        self._request("PUT", f"/v1/dicts/{found.sha}", content=found.data,
                      headers={"Content-Type": "application/octet-stream"})

    def put(self, key: str | None, data: Data) -> str:
        """Validated here first (a bad file never crosses the network, nor one whose dictionary the server lacks),
        then validated again by the server."""
        with open_data(data) as src:
            header = validate(src)
            key = checked_key(key, header, getattr(src, "path", "<upload>"))
            self.check_dictionary(src, header, f"cache {key}")
            response = self._request("PUT", f"/v1/caches/{key}", content=iter_blocks(src),
                                     headers={"Content-Length": str(src.size),
                                              "Content-Type": "application/octet-stream"})
        return response.json()["key"]

    def delete(self, key: str) -> bool:
        return self._request("DELETE", f"/v1/caches/{check_key(key)}").status_code != 404

    def check_writable(self) -> None:
        """Asks for the state of an upload nobody made: the server answers it only to a client that may write
        (a writable server, the right token), and it changes nothing. A refusal names the server, not the probe."""
        probe = self._upload_path("0" * 64, "0" * 64)
        try:
            self.upload_state("0" * 64, "0" * 64)
        except StorageError as err:
            raise type(err)(str(err).replace(f"{self.url}{probe}", f"{self.url}: cannot write")) from None

    def upload_state(self, key: str, upload: str) -> dict:
        state = self._request("GET", self._upload_path(key, upload)).json()
        part_bytes = state.get("part_bytes")
        if not isinstance(part_bytes, int) or not 0 < part_bytes <= format.MAX_SEGMENT_BYTES:
            raise StorageError(f"{self.url}: the server sent an unusable part size {part_bytes!r}")
        return state

    def put_part(self, key: str, upload: str, offset: int, data: bytes) -> None:
        self._request("PUT", f"{self._upload_path(key, upload)}/{offset}", content=data,
                      headers={"Content-Type": "application/octet-stream"})

    def complete_upload(self, key: str, upload: str, size: int) -> str:
        import httpx

        # The server reads the whole file back before it answers: allow for that at a slow disk's pace.
        timeout = httpx.Timeout(60.0 + size / 20e6, connect=10.0)
        response = self._request("POST", f"{self._upload_path(key, upload)}/complete", params={"bytes": size},
                                 timeout=timeout)
        return response.json()["key"]

    def abort_upload(self, key: str, upload: str) -> bool:
        return self._request("DELETE", self._upload_path(key, upload)).status_code != 404

    def _upload_path(self, key: str, upload: str) -> str:
        return f"/v1/uploads/{check_key(key)}/{check_hex(upload, 'upload')}"

    def list(self, model: str | None = None) -> list[dict]:
        params = {"model": check_hex(model, "model")} if model else {}
        return self._request("GET", "/v1/caches", params=params).json()["caches"]

    def lookup(self, model: str | None = None, tokens_sha256: str | None = None,
               source_sha256: str | None = None) -> list[dict]:
        params = {name: check_hex(value, name) for name, value in
                  (("model", model), ("tokens_sha256", tokens_sha256), ("source_sha256", source_sha256)) if value}
        return self._request("GET", "/v1/lookup", params=params).json()["caches"]

    def ensure_indexed(self, key: str, chunks: list[str]) -> bool:
        """Nothing to do from here: a server indexes what it stores and mends the entries of a stored file when it is
        uploaded again; `kvcli index rebuild` on its own store mends the rest of what a killed server left."""
        return False

    def prefix_hits_for(self, keys: list[str]) -> list[PrefixHit]:
        """One request for the whole chain: the server reads its index and verifies the files (index.best_hits)."""
        keys = index.check_chunk_keys(keys)
        response = self._request("POST", "/v1/prefix", json={"chunk_keys": keys})
        try:
            hits = [PrefixHit.from_json(hit, self.url) for hit in response.json()["hits"]]
        except (TypeError, KeyError, ValueError) as err:
            raise StorageError(f"{self.url}/v1/prefix: an unusable answer: {err}") from None
        if any(hit.tokens > len(keys) * index.CHUNK_TOKENS for hit in hits):
            raise StorageError(f"{self.url}/v1/prefix: a hit longer than the prompt")
        return sorted(hits, key=index.rank)

    def close(self) -> None:
        self.client.close()


def stored_soundly(target, key: str) -> bool:
    """Whether the store holds `key` as a file whose header reads, fits the stored size and gives that key. A
    truncated object, or another cache's bytes under the key, is replaced by a push rather than trusted (one
    ranged read; the segments' CRCs are checked by whoever reads them)."""
    size = target.size(key)
    if size is None:
        return False
    try:
        with StoredSource(target, key, size) as src:
            checked_key(key, format.read_header(src), src.path)
    except (FormatError, InputError):  # damaged, or gone since size() answered
        return False
    return True


def push(target, path: str | Path) -> dict:
    """Validate a file and store it under its key; nothing is sent when the store has it. A file larger than one
    part goes to a remote store in parts: parts staged by an earlier run that broke off are not sent again.
    Returns key, url, bytes, uploaded, resumed_from (bytes from the start already staged) and sent.

    A file that names a dictionary it does not carry takes it from where a reader of the file looks (beside it, the
    user's cache, kvcli's shipped ones; the target store last) and puts it first, even when the file is stored
    already; found nowhere, it is a DictionaryMissing naming every place, and nothing is sent."""
    with format.FileSource(path) as src:
        header = validate(src)
        key = checked_key(None, header, src.path)
        carried = dictionary.to_carry(src, header, src.path,
                                      dictionary.places_for(src) + [target.dictionary_place()])
        result = {"key": key, "url": target.url_for(key), "bytes": src.size, "uploaded": False, "resumed_from": 0,
                  "sent": 0}
        if carried is not None:  # also for a file stored already: one put there past the store's check is mended
            remote.retried(lambda: target.put_dictionary(carried), remote.ConnectionFailed)
        if stored_soundly(target, key):
            return result
        result["uploaded"] = True
        if isinstance(target, DirStore) or src.size <= getattr(target, "part_bytes", PART_BYTES):
            # Nothing worth resuming: one atomic put.
            remote.retried(lambda: target.put(key, src.path), remote.ConnectionFailed)
            result["sent"] = src.size
            return result
        upload = header_digest(src, header)
        for attempt in range(2):
            state = remote.retried(lambda: target.upload_state(key, upload), remote.ConnectionFailed)
            part, have = state["part_bytes"], {offset: length for offset, length in state["parts"]}
            if attempt == 0:
                result["resumed_from"] = resumable_prefix(state["parts"], part, src.size)
            for offset in range(0, src.size, part):
                length = min(part, src.size - offset)
                if have.get(offset) != length:
                    data = src.read(offset, length)
                    remote.retried(lambda: target.put_part(key, upload, offset, data), remote.ConnectionFailed)
                    result["sent"] += length
            try:
                remote.retried(lambda: target.complete_upload(key, upload, src.size), remote.ConnectionFailed)
                return result
            except UploadConflict:
                # Another run completed it (its parts are gone), or a sweep took some parts: look again, once.
                if target.exists(key):
                    return result
                if attempt:
                    raise
        raise AssertionError("unreachable")


def url_place(location: str, token: str | None = None, transport=None) -> StorePlace | None:
    """dicts/ of the store a cache URL points into: the server's /v1/dicts for a kvcli server's …/v1/caches/KEY, the
    folder holding KEY.kvc for an object store; None for a URL of any other shape."""
    if "://" not in location:
        return None
    parts = urlsplit(location)
    if parts.scheme in ("http", "https"):
        marker = location.find("/v1/caches/")
        return StorePlace(ServerStore(location[:marker], token, transport)) if marker > 0 else None
    return StorePlace(FsspecStore(location.rsplit("/", 1)[0])) if remote.url_key(location) else None


def open_store(root: str, token: str | None = None, create: bool = False, **options):
    """A store for a directory, an fsspec URL (s3://bucket/prefix) or a kvcli server (http(s)://host:port)."""
    if not isinstance(root, (str, Path)) or not str(root):
        raise UsageError("a store needs a directory or URL")
    root = str(root)
    scheme = urlsplit(remote.check_url(root)).scheme if "://" in root else ""
    if scheme in ("http", "https"):
        return ServerStore(root, token, **options)
    if scheme in ("", "file"):
        return DirStore(root[len("file://"):] if scheme else root, create=create)
    return FsspecStore(root, **options)
