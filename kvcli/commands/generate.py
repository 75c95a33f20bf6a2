"""`kvcli generate`: answer prompts after a cached context, or after a full prefill of the document (the reference)."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Optional

import typer

from ..stdio import write_stdout_text
from .common import BackendOpt, CacheDirBytesOpt, DeviceOpt, ModelOpt, emit_json, handled, status


def read_prompts(path: str) -> list[dict]:
    """JSON lines, each {"prompt": "...", ...} (other fields are carried to the answer) or a bare JSON string."""
    from ..errors import InputError, UsageError
    from ..modeling.inference import read_document

    doc = read_document(path)
    prompts = []
    for number, line in enumerate(doc.text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise InputError(f"{doc.name}: line {number}: not JSON: {err}") from None
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise InputError(f'{doc.name}: line {number}: expected {{"prompt": "non-empty text", ...}} or a JSON string')
        prompts.append(item)
    if not prompts:
        raise UsageError(f"{doc.name}: no prompts")
    return prompts


def generate(
    prompt: Optional[str] = typer.Argument(None, help="The question or continuation prompt"),
    cache: Optional[list[str]] = typer.Option(None, "--cache", "-c", help=".kvc file holding the context; repeat it "
                                              "to compose several documents' caches in the given order; a URL "
                                              "(http(s)://…/v1/caches/KEY, s3://…/KEY.kvc) streams while it decodes"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Keep local copies of remote caches here "
                                            "(LRU, bounded by --cache-dir-bytes)"),
    cache_dir_bytes: Optional[int] = CacheDirBytesOpt,
    document: Optional[str] = typer.Option(None, "--document", "-d", help="Prefill this document instead (reference path)"),
    store: Optional[str] = typer.Option(None, "--store", help="With --document: load the longest prefix of document "
                                        "and prompt that this store holds (a directory, s3://…, http(s)://…), prefill "
                                        "only the rest; with --chat the prompt is the chat turn [document, question] "
                                        "that `prefill --chat-prefix` stores"),
    token_file: Optional[str] = typer.Option(None, "--token-file", help="With --store on a server: the bearer token "
                                             "file [default: $KVCLI_TOKEN_FILE, then $KVCLI_TOKEN]"),
    prompts_file: Optional[str] = typer.Option(None, "--prompts", help="JSON lines of prompts; one answer line each, "
                                               "paying the model and cache load once"),
    model: Optional[str] = ModelOpt,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Model dtype [default: the cache's, else float32]"),
    device: str = DeviceOpt,
    backend: str = BackendOpt,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="End the answer before this text (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="Ask through the model's chat template: the context stays in "
                              "front, the prompt becomes the user turn"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer, with timings"),
    recompute_fraction: float = typer.Option(0.0, "--recompute-fraction", min=0.0, max=1.0,
                                             help="With --cache: recompute this fraction of the context's tokens, "
                                             "those whose keys the other documents change most (docs/compose.md)"),
    deadline: Optional[str] = typer.Option(None, "--deadline", help="With one --cache in a store: have the context in "
                                           "place by then (1.5s, 800ms), choosing per chunk among the stored quality "
                                           "levels or recomputing (docs/streaming.md)"),
    min_quality: Optional[str] = typer.Option(None, "--min-quality", help="With --deadline: the lowest level it may "
                                              "choose (tiny, small, balanced, high, lossless) [default: small]"),
) -> None:
    """Answer PROMPT after a cached context (--cache) or after a full prefill of a document (--document)."""
    from ..errors import UsageError
    from ..kernels.placement import resolve
    from ..modeling import inference, models
    from ..reuse import pipeline
    from ..storage import remote

    if (not cache) == (document is None):
        raise UsageError("give exactly one of --cache FILE (repeatable) or --document DOC")
    if store is not None and document is None:
        raise UsageError("--store looks up the prefix of --document DOC and the prompt; give --document")
    if cache_dir_bytes is not None and not cache_dir:
        raise UsageError("--cache-dir-bytes bounds --cache-dir; give that too")
    if recompute_fraction and not cache:
        raise UsageError("--recompute-fraction applies to --cache; --document already prefills everything")
    if (prompt is None) == (prompts_file is None):
        raise UsageError("give exactly one of PROMPT or --prompts FILE")
    if prompt == "":
        raise UsageError("the prompt is empty")
    if stop and any(not s for s in stop):
        raise UsageError("--stop needs non-empty text")
    deadline_s = check_deadline(deadline, min_quality, cache, cache_dir, recompute_fraction)
    where = resolve(device, backend)
    items = read_prompts(prompts_file) if prompts_file else [{"prompt": prompt}]
    t0 = time.perf_counter()
    kv, doc, stored, stream = None, None, None, None
    if deadline_s is not None:
        from ..reuse import controller

        with status("loading model"):
            lm = models.load(model, dtype or controller.stored_dtype(cache[0]), where.device)
        model_s = time.perf_counter() - t0
        first_ids = (inference.chat_ids if chat else inference.prompt_ids)(lm, items[0]["prompt"])
        with status("streaming the cache"):
            kv, stream = controller.load(lm, cache[0], deadline_s, min_quality or "small", len(first_ids))
        context_ids = kv.token_ids
    elif cache:
        with contextlib.ExitStack() as stack:
            opened = []
            local = remote.LocalCache(cache_dir, cache_dir_bytes) if cache_dir else None
            for path in cache:
                src, header = pipeline.read_header(path, local)
                stack.enter_context(src)
                opened.append((src, header))
            with status("loading model"):
                lm = models.load(model, dtype or opened[0][1].dtype, where.device)
            model_s = time.perf_counter() - t0
            with status("loading cache" if len(cache) == 1 else f"composing {len(cache)} caches"):
                kv = pipeline.load_composed(opened, lm, recompute_fraction, where.backend)
        context_ids = kv.token_ids
    else:
        doc = inference.read_document(document)
        stored = open_prefix_store(store, token_file) if store is not None else None
        with status("loading model"):
            lm = models.load(model, dtype or "float32", where.device)
        model_s = time.perf_counter() - t0
        inference.check_document_size(lm, doc)
        context_ids = inference.document_ids(lm, doc.text)
    load_s = time.perf_counter() - t0 - model_s
    to_ids = inference.chat_ids if chat else inference.prompt_ids
    for item in items:
        if stored is not None:
            answer_from_store(lm, stored, doc, item, chat, max_new_tokens, stop or [],
                              as_json or prompts_file is not None,
                              {"model_load_s": round(model_s, 4)}, t0)
            continue
        ids = to_ids(lm, item["prompt"])
        started = time.perf_counter()
        # The reference path prefills document and prompt together, as a model without kvcli would.
        result = inference.answer(lm, kv, ids if kv is not None else context_ids + ids, max_new_tokens, stop or [])
        if stream is not None and "ttft_s" not in stream:
            # The deadline counts from the first byte asked for to the first token of the first answer.
            stream["ttft_s"] = round(load_s + result.first_token_s, 4)
            controller.remember_first_token(lm, result.first_token_s)
        if not as_json and not prompts_file:
            write_stdout_text(result.text + "\n")
            continue
        line = {**item, "text": result.text, "tokens": len(result.tokens), "stopped_by": result.stopped_by,
                "context_tokens": len(context_ids), "model_load_s": round(model_s, 4),
                "cache_load_s": round(load_s, 4) if kv is not None else None,
                "ttft_s": round(result.first_token_s, 4), "answer_s": round(time.perf_counter() - started, 4),
                "total_s": round(time.perf_counter() - t0, 4)}
        if stream is not None:
            line["stream"] = {**stream, "deadline_met": stream["ttft_s"] <= deadline_s}
        emit_json(line)


def check_deadline(deadline: str | None, min_quality: str | None, cache: list[str] | None, cache_dir: str | None,
                   recompute_fraction: float) -> float | None:
    """--deadline's seconds (None without it), refused with the options it cannot go with."""
    from ..errors import UsageError
    from ..reuse import controller

    if deadline is None:
        if min_quality is not None:
            raise UsageError("--min-quality bounds the levels --deadline chooses among; give --deadline too")
        return None
    seconds = controller.parse_deadline(deadline)
    if min_quality is not None:
        controller.check_quality(min_quality)
    if not cache or len(cache) != 1:
        raise UsageError("--deadline streams one --cache from a store")
    if cache_dir or recompute_fraction:
        raise UsageError("--deadline chooses each chunk's level itself; it does not take --cache-dir or "
                         "--recompute-fraction")
    return seconds


def open_prefix_store(spec: str, token_file: str | None):
    from ..storage import remote
    from ..storage.store import open_store

    return open_store(spec, remote.read_token(None, token_file) if spec.startswith(("http://", "https://")) else None)


def answer_from_store(lm, stored, doc, item: dict, chat: bool, max_new_tokens: int, stop: list[str], as_json: bool,
                      timings: dict, t0: float) -> None:
    """Document and prompt as one token sequence; the longest stored prefix of it loaded, the rest prefilled."""
    from ..modeling import inference
    from ..reuse import prefix

    if chat:
        ids = prefix.chat_ids(lm, doc.text, item["prompt"])
    else:
        ids = inference.document_ids(lm, doc.text) + inference.prompt_ids(lm, item["prompt"])
    started = time.perf_counter()
    with status("looking up the store"):
        kv, hit = prefix.load_stored_prefix(stored, lm, ids)
    loaded = kv.num_tokens if kv is not None else 0
    load_s = time.perf_counter() - started
    result = inference.answer(lm, kv, ids[loaded:], max_new_tokens, stop)
    if not as_json:
        write_stdout_text(result.text + "\n")
        return
    emit_json({**item, "text": result.text, "tokens": len(result.tokens), "stopped_by": result.stopped_by,
               "context_tokens": len(ids), "stored_tokens": loaded, "computed_tokens": len(ids) - loaded,
               "stored_key": hit.file_key if hit else None, "stored_quality": hit.quality if hit else None,
               **timings, "cache_load_s": round(load_s, 4), "ttft_s": round(result.first_token_s, 4),
               "answer_s": round(time.perf_counter() - started, 4), "total_s": round(time.perf_counter() - t0, 4)})


def register(app: typer.Typer) -> None:
    app.command()(handled(generate))
