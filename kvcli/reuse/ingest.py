"""Many documents into a cache store: sources, sharding, splitting, batched prefill, and one manifest line each.

The same engine serves `kvcli prefill --out-dir` and Ray Data (PrefillBatches), so both write the same files.
docs/ingest.md describes the behaviour users see.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

from ..codecs.presets import QUALITIES
from ..container import format, keys, kvfile
from ..errors import InputError, KvcliError, StorageError, UsageError
from ..modeling import batching, inference, models
from ..storage import remote
from . import pipeline
from . import prefix as stored_prefix

# Padded tokens per forward pass: about six documents of 300 tokens. Activation memory grows with it;
# bench/ingest.py measures throughput and peak memory against one document per pass.
DEFAULT_BATCH_TOKENS = 2048
# Documents gathered before prefill, in tokens per batch: enough to sort by length and keep padding small.
WINDOW_BATCHES = 4

MANIFEST_FIELDS = ("id", "status", "key", "path", "quality", "tokens", "bytes", "bits_per_element", "seconds",
                   "error", "segment", "segments")
STATUSES = ("written", "skipped", "failed")


# ---------------------------------------------------------------- documents


@dataclass(frozen=True)
class Source:
    """One input document, read only when its shard's run gets to it."""

    id: str
    read: Callable[[], inference.Document]  # raises InputError for a document that cannot be used
    extra: dict = field(default_factory=dict)  # fields carried through to the manifest line


def document_from_text(name: str, text: object) -> inference.Document:
    """A document given as text (a JSONL or Ray record): the same refusals as a file."""
    if not isinstance(text, str):
        raise InputError(f"{name}: \"text\" must be a string")
    raw = text.encode("utf-8", errors="surrogatepass")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{name}: not UTF-8 text (invalid byte at offset {err.start})") from None
    if len(raw) > inference.MAX_DOCUMENT_BYTES:
        raise InputError(f"{name}: larger than {inference.MAX_DOCUMENT_BYTES:,} bytes, more than any document "
                         "kvcli can prefill in one piece")
    if not text.strip():
        raise InputError(f"{name}: document is empty")
    return inference.Document(name, text, len(raw), hashlib.sha256(raw).hexdigest())


def _failing(message: str) -> Callable[[], inference.Document]:
    def read() -> inference.Document:
        raise InputError(message)

    return read


def _file(path: str) -> Source:
    return Source("<stdin>" if path == "-" else path, lambda: inference.read_document(path))


def walk_directory(root: str) -> list[str]:
    """Every regular file under `root`, recursively, in sorted order; hidden entries (kvcli's own temporaries
    among them) and .kvc files are left out, and symbolic links to directories are not followed."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [os.path.join(directory, f) for f in sorted(files)
                  if not f.startswith(".") and not f.endswith(".kvc")]
    return found


def file_sources(args: Iterable[str]) -> Iterator[Source]:
    """Files as given, directories walked, globs expanded (`**` recursive), `-` for stdin. A missing path or a
    pattern that matches nothing becomes a failed document, reported like any other."""
    for arg in args:
        if arg == "-" or os.path.isfile(arg):
            yield _file(arg)
        elif os.path.isdir(arg):
            yield from (_file(p) for p in walk_directory(arg))
        elif glob.has_magic(arg):
            matches = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            if not matches:
                yield Source(arg, _failing(f"{arg}: no files match"))
            yield from (_file(p) for p in matches)
        else:
            yield _file(arg)  # reading it says why not: no such file, permission denied


def record_source(record: object, where: str, text_field: str = "text") -> Source:
    """A document given as a record {"id": str or int, "text": str, ...}; other fields are carried through."""
    if not isinstance(record, dict):
        return Source(where, _failing(f"{where}: expected a JSON object with \"id\" and \"text\""))
    doc_id = record.get("id")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        return Source(where, _failing(f"{where}: \"id\" must be a non-empty string or an integer"))
    doc_id = str(doc_id)
    extra = {k: v for k, v in record.items() if k not in ("id", text_field)}
    if text_field not in record:
        return Source(doc_id, _failing(f"{doc_id}: no \"{text_field}\" field"), extra)
    text = record[text_field]
    return Source(doc_id, lambda: document_from_text(doc_id, text), extra)


def jsonl_sources(path: str) -> Iterator[Source]:
    """One document per line of newline-delimited JSON; `-` reads stdin. The file is opened at once, so a
    missing one is refused before any work. A line that is not a usable record is a failed document named
    `FILE:LINE`; a line longer than any document is skipped unread."""
    fh, name = inference.open_input(path, "a JSONL file")
    return _records(fh, name, close=path != "-")


def _records(fh, name: str, close: bool) -> Iterator[Source]:
    limit = inference.MAX_DOCUMENT_BYTES * 2  # JSON escapes can double a document's size
    try:
        for number, raw in enumerate(_bounded_lines(fh, limit), start=1):
            where = f"{name}:{number}"
            if raw is None:
                yield Source(where, _failing(f"{where}: line longer than {limit:,} bytes"))
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as err:
                yield Source(where, _failing(f"{where}: not valid JSON: {str(err)[:120]}"))
                continue
            yield record_source(record, where)
    finally:
        if close:
            fh.close()


def _bounded_lines(fh, limit: int) -> Iterator[bytes | None]:
    """Lines of a binary stream, reading at most `limit` + 1 bytes at a time; None stands for an over-long line."""
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # discard the rest of the line
                line = fh.readline(limit + 1)
            yield None
        else:
            yield line


def count_jsonl(path: str) -> int | None:
    """Non-empty lines of a regular file, for a progress total; None for stdin or anything unreadable."""
    if path == "-" or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


# ---------------------------------------------------------------- sharding


def parse_shard(text: str) -> tuple[int, int]:
    """`i/N` with 0 <= i < N, as array-job schedulers number their tasks from 0."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, for example 0/4") from None
    if not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def shard_of(doc_id: str, count: int) -> int:
    """A stable split by document id (SHA-256, unlike Python's salted hash()): every task of an array job
    agrees on it, and splitting a document keeps its segments in its shard."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % count


def in_shard(sources: Iterable[Source], index: int, count: int) -> Iterator[Source]:
    return (s for s in sources if shard_of(s.id, count) == index)


# ---------------------------------------------------------------- the engine


@dataclass(frozen=True)
class Settings:
    """How a run encodes (the options every cache gets) and how it cuts and batches documents; checked when built."""

    encode: pipeline.EncodeOptions = pipeline.EncodeOptions()
    max_tokens: int | None = None  # None: the model's context
    split: bool = False
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # below two documents' worth: one document per forward pass
    chat_prefix: bool = False  # store the chat prompt's tokens up to the question (reuse/prefix.py), not the document's
    # Several presets stored from one prefill (`--quality high,balanced,small`): the levels a streaming reader
    # chooses among (docs/streaming.md). Empty: encode.quality alone.
    qualities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.chat_prefix and self.split:
            raise UsageError("--chat-prefix stores where a chat prompt starts; it cannot be cut into --split segments")
        for name, value in (("--max-tokens", self.max_tokens), ("--batch-tokens", self.batch_tokens)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise UsageError(f"{name} must be an integer of at least 1, not {value!r}")
        if self.qualities:
            check_qualities(self.qualities)
        self.levels()  # and every other option of each level, as EncodeOptions check them

    def levels(self) -> list[pipeline.EncodeOptions]:
        """The options of every level written, in the order given."""
        return [replace(self.encode, quality=q) for q in self.qualities] or [self.encode]


def check_qualities(qualities) -> tuple[str, ...]:
    """Presets named for levels (prefill --out-dir, the Ray path, push --quality): known ones, at least one, each
    once."""
    qualities = tuple(qualities)
    for quality in qualities:
        if quality not in QUALITIES:
            raise UsageError(f"unknown --quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    if not qualities:
        raise UsageError("--quality names no preset")
    if len(set(qualities)) != len(qualities):
        raise UsageError(f"--quality names a preset twice: {','.join(qualities)}")
    return qualities


def parse_qualities(text: str) -> tuple[str, ...]:
    """`--quality high,balanced,small`: the presets, in order; one name gives one (the usual single level)."""
    names = tuple(name.strip() for name in text.split(","))
    if any(not name for name in names):
        raise UsageError(f"--quality {text!r}: expected preset names separated by commas")
    return names


@dataclass
class _Job:
    """One document (or segment) with a level whose cache is not in the store yet."""

    lines: list[dict]  # one per level, in the levels' order; those already stored say "skipped"
    doc: inference.Document
    ids: list[int]
    seconds: float  # spent on it so far


def special_prefix(lm: models.LoadedModel) -> list[int]:
    """The special tokens the tokenizer puts before a document (a BOS), which every segment gets."""
    plain = list(lm.tokenizer("a", add_special_tokens=False)["input_ids"])
    full = inference.document_ids(lm, "a")
    cut = len(full) - len(plain)
    return full[:cut] if cut > 0 and full[cut:] == plain else []


def split_ids(ids: list[int], prefix: list[int], max_tokens: int) -> list[list[int]]:
    """Cut a document's tokens into segments of at most max_tokens, each starting with the prefix."""
    if len(ids) <= max_tokens:
        return [ids]
    body, room = ids[len(prefix):], max_tokens - len(prefix)
    if room < 1:
        raise UsageError(f"--max-tokens {max_tokens} leaves no room after the {len(prefix)} special tokens")
    return [prefix + body[i : i + room] for i in range(0, len(body), room)]


def manifest_line(doc_id: str, status: str, extra: dict | None = None, **fields) -> dict:
    """A manifest line: kvcli's fields, then the source's own; a source field that shares a name with one of
    kvcli's is kept under "extra" rather than lost."""
    line = {name: fields.get(name) for name in MANIFEST_FIELDS}
    line.update(id=doc_id, status=status)
    clashes = {k: v for k, v in (extra or {}).items() if k in line or k == "extra"}
    line.update({k: v for k, v in (extra or {}).items() if k not in clashes})
    if clashes:
        line["extra"] = clashes
    return line


class Ingest:
    """Prefill documents into a store. Model, codec and store are set up once; run() may be called many times."""

    def __init__(self, lm: models.LoadedModel, store, settings: Settings = Settings(),
                 on_forward: Callable[[int], None] | None = None):
        self.lm, self.store, self.settings = lm, store, settings
        self.on_forward = on_forward  # told the tokens of each forward pass as it ends (progress between lines)
        self.levels = [(options, options.codec(lm)) for options in settings.levels()]
        self.lossless = all(codec.lossless for _, codec in self.levels)
        limits = [x for x in (settings.max_tokens, lm.max_tokens()) if x]
        self.max_tokens = min(limits) if limits else 0  # 0: the model states no context length
        if settings.split and not self.max_tokens:
            raise UsageError("--split needs --max-tokens: the model does not state its context length")
        self.prefix = special_prefix(lm)
        if settings.chat_prefix:
            stored_prefix.check_chat_template(lm)
        self.windows = batching.layer_windows(lm)
        self.batch_tokens = settings.batch_tokens if batching.batchable(lm) else 0
        self.failure: type[KvcliError] | None = None  # the class of the first document's failure
        if getattr(store, "root", None) is not None:  # a directory: a rerun that only skips writes nothing, so
            format.sweep_stale_temporaries(store.root)  # the temporaries of a killed run are swept here
        for _, codec in self.levels:  # before the first file that names one (the store refuses the file otherwise)
            found = pipeline.codec_dictionary(codec)
            if found is not None:
                remote.retried(lambda: store.put_dictionary(found), remote.ConnectionFailed)

    def _failed(self, err: KvcliError) -> str:
        self.failure = self.failure or type(err)
        return str(err)

    def run(self, sources: Iterable[Source]) -> Iterator[dict]:
        """One manifest line per document or segment, in input order. Bad documents are reported on their line
        and the rest carry on; a store that cannot be written stops the run (StorageError)."""
        window: list[dict | _Job] = []
        pending = 0
        for source in sources:
            for entry in self._entries(source):
                window.append(entry)
                pending += len(entry.ids) if isinstance(entry, _Job) else 0
                if pending >= max(1, self.batch_tokens) * WINDOW_BATCHES or not self.batch_tokens:
                    yield from self._flush(window)
                    window, pending = [], 0
        yield from self._flush(window)

    def _entries(self, source: Source) -> Iterator[dict | _Job]:
        start = time.perf_counter()
        try:
            doc = source.read()
            segments = self._segments(doc)
        except KvcliError as err:
            if isinstance(err, StorageError):
                raise
            error, seconds = self._failed(err), round(time.perf_counter() - start, 3)
            yield [manifest_line(source.id, "failed", source.extra, error=error, seconds=seconds,
                                 quality=options.quality)
                   for options, _ in self.levels]  # a line per level, as for a document that succeeds
            return
        share = (time.perf_counter() - start) / len(segments)
        for number, ids in enumerate(segments):
            seg = {} if len(segments) == 1 else {"segment": number, "segments": len(segments)}
            doc_id = source.id if not seg else f"{source.id}#{number}"
            # The keys are known before the forward pass, so caches already stored cost no prefill.
            lines = []
            for options, codec in self.levels:
                key = keys.derive_key(self.lm.identity, self.lm.dtype, {"name": codec.name, "params": codec.params()},
                                      ids)
                stored = self.store.exists(key)
                if stored:
                    # a run killed between a file and its index entries left the file unindexed: mend that here
                    self.store.ensure_indexed(key, keys.chunk_keys(self.lm.identity, self.lm.dtype, ids))
                lines.append(manifest_line(doc_id, "skipped" if stored else "pending", source.extra,
                                           key=key, path=self.store.url_for(key), quality=options.quality,
                                           tokens=len(ids), seconds=round(share, 3), **seg))
            done = all(line["status"] == "skipped" for line in lines)
            yield lines if done else _Job(lines, doc, ids, share)

    def _segments(self, doc: inference.Document) -> list[list[int]]:
        if not self.settings.split:
            inference.check_document_size(self.lm, doc)
        if self.settings.chat_prefix:
            ids = stored_prefix.chat_prefix_ids(self.lm, doc.text)
        else:
            ids = inference.document_ids(self.lm, doc.text)
        if not self.max_tokens or len(ids) <= self.max_tokens:
            return [ids]
        if not self.settings.split:
            raise InputError(f"{doc.name}: the document is {len(ids)} tokens, more than the {self.max_tokens} "
                             "allowed (the model's context or --max-tokens); pass --split to cut it into segments")
        return split_ids(ids, self.prefix, self.max_tokens)

    def _flush(self, window: list[dict | _Job]) -> Iterator[dict]:
        jobs = [e for e in window if isinstance(e, _Job)]
        for group in batching.plan_batches([len(j.ids) for j in jobs], self.batch_tokens):
            batch = [jobs[i] for i in group]
            start = time.perf_counter()
            caches = batching.prefill_batch(self.lm, [j.ids for j in batch], self.windows, not self.lossless)
            forward = time.perf_counter() - start
            total = sum(len(j.ids) for j in batch)
            if self.on_forward is not None:
                self.on_forward(total)
            for job, kv in zip(batch, caches):
                job.seconds += forward * len(job.ids) / total
                self._write(job, kv)
        for entry in window:
            yield from entry.lines if isinstance(entry, _Job) else entry

    def _write(self, job: _Job, kv) -> None:
        """Each missing level encoded from the one prefill; a line's seconds are the prefill's share plus its own
        encoding and storing."""
        for line, (options, codec) in zip(job.lines, self.levels):
            if line["status"] == "skipped":
                continue
            start = time.perf_counter()
            try:
                pipeline.check_finite(kv, options, line["id"])
                meta, parts = pipeline.encode_cache(kv, self.lm.identity, codec, options.chunk_tokens,
                                                    pipeline.provenance(job.doc), options.backend)
                data = encode_file(meta, parts)
                self.store.put(line["key"], data)  # validated, then stored atomically under the key we expect
            except StorageError as err:
                line.update(status="failed", error=str(err))
                raise
            except InputError as err:
                line.update(status="failed", error=self._failed(err))
            else:
                size = len(data)
                elements = sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))
                line.update(status="written", bytes=size, bits_per_element=round(size * 8 / elements, 3))
            finally:
                line["seconds"] = round(job.seconds + time.perf_counter() - start, 3)


def encode_file(meta: dict, parts) -> bytes:
    from ..container.format import build_header

    return b"".join([build_header(meta, parts)] + [p.data for p in parts])


# ---------------------------------------------------------------- Ray Data


class PrefillBatches:
    """A callable class for `ray.data.Dataset.map_batches(PrefillBatches, fn_constructor_kwargs=..., concurrency=N)`.

    Each actor loads the model once, writes `.kvc` files to the store itself and returns only manifest rows
    (MANIFEST_FIELDS plus the input's other columns). Rows need "id" and "text" columns (`text_field` renames
    the latter). Use batch_format="numpy" (Ray's default) or "pandas".
    """

    def __init__(self, store: str, model: str | None = None, dtype: str = "float32", quality: str = "balanced",
                 step_scale: float = 1.0, sinks: int | None = None, chunk_tokens: int = kvfile.DEFAULT_CHUNK_TOKENS,
                 max_tokens: int | None = None, split: bool = False, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 text_field: str = "text"):
        from ..storage.store import open_store

        qualities = parse_qualities(quality)
        encode = pipeline.EncodeOptions(quality=qualities[0], step_scale=step_scale, sinks=sinks,
                                        chunk_tokens=chunk_tokens)
        settings = Settings(encode, max_tokens=max_tokens, split=split, batch_tokens=batch_tokens,
                            qualities=qualities if len(qualities) > 1 else ())
        self.text_field = text_field
        target = open_store(store, create=True)
        target.check_writable()  # before the model loads, as for prefill --out-dir
        self.ingest = Ingest(models.ModelChoice(model, dtype).load(), target, settings)

    def __call__(self, batch) -> dict[str, list]:
        columns = {name: _plain_list(values) for name, values in dict(batch).items()}
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        sources = [record_source(row, f"row {i}", self.text_field) for i, row in enumerate(rows)]
        lines = list(self.ingest.run(sources))
        names = list(MANIFEST_FIELDS) + [c for c in columns if c not in MANIFEST_FIELDS and c != self.text_field]
        return {name: [line.get(name) for line in lines] for name in names}


def _plain_list(values) -> list:
    """A batch column (numpy array, pandas Series or list) as Python values, so JSON and str() see them plainly."""
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    return [v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v for v in values]
