"""A prompt served from the longest prefix a store holds (docs/format.md, "Prefix index"), and the chat layout a RAG
job sends to vLLM, so that `prefill --chat-prefix` stores exactly the tokens such a request starts with."""

from __future__ import annotations

from ..container import format, kvfile
from ..errors import FormatError, InputError, ModelMismatchError, StorageError, UsageError
from ..modeling import models
from ..modeling.kvcache import KVCache
from ..stdio import write_stderr_text
from ..storage.store import open_ranged
from . import pipeline

CHAT_SEPARATOR = "\n\n"  # between the document and the question, in the one user turn
# Two questions that share no first character: what the chat prompts of one document share is its prefix.
PROBE_QUESTIONS = ("?", "Tell me more.")


def check_chat_template(lm: models.LoadedModel) -> None:
    if not getattr(lm.tokenizer, "chat_template", None):
        raise UsageError(f"{lm.name} has no chat template; prefill and ask without the chat layout")


def chat_ids(lm: models.LoadedModel, document: str, question: str) -> list[int]:
    """One user turn, the document then the question, rendered by the model's chat template up to where the
    answer begins and tokenized as vLLM's chat API does (no special tokens added: the template writes them)."""
    check_chat_template(lm)
    rendered = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": document + CHAT_SEPARATOR + question}], add_generation_prompt=True,
        tokenize=False)
    return list(lm.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def chat_prefix_ids(lm: models.LoadedModel, document: str) -> list[int]:
    """The tokens every chat prompt about `document` starts with, whatever its question: the template's opening,
    the document and what follows it up to the question. Found as what two prompts with different questions share,
    so a template's own text and a merge of tokens across the document's end are accounted for as they fall."""
    a, b = (chat_ids(lm, document, question) for question in PROBE_QUESTIONS)
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


def load_stored_prefix(store, lm: models.LoadedModel, ids: list[int]):
    """The longest stored prefix of `ids` decoded for `lm`, and its hit; (None, None) when the store holds none.

    At most len(ids) - 1 tokens are loaded: the model computes at least the last one, which gives the logits of the
    first new token. The file is checked against the model and the tokens before anything is decoded. A file that
    fails to load (damaged, gone since the lookup, a store that fails mid-read, another layout) costs a one-line
    warning on stderr and the next file that holds the prefix is tried; when none loads, the caller computes every
    token: a bad stored file may slow an answer, never change it."""
    hits = store.prefix_hits(lm.identity, lm.dtype, ids)
    if not hits or len(ids) < 2:
        return None, None
    n = min(hits[0].tokens, len(ids) - 1)
    for i, hit in enumerate(hits, 1):
        try:
            kv = _load(store, hit, lm, ids, n)
        except (FormatError, InputError, StorageError, ModelMismatchError) as err:
            then = "trying another stored file" if i < len(hits) else f"computing its {n} tokens instead"
            write_stderr_text(f"Warning: {hit.file_key}: cannot load the stored prefix, {then}: "
                              f"{' '.join(str(err).split())}\n")
            continue
        if kv is not None:
            return kv, hit
    return None, None


def _load(store, hit, lm: models.LoadedModel, ids: list[int], n: int) -> KVCache | None:
    with open_ranged(store, hit.file_key, hit.bytes) as src:
        header = format.read_header(src)
        where = getattr(src, "path", hit.file_key)
        pipeline.check_identity(header, lm, where)
        if header.token_ids[:n] != ids[:n]:  # the index is a hint: the file decides
            return None
        pipeline.check_layout(header.layers, header.token_ids[:n], lm, where)
        kv = kvfile.PrefixReader(src, header, n).cache(next(lm.model.parameters()).device)
    if kv.dtype != lm.model.dtype:
        kv = KVCache(kv.token_ids, [k.to(lm.model.dtype) for k in kv.keys], [v.to(lm.model.dtype) for v in kv.values])
    return kv
