"""Prefill and greedy decoding: the only code that runs the model forward."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .errors import InputError, UsageError
from .kvcache import KVCache, from_model_cache, to_model_cache
from .models import LoadedModel, cache_argument


def read_document(path: str) -> str:
    """The document's text; `-` reads stdin. Refuses missing, empty and non-UTF-8 input."""
    where = "<stdin>" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{where}: is a directory, expected a text document") from None
    except PermissionError:
        raise InputError(f"{where}: permission denied") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not UTF-8 text (invalid byte at offset {err.start})") from None
    if not text.strip():
        raise InputError(f"{where}: document is empty")
    return text


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


def _forward(lm: LoadedModel, ids: list[int], cache):
    arg = cache_argument(lm.model)
    device = next(lm.model.parameters()).device
    inputs = torch.tensor([ids], dtype=torch.long, device=device)
    # The cache object is filled in place; the model's output is only needed for its logits.
    return lm.model(input_ids=inputs, use_cache=True, **{arg: cache}).logits[0]


def empty_cache(lm: LoadedModel):
    from transformers import DynamicCache

    return DynamicCache(config=lm.model.config)


@torch.inference_mode()
def prefill(lm: LoadedModel, ids: list[int]) -> KVCache:
    check_length(lm, len(ids), "the document")
    cache = empty_cache(lm)
    _forward(lm, ids, cache)
    return from_model_cache(cache, ids)


@torch.inference_mode()
def logits_after(lm: LoadedModel, kv: KVCache | None, ids: list[int]) -> torch.Tensor:
    """Logits for each of `ids` given the cached context `kv` (or none): (len(ids), vocab)."""
    cache = to_model_cache(kv, lm.model) if kv is not None else empty_cache(lm)
    return _forward(lm, ids, cache)


@torch.inference_mode()
def greedy(lm: LoadedModel, kv: KVCache | None, ids: list[int], max_new_tokens: int, on_first_token=None) -> list[int]:
    """Greedy continuation of `ids` after the cached context `kv`; stops at EOS or max_new_tokens."""
    context = kv.num_tokens if kv is not None else 0
    check_length(lm, context + len(ids) + max_new_tokens, "the context plus prompt plus new tokens")
    cache = to_model_cache(kv, lm.model) if kv is not None else empty_cache(lm)
    eos = _eos_ids(lm)
    out: list[int] = []
    step = ids
    for _ in range(max_new_tokens):
        logits = _forward(lm, step, cache)
        token = int(logits[-1].argmax())
        if not out and on_first_token is not None:
            on_first_token(token)
        if token in eos:
            break
        out.append(token)
        step = [token]
    return out


@torch.inference_mode()
def greedy_tokens(lm: LoadedModel, kv: KVCache | None, ids: list[int], count: int) -> list[int]:
    """Exactly `count` greedy tokens, EOS or not: for comparing two caches position by position."""
    cache = to_model_cache(kv, lm.model) if kv is not None else empty_cache(lm)
    out, step = [], ids
    for _ in range(count):
        step = [int(_forward(lm, step, cache)[-1].argmax())]
        out.append(step[0])
    return out


def _eos_ids(lm: LoadedModel) -> set[int]:
    eos = lm.model.generation_config.eos_token_id if lm.model.generation_config else None
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
