"""`kvcli prefill`: run the model over documents once and write their KV caches.

One document to one file (`-o`), or many into a store (`--out-dir`) with one JSON line per document on stdout
(kvcli/reuse/ingest.py does the work; docs/ingest.md describes it).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, List, Optional

import typer

from ..stdio import is_terminal, write_stderr_text, write_stdout_text
from .common import (
    BackendOpt,
    ChunkOpt,
    DeviceOpt,
    ModelOpt,
    SinksOpt,
    StepScaleOpt,
    check_output,
    emit_json,
    handled,
    status,
    stderr_console,
)

if TYPE_CHECKING:
    from ..modeling.models import ModelChoice
    from ..reuse.ingest import Settings
    from ..reuse.pipeline import EncodeOptions

LOG_EVERY_SECONDS = 10.0  # the heartbeat's interval when stderr is not a terminal, unless $KVCLI_PROGRESS_SECONDS


def prefill(
    docs: Optional[List[str]] = typer.Argument(None, help="Documents: files, directories (walked recursively), "
                                               "globs, or - for stdin"),
    out: Optional[str] = typer.Option(None, "--output", "-o", help="One document: output .kvc file, or - for stdout"),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Many documents: the store to write <key>.kvc into"),
    jsonl: Optional[str] = typer.Option(None, "--jsonl", help='Documents as JSON lines {"id": ..., "text": ...}, '
                                        "or - for stdin (with --out-dir)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: only the documents of shard I of N, by id"),
    split: bool = typer.Option(False, "--split", help="Cut documents longer than --max-tokens into segments"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Tokens per document or segment "
                                             "[default: the model's context]"),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", min=1, help="Padded tokens per forward pass; "
                                     "1 prefills one document at a time [default: 2048]"),
    model: Optional[str] = ModelOpt,
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    quality: str = typer.Option("balanced", "--quality", "-q", help="lossless, high, balanced, small, or raw; with "
                                "--out-dir, several separated by commas (high,balanced,small) are each stored "
                                "from one prefill"),
    step_scale: float = StepScaleOpt,
    sinks: Optional[int] = SinksOpt,
    chunk_tokens: int = ChunkOpt,
    device: str = DeviceOpt,
    backend: str = BackendOpt,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout (with -o FILE; "
                                 "--out-dir always prints JSON lines)"),
    chat_prefix: bool = typer.Option(False, "--chat-prefix", help="Store the tokens a chat prompt about the document "
                                     "starts with (the model's chat template up to the question), as vLLM and "
                                     "`generate --store --chat` see them (docs/format.md, \"Prefix index\")"),
) -> None:
    """Run the model over documents once and write their KV caches as .kvc files."""
    from ..errors import UsageError
    from ..kernels.placement import resolve
    from ..modeling.models import ModelChoice
    from ..reuse import ingest, pipeline

    where = resolve(device, backend)
    qualities = ingest.parse_qualities(quality)
    options = pipeline.EncodeOptions(qualities[0], step_scale, sinks, chunk_tokens, where.backend)
    choice = ModelChoice(model, dtype, where.device)
    docs = docs or []
    if ("-" in docs or jsonl == "-") and is_terminal(sys.stdin):  # a forgotten pipe would look like a hang
        write_stderr_text("kvcli: reading from the terminal; end the input with Ctrl-D\n")
    if out is not None:
        many = [name for name, given in (("--out-dir", out_dir), ("--jsonl", jsonl), ("--shard", shard),
                                         ("--split", split), ("--batch-tokens", batch_tokens),
                                         ("several --quality levels", len(qualities) > 1)) if given]
        if len(docs) != 1 or many:
            raise UsageError("-o writes one document; for " + (", ".join(many) or f"{len(docs)} documents")
                             + " use --out-dir DIR")
        prefill_one(docs[0], out, choice, options, as_json, chat_prefix)
        return
    if out_dir is None:
        raise UsageError("give -o FILE for one document, or --out-dir DIR for many")
    if not docs and jsonl is None:
        raise UsageError("no documents: give files, directories, globs, - or --jsonl FILE")
    if docs.count("-") + (jsonl == "-") > 1:
        raise UsageError("stdin can be read once: give - or --jsonl - , not both")
    settings = ingest.Settings(options, max_tokens, split,
                               ingest.DEFAULT_BATCH_TOKENS if batch_tokens is None else batch_tokens,
                               chat_prefix=chat_prefix, qualities=qualities if len(qualities) > 1 else ())
    prefill_many(docs, jsonl, out_dir, shard, choice, settings)


def prefill_one(doc: str, out: str, choice: ModelChoice, options: EncodeOptions, as_json: bool,
                chat_prefix: bool = False) -> None:
    from ..errors import UsageError
    from ..modeling import inference
    from ..reuse import pipeline

    if as_json and out == "-":
        raise UsageError("--json prints on stdout, which -o - already uses for the cache")
    check_output(out, [doc])  # before the model loads: a bad output must not cost a prefill
    document = inference.read_document(doc)  # bad input fails before the model loads
    with status("loading model"):
        lm = choice.load()
    t0 = time.perf_counter()
    ids = pipeline.checked_ids(lm, document) if not chat_prefix else chat_prefix_ids(lm, document)
    codec = options.codec(lm)
    with status("prefilling and encoding"):
        kv, size = pipeline.prefill_document(document, ids, lm, codec, out, options)
    summary = {"output": out, "tokens": kv.num_tokens, "bytes": size, "quality": options.quality,
               "model": lm.name, "dtype": choice.dtype, "seconds": round(time.perf_counter() - t0, 3)}
    if as_json:
        emit_json(summary)
    elif out != "-":
        write_stderr_text(f"wrote {out}: {kv.num_tokens} tokens, {size:,} bytes ({options.quality})\n")


def chat_prefix_ids(lm, document) -> list[int]:
    from ..modeling import inference
    from ..reuse import prefix

    inference.check_document_size(lm, document)
    ids = prefix.chat_prefix_ids(lm, document.text)
    inference.check_length(lm, len(ids), f"{document.name}: the chat prompt up to the question")
    return ids


def prefill_many(docs: list[str], jsonl: str | None, out_dir: str, shard: str | None, choice: ModelChoice,
                 settings: Settings) -> None:
    from ..reuse import ingest

    index, count = ingest.parse_shard(shard) if shard else (0, 1)
    check_output("-", binary=False)  # the manifest's lines go there
    store = open_writable_store(out_dir)  # before the model loads: a bad store must not cost a model load
    files = list(ingest.file_sources(docs))
    records = ingest.jsonl_sources(jsonl) if jsonl is not None else iter(())
    sources = ingest.in_shard(itertools.chain(files, records), index, count)
    total = sum(ingest.shard_of(s.id, count) == index for s in files)
    lines = ingest.count_jsonl(jsonl) if jsonl is not None else 0
    total = None if lines is None or (lines and count > 1) else (total + lines) * len(settings.levels())
    progress = Progress(total)  # before the model loads: a bad $KVCLI_PROGRESS_SECONDS must not cost a load
    with status("loading model"):
        lm = choice.load()
    engine = ingest.Ingest(lm, store, settings, on_forward=progress.prefilled)
    with progress:
        for line in engine.run(sources):
            progress.emit(line)
    failed = progress.counts["failed"]
    if failed:  # exits with the code of the first failure's class, as if that document had been alone
        noun = "document" if progress.done == 1 else "documents"
        why = "its line on stdout says why" if failed == 1 else "their lines on stdout say why"
        raise engine.failure(f"{failed} of {progress.done} {noun} failed; {why}")


def open_writable_store(spec: str):
    """The store for --out-dir (a directory is created), refused before any work when it cannot take a write."""
    from ..storage.store import open_store

    store = open_store(spec, create=True)
    store.check_writable()
    return store


def progress_interval() -> float:
    from ..errors import UsageError

    text = os.environ.get("KVCLI_PROGRESS_SECONDS")
    if text is None:
        return LOG_EVERY_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0.01 <= seconds <= 86400:  # NaN fails too
        raise UsageError(f"KVCLI_PROGRESS_SECONDS={text!r}: expected seconds between 0.01 and 86400")
    return seconds


class Progress:
    """Documents done, tokens/s and ETA on stderr, never on stdout (the manifest's): a rich bar when stderr is a
    terminal, else a heartbeat line every `interval` seconds from a timer thread, so a long group of forward
    passes still shows the tokens prefilled so far; always a summary at the end."""

    def __init__(self, total: int | None, interval: float | None = None):
        from ..reuse.ingest import STATUSES

        self.total = total
        self.interval = progress_interval() if interval is None else interval
        self.counts = dict.fromkeys(STATUSES, 0)
        self.tokens = 0  # through the model so far, counted per forward pass: skipped documents cost none
        self.start = time.perf_counter()
        self.bar = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "Progress":
        self.start = time.perf_counter()
        if is_terminal(sys.stderr):
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("prefill"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]} tokens/s"), TimeRemainingColumn(),
                           console=stderr_console(), transient=True, redirect_stdout=False)
            self.task = self.bar.add_task("prefill", total=self.total, rate="-")
            self.bar.start()
        else:
            self._beat = threading.Thread(target=self._heartbeat, name="kvcli-progress", daemon=True)
            self._beat.start()
        return self

    def prefilled(self, tokens: int) -> None:
        """Ingest's callback after each forward pass."""
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(self.task, rate=f"{self.rate():,.0f}")

    def emit(self, line: dict) -> None:
        """A manifest line on stdout, flushed (the next job reads as we go), then counted."""
        text = json.dumps(line, ensure_ascii=False) + "\n"
        if self.bar is not None and is_terminal(sys.stdout):
            self.bar.stop()  # the same terminal: the bar steps aside so the line is not drawn over
            try:
                write_stdout_text(text)
            finally:
                self.bar.start()
        else:
            write_stdout_text(text)
        self.counts[line["status"]] += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, rate=f"{self.rate():,.0f}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval):
            self._log()

    def _log(self) -> None:
        write_stderr_text(f"kvcli: {self.describe()}\n")

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def describe(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        noun = "document" if (self.done if self.total is None else self.total) == 1 else "documents"
        c = self.counts
        return (f"{self.done}{of} {noun} ({c['written']} written, {c['skipped']} skipped, {c['failed']} failed), "
                f"{self.tokens:,} tokens prefilled in {time.perf_counter() - self.start:.1f} s "
                f"({self.rate():,.0f} tokens/s)")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.bar is not None:
            self.bar.stop()
        self._log()


def register(app: typer.Typer) -> None:
    app.command()(handled(prefill))
