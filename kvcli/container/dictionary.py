"""Dictionaries: what a codec shares across every cache of one model (kvq version 4's per-head transforms), stored
once as a content-addressed `.kvd` file and named by its SHA-256 in the headers of the files that need it.

A dictionary lives at `dicts/SHA256.kvd` under a store's root and under the user's cache directory; a file sent
alone can carry its own (the container aux segment `dictionary`, `kvcli encode --self-contained`). A reader looks
in the file itself, then in each place its source names (the file's directory, its store), then in the user's
cache; a dictionary found nowhere is a FormatError that names it and every place looked in. Byte layout:
docs/format.md, "Dictionaries".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ..errors import FormatError
from ..stdio import write_stderr_text
from . import format, identity
from .format import FileSource

MAGIC = b"KVCDICT\x00"
VERSION = 1
PREAMBLE = struct.Struct("<8sHI")  # magic, version, header length
MAX_HEADER_BYTES = 1 << 16
MAX_PAYLOAD_BYTES = 256 << 20  # a 4,096-dim model's transforms, 16 bits each, fit many times over
MAX_FILE_BYTES = PREAMBLE.size + MAX_HEADER_BYTES + MAX_PAYLOAD_BYTES  # no dictionary file is larger
DICT_DIR = "dicts"
SUFFIX = ".kvd"
AUX_NAME = "dictionary"  # the container aux segment of a self-contained file
KINDS = ("kvq-transform",)
MODEL_FIELDS = ("architecture", "name", "config_digest", "weights_digest")
SHA = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Dictionary:
    sha: str  # of the whole file: its name
    kind: str
    model: dict  # MODEL_FIELDS of the model it was learned for
    payload: bytes  # the codec's own bytes (codecs/transform.py: Transforms.pack)
    data: bytes  # the whole file, as stored
    where: str = ""  # where it was read from, for messages and reports
    # What a codec made of the payload (its unpacked transforms), shared by every copy parse returns of it.
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return name_of(self.sha)


def sha_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def name_of(sha: str) -> str:
    """A dictionary's path relative to a store root."""
    return f"{DICT_DIR}/{sha}{SUFFIX}"


def check_sha(value: object, where: str) -> str:
    """A dictionary name as a header carries it: 64 lowercase hex digits."""
    if not isinstance(value, str) or not SHA.fullmatch(value):
        raise FormatError(f"{where}: a dictionary is named by 64 lowercase hex digits (its SHA-256), not {value!r}")
    return value


def build(payload: bytes, model_identity: dict, kind: str = KINDS[0]) -> bytes:
    """The bytes of a .kvd file holding `payload` for the model `model_identity` describes."""
    if kind not in KINDS:
        raise ValueError(f"unknown dictionary kind {kind!r}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"dictionary payload of {len(payload):,} bytes is over {MAX_PAYLOAD_BYTES:,}")
    header = json.dumps({"kind": kind, "model": {k: str(model_identity[k]) for k in MODEL_FIELDS},
                         "payload_bytes": len(payload), "payload_sha256": sha_of(payload)},
                        sort_keys=True, separators=(",", ":")).encode()
    return PREAMBLE.pack(MAGIC, VERSION, len(header)) + header + payload


# Dictionaries this process has checked, by name: bytes equal to one of them are that dictionary, checked already.
# Comparing a Gemma 3 dictionary's 4.7 MB costs 0.25 ms where hashing it twice costs 8 ms, once per file decoded.
_CHECKED: OrderedDict[str, Dictionary] = OrderedDict()
CHECKED_KEEP = 8  # models at a time
_CHECKED_LOCK = threading.Lock()
# Dictionary files this process read and checked, by path: the file's signature (device, inode, size, modification
# and change times: a write changes the change time, within one timestamp tick perhaps not, see RACY_NS) taken
# before the read, and the dictionary's name. Decoding
# takes the checked dictionary from _CHECKED while its file keeps that signature instead of reading the file again
# (a Gemma 3 decode read 4.7 MB each time: 3.5 ms of 70). A stat still runs, so a removed file is still missing;
# network filesystems that cache attributes may answer that stat from their cache.
# `kvcli verify` and everything else read the file every time.
_SEEN: OrderedDict[str, tuple[tuple, str]] = OrderedDict()
SEEN_KEEP = 4 * CHECKED_KEEP  # paths: one dictionary may lie in several places


def parse(data: bytes, expect_sha: str | None = None, where: str = "<dictionary>") -> Dictionary:
    """A .kvd file's contents, every field checked; with `expect_sha`, the bytes must hash to it (a dictionary
    is only ever used under the name its contents give it). FormatError naming `where` otherwise."""
    with _CHECKED_LOCK:
        known = _CHECKED.get(expect_sha) if expect_sha is not None else None
        if known is not None:
            _CHECKED.move_to_end(expect_sha)
    if known is not None and known.data == data:
        return replace(known, where=where)
    found = _parse(data, expect_sha, where)
    with _CHECKED_LOCK:
        _CHECKED[found.sha] = found
        while len(_CHECKED) > CHECKED_KEEP:
            _CHECKED.popitem(last=False)
    return found


def _parse(data: bytes, expect_sha: str | None, where: str) -> Dictionary:
    sha = sha_of(data)
    if expect_sha is not None and sha != expect_sha:
        raise FormatError(f"{where}: holds dictionary {sha[:16]}…, not {expect_sha[:16]}… (damaged or misnamed)")
    if len(data) < PREAMBLE.size:
        raise FormatError(f"{where}: truncated dictionary ({len(data)} bytes)")
    magic, version, hlen = PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise FormatError(f"{where}: not a kvcli dictionary (bad magic)")
    if version != VERSION:
        raise FormatError(f"{where}: dictionary version {version} is not supported (this build reads {VERSION})")
    if hlen > MAX_HEADER_BYTES or PREAMBLE.size + hlen > len(data):
        raise FormatError(f"{where}: dictionary header length {hlen} is beyond the file")
    try:
        doc = json.loads(data[PREAMBLE.size : PREAMBLE.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise FormatError(f"{where}: dictionary header is not JSON: {err}") from None
    if not isinstance(doc, dict) or set(doc) != {"kind", "model", "payload_bytes", "payload_sha256"}:
        raise FormatError(f"{where}: dictionary header must hold exactly kind, model, payload_bytes, payload_sha256")
    kind, model, size, digest = doc["kind"], doc["model"], doc["payload_bytes"], doc["payload_sha256"]
    if kind not in KINDS:
        raise FormatError(f"{where}: unknown dictionary kind {kind!r}")
    if (not isinstance(model, dict) or set(model) != set(MODEL_FIELDS)
            or not all(isinstance(v, str) for v in model.values())):
        raise FormatError(f"{where}: dictionary model must hold the strings {', '.join(MODEL_FIELDS)}")
    start = PREAMBLE.size + hlen
    if type(size) is not int or size != len(data) - start:
        raise FormatError(f"{where}: dictionary payload is {len(data) - start} bytes, its header says {size!r}")
    payload = bytes(data[start:])
    if digest != sha_of(payload):
        raise FormatError(f"{where}: dictionary payload checksum mismatch (damaged)")
    return Dictionary(sha, kind, dict(model), payload, bytes(data), where)


def check_model(d: Dictionary, model_identity: dict, where: str) -> None:
    """A dictionary learned for another model would decode garbage: refuse it."""
    for field in ("config_digest", "weights_digest"):
        if d.model[field] != str(model_identity.get(field)):
            raise FormatError(f"{where}: dictionary {d.sha[:16]}… was made for model {d.model['name']!r}, "
                              f"not this file's {model_identity.get('name')!r} ({field} differs)")


def read_file(path: str | Path) -> bytes | None:
    """A dictionary file's bytes, None where there is none. Whatever cannot be one is a FormatError naming it before
    anything is read: not a regular file (a FIFO would block the reader for ever, /dev/zero never end: a symlink in
    dicts/ may point anywhere) or larger than any dictionary. Other OSErrors are the caller's to name."""
    try:  # O_NONBLOCK: opening a FIFO for reading would wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: not a regular file, so not a dictionary")
        if st.st_size > MAX_FILE_BYTES:
            raise FormatError(f"{path}: {st.st_size:,} bytes, more than any dictionary ({MAX_FILE_BYTES:,})")
        return fh.read(MAX_FILE_BYTES + 1)  # a file growing meanwhile fails its name's hash, within this bound


class Place(Protocol):
    """Somewhere dictionaries may be: `where` for messages, `read(sha)` gives the file's bytes or None."""

    where: str

    def read(self, sha: str) -> bytes | None: ...


class DirPlace:
    """`ROOT/dicts/` of a directory: a directory store's root, a file's own directory, the user's cache."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.where = str(self.root / DICT_DIR)

    def file_of(self, sha: str) -> Path:
        return self.root / name_of(sha)

    def read(self, sha: str) -> bytes | None:
        try:
            return read_file(self.file_of(sha))
        except OSError as err:
            raise FormatError(f"{self.file_of(sha)}: cannot read dictionary: {err.strerror}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DirPlace) and other.root.resolve() == self.root.resolve()

    def __hash__(self) -> int:  # equal places (one root reached by two paths) hash alike
        return hash(self.root.resolve())


class CachePlace(DirPlace):
    """`ROOT/dicts/` of a cache kvcli keeps (the user's cache, a `--cache-dir`): its own copies, which it can always
    fetch or learn again. A copy there that fails its checks is discarded and the search goes on; a damaged copy
    elsewhere (a store, a file's directory) is the user's data, and an error naming it."""

    def discard(self, sha: str, err: FormatError) -> None:
        with contextlib.suppress(OSError):
            (self.root / name_of(sha)).unlink()
        write_stderr_text(f"kvcli: {err}: removed it from kvcli's cache\n")


class DictionaryMissing(FormatError):
    """A file names a dictionary that none of the places holds."""

    def __init__(self, sha: str, needed_by: str, places: list[str]):
        self.sha, self.places = sha, places
        looked = ", ".join(places) if places else "nowhere (no place to look)"
        super().__init__(f"{needed_by}: its dictionary {sha} is missing: looked in {looked}")


class ShippedPlace:
    """The dictionaries shipped inside kvcli beside the shipped calibration profiles (the default model's)."""

    where = "kvcli's shipped dictionaries"

    def _entry(self, sha: str):
        from importlib import resources

        return resources.files("kvcli.calibration") / "profiles" / name_of(sha)

    def file_of(self, sha: str) -> Path | None:
        entry = self._entry(sha)
        return entry if isinstance(entry, Path) else None  # None inside a zip: read every time

    def read(self, sha: str) -> bytes | None:
        entry = self._entry(sha)
        return entry.read_bytes() if entry.is_file() else None


def cache_place() -> CachePlace:
    return CachePlace(identity.cache_root())


def own_places() -> list[Place]:
    """Where this machine keeps dictionaries whatever the file: the user's cache, then kvcli's shipped ones."""
    return [cache_place(), ShippedPlace()]


def places_for(source: object) -> list[Place]:
    """Where a source's dictionaries may be: the places it names (a store's root), else a local file's
    directory, then own_places."""
    found: list[Place] = list(getattr(source, "dictionary_places", None) or [])
    path = getattr(source, "path", None)
    if not found and isinstance(source, FileSource):
        found.append(DirPlace(Path(path).parent))
    for place in own_places():
        if place not in found:
            found.append(place)
    return found


def named_by(header: format.Header) -> str | None:
    """The dictionary a file's codec names (checked: 64 lowercase hex), None for a file that needs none."""
    params = header.codec.get("params")
    sha = params.get("dictionary") if isinstance(params, dict) else None
    return None if sha is None else check_sha(sha, "codec params")


def embedded_segment(header: format.Header) -> format.Segment | None:
    """The aux segment in which a self-contained file carries its dictionary, None where it carries none."""
    return next((s for s in header.segments if s.kind == "aux" and s.name == AUX_NAME), None)


def embeds(header: format.Header) -> bool:
    return embedded_segment(header) is not None


def carried(src: format.ByteSource, header: format.Header, name: str) -> Dictionary | None:
    """The dictionary a self-contained file carries, checked as every reader and store checks it (the one its
    codec names, made for its model); None where it carries none."""
    segment = embedded_segment(header)
    if segment is None:
        return None
    sha = named_by(header)
    if sha is None:
        raise FormatError(f"{name}: carries a dictionary its codec does not name")
    return resolve(sha, header, name, [], format.read_segment(src, header, segment))


def to_carry(src: object, header: format.Header, name: str, places: list[Place] | None = None) -> Dictionary | None:
    """The dictionary a copy of this file needs beside it wherever it goes: None when the file needs none or
    carries its own; else found in `places` (default: where a reader of `src` looks) and checked against the
    file's model. DictionaryMissing, naming every place, when it is nowhere."""
    sha = named_by(header)
    if sha is None or embeds(header):
        return None
    return resolve(sha, header, name, places_for(src) if places is None else places)


def resolve(sha: str, header: format.Header, name: str, places: list[Place], embedded: bytes | None = None,
            reread: bool = True) -> Dictionary:
    """The dictionary `sha` for file `name`: the one it embeds, else the first of `places` holding it (`reread`:
    see find); refused when it was made for another model than the file's."""
    found = parse(embedded, sha, f"{name} (embedded)") if embedded is not None else find(sha, places, name, reread)
    check_model(found, header.model, name)
    return found


def find(sha: str, places: list[Place], needed_by: str, reread: bool = True) -> Dictionary:
    """The dictionary named `sha` from the first place holding it (checked against its name);
    DictionaryMissing naming every place otherwise. Without `reread`, a file this process read and checked and
    that has not changed since is not read again (_SEEN)."""
    for place in places:
        file_of = getattr(place, "file_of", None)
        path = file_of(sha) if file_of is not None else None
        signature = _signature(path) if path is not None else None
        where = f"{place.where}/{sha}{SUFFIX}"
        if not reread and signature is not None and (known := _unchanged(str(path), signature, sha)) is not None:
            return replace(known, where=where)
        try:
            data = place.read(sha)
            if data is not None:
                found = parse(data, sha, where)
                if signature is not None:
                    _remember(str(path), signature, sha)
                return found
        except FormatError as err:
            if not isinstance(place, CachePlace):
                raise
            place.discard(sha, err)
    raise DictionaryMissing(sha, needed_by, [p.where for p in places])


def _signature(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _unchanged(path: str, signature: tuple, sha: str) -> Dictionary | None:
    """The checked dictionary `sha` if `path` held it when last read and has kept its signature since."""
    with _CHECKED_LOCK:
        if _SEEN.get(path) != (signature, sha) or sha not in _CHECKED:
            return None
        _SEEN.move_to_end(path)
        _CHECKED.move_to_end(sha)
        return _CHECKED[sha]


# A file modified this close to its read may be modified again within the same timestamp tick, unseen (filesystems
# with 1 s or 2 s timestamps, coarse kernel clocks): such a file is read again next time ("racily clean", as git
# says of its index).
RACY_NS = 2_000_000_000


def _remember(path: str, signature: tuple, sha: str) -> None:
    if time.time_ns() - max(signature[3], signature[4]) < RACY_NS:
        return
    with _CHECKED_LOCK:
        _SEEN[path] = (signature, sha)
        _SEEN.move_to_end(path)
        while len(_SEEN) > SEEN_KEEP:
            _SEEN.popitem(last=False)


def save(d: Dictionary, root: str | Path) -> Path:
    """Write `d` under ROOT/dicts/ unless it is there already (content-addressed: same name, same bytes); whatever
    else holds its name (a damaged copy, a FIFO, a link to elsewhere) is replaced. StorageError when it cannot be."""
    from ..errors import StorageError
    from .format import atomic_write

    path = Path(root) / name_of(d.sha)
    try:
        if read_file(path) == d.data:
            return path
    except OSError:
        pass  # replaced below
    except FormatError:  # a FIFO or a link to a device, which atomic_write would refuse to replace: the entry goes
        with contextlib.suppress(OSError):
            path.unlink()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file named dicts, a read-only directory
        raise StorageError(f"{path.parent}: cannot create: {err.strerror}") from None
    atomic_write(str(path), [d.data])
    return path


def save_to_cache(d: Dictionary) -> Path:
    return save(d, identity.cache_root())
