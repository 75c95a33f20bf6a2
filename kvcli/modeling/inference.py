"""Prefill and greedy decoding: the only code that runs the model forward."""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ..errors import InputError, UsageError
from . import importance
from .kvcache import KVCache, from_model_cache, to_model_cache
from .models import LoadedModel, cache_argument, logits_argument

# A generous bound on UTF-8 bytes per token: lets a document be refused as too long before it is tokenized.
BYTES_PER_TOKEN = 64
# Nothing is read past this before the model is known: /dev/zero or a stray disk image fails at once.
MAX_DOCUMENT_BYTES = 64 << 20


@dataclass(frozen=True)
class Document:
    name: str  # the path, or <stdin>
    text: str
    size: int  # bytes as read
    sha256: str  # of the bytes as read: the provenance recorded in the .kvc header

    def provenance(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.size}


def open_input(path: str, expected: str) -> tuple[BinaryIO, str]:
    """A binary handle on `path` (stdin for `-`) and the name errors use; failures are InputError lines."""
    name = "<stdin>" if path == "-" else path
    if path == "-" and sys.stdin is None:
        raise InputError(f"{name}: stdin is closed (<&-); pipe {expected} in or give its path")
    try:
        return (sys.stdin.buffer if path == "-" else open(path, "rb")), name
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, expected {expected}") from None
    except PermissionError:
        raise InputError(f"{name}: permission denied") from None
    except OSError as err:
        raise InputError(f"{name}: cannot read: {err.strerror}") from None


def read_document(path: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Document:
    """The document; `-` reads stdin. Refuses missing, empty, non-UTF-8 and over-long input, reading at most
    max_bytes + 1 bytes."""
    fh, where = open_input(path, "a text document")
    try:
        raw = fh.read(max_bytes + 1)
    except OSError as err:
        raise InputError(f"{where}: cannot read: {err.strerror}") from None
    finally:
        if path != "-":
            fh.close()
    if len(raw) > max_bytes:
        raise InputError(f"{where}: larger than {max_bytes:,} bytes, more than any document kvcli can prefill "
                         "in one piece")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not UTF-8 text (invalid byte at offset {err.start})") from None
    if not text.strip():
        raise InputError(f"{where}: document is empty")
    return Document(where, text, len(raw), hashlib.sha256(raw).hexdigest())


def check_document_size(lm: LoadedModel, doc: Document) -> None:
    """Refuse, before tokenizing, a document that cannot fit the model's context at BYTES_PER_TOKEN."""
    limit = lm.max_tokens()
    if limit and doc.size > limit * BYTES_PER_TOKEN:
        raise InputError(f"{doc.name}: {doc.size:,} bytes cannot fit the model's context of {limit} tokens "
                         f"(more than {BYTES_PER_TOKEN} bytes per token)")


def document_ids(lm: LoadedModel, text: str) -> list[int]:
    """Document tokens, with the tokenizer's own special tokens (a BOS where the model expects one)."""
    return list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])


def prompt_ids(lm: LoadedModel, text: str) -> list[int]:
    """Prompt tokens, appended after the document with no special tokens of their own."""
    if not text:
        raise UsageError("the prompt is empty")
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise UsageError("the prompt tokenizes to nothing")
    return ids


def check_length(lm: LoadedModel, n: int, what: str) -> None:
    limit = lm.max_tokens()
    if limit and n > limit:
        raise InputError(f"{what} is {n} tokens, longer than the model's context of {limit} tokens")


def _forward(lm: LoadedModel, ids: list[int], cache, last_only: bool = False):
    """Logits of every position of `ids`, or of the last one only: the output layer over a large vocabulary is
    about a fifth of a small model's prefill, wasted where only the cache or the next token is wanted."""
    device = next(lm.model.parameters()).device
    inputs = torch.tensor([ids], dtype=torch.long, device=device)
    # The cache object is filled in place.
    return lm.model(input_ids=inputs, use_cache=True, **{cache_argument(lm.model): cache},
                    **logits_argument(lm.model, last_only)).logits[0]


def empty_cache(lm: LoadedModel):
    from transformers import DynamicCache

    return DynamicCache(config=lm.model.config)


@torch.inference_mode()
def prefill(lm: LoadedModel, ids: list[int], attention: bool = False) -> KVCache:
    """The document's cache; with `attention`, also the attention its tokens receive (for lossy encoding)."""
    check_length(lm, len(ids), "the document")
    cache = empty_cache(lm)
    if not attention:
        _forward(lm, ids, cache, last_only=True)
        return from_model_cache(cache, ids)
    with importance.recording(lm, [len(ids)]) as rows:
        _forward(lm, ids, cache, last_only=True)
    kv = from_model_cache(cache, ids)
    kv.attention = importance.held(rows[0] if rows else None, kv.keys)
    return kv


@torch.inference_mode()
def measure_attention(lm: LoadedModel, kv: KVCache) -> list[torch.Tensor] | None:
    """The attention kv's tokens receive, as prefill(attention=True) measures it, for a cache that came without it
    (decoded from a file): only the last importance.QUERIES tokens run again, after the cache of the ones before.
    None where a layer holds a sliding window (the cache lacks the keys before it) or the model cannot be
    measured."""
    if any(kv.token_start(i) for i in range(kv.num_layers)):
        return None
    n = kv.num_tokens
    start = max(0, n - importance.QUERIES)
    dtype = lm.model.dtype
    past = KVCache(kv.token_ids[:start], [k[:, :start].to(dtype) for k in kv.keys],
                   [v[:, :start].to(dtype) for v in kv.values])
    cache = to_model_cache(past, lm.model) if start else empty_cache(lm)
    with importance.recording(lm, [n], start) as rows:
        _forward(lm, kv.token_ids[start:], cache, last_only=True)
    return importance.held(rows[0] if rows else None, kv.keys)


@torch.inference_mode()
def extend(lm: LoadedModel, kv: KVCache | None, ids: list[int]) -> KVCache:
    """The cache of the cached context `kv` (or none) followed by `ids`: a prefill of `ids` that attends to `kv`.
    The streaming controller recomputes a chunk this way after the chunks it loaded (kvcli/reuse/controller.py)."""
    cache = to_model_cache(kv, lm.model) if kv is not None and kv.num_tokens else empty_cache(lm)
    _forward(lm, ids, cache, last_only=True)
    return from_model_cache(cache, (kv.token_ids if kv is not None else []) + list(ids))


@torch.inference_mode()
def logits_after(lm: LoadedModel, kv: KVCache | None, ids: list[int]) -> torch.Tensor:
    """Logits for each of `ids` given the cached context `kv` (or none): (len(ids), vocab)."""
    cache = to_model_cache(kv, lm.model) if kv is not None else empty_cache(lm)
    return _forward(lm, ids, cache)


def chat_ids(lm: LoadedModel, text: str) -> list[int]:
    """The prompt as the user turn of the model's chat template, ending where the assistant's answer begins.

    The cached document stays in front as context, so a cache made by a plain prefill serves chat prompts too."""
    if not text:
        raise UsageError("the prompt is empty")
    if not getattr(lm.tokenizer, "chat_template", None):
        raise UsageError(f"--chat: {lm.name} has no chat template; ask without --chat")
    rendered = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
    return list(lm.tokenizer(rendered, add_special_tokens=False)["input_ids"])


@dataclass
class Answer:
    tokens: list[int]
    text: str
    first_token_s: float  # from the prompt's first forward pass to the first new token
    stopped_by: str  # "eos", "stop" or "length"


@torch.inference_mode()
def answer(lm: LoadedModel, kv: KVCache | None, ids: list[int], max_new_tokens: int,
           stop: list[str] = ()) -> Answer:
    """Greedy continuation of `ids` after the cached context `kv`, ended by EOS, a stop string (cut off, not
    printed) or max_new_tokens. `kv` is not modified, so one decoded cache serves many prompts."""
    context = kv.num_tokens if kv is not None else 0
    check_length(lm, context + len(ids) + max_new_tokens, "the context plus prompt plus new tokens")
    cache = to_model_cache(kv, lm.model) if kv is not None else empty_cache(lm)
    eos = _eos_ids(lm)
    out: list[int] = []
    step, first, reason, text = ids, 0.0, "length", ""
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        token = int(_forward(lm, step, cache, last_only=True)[-1].argmax())
        if not out:
            first = time.perf_counter() - start
        if token in eos:
            reason = "eos"
            break
        out.append(token)
        if stop:
            text = lm.tokenizer.decode(out, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                return Answer(out, text[:cut], first, "stop")
        step = [token]
    return Answer(out, lm.tokenizer.decode(out, skip_special_tokens=True), first, reason)


def greedy(lm: LoadedModel, kv: KVCache | None, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy token ids after the cached context `kv`; stops at EOS or max_new_tokens."""
    return answer(lm, kv, ids, max_new_tokens).tokens


@torch.inference_mode()
def greedy_tokens(lm: LoadedModel, kv: KVCache | None, ids: list[int], count: int) -> list[int]:
    """Exactly `count` greedy tokens, EOS or not: for comparing two caches position by position."""
    cache = to_model_cache(kv, lm.model) if kv is not None else empty_cache(lm)
    out, step = [], ids
    for _ in range(count):
        step = [int(_forward(lm, step, cache, last_only=True)[-1].argmax())]
        out.append(step[0])
    return out


def _eos_ids(lm: LoadedModel) -> set[int]:
    eos = lm.model.generation_config.eos_token_id if lm.model.generation_config else None
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
