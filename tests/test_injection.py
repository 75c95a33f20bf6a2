"""Injected caches must behave exactly like the model's own prefill."""

from __future__ import annotations

import pytest
import torch
from kvcli.codecs.lossless import ZstdCodec
from tiny_models import ARCHITECTURES, SLIDING_WINDOW

from kvcli.container import format, kvfile
from kvcli.modeling import inference

DOC = "Some document text, long enough that a sliding window of eight tokens overflows many times over."
PROMPT = " And then the prompt asks:"


def roundtrip(kv, lm, tmp_path, chunk=16):
    meta, parts = kvfile.encode(kv, lm.identity, ZstdCodec(), chunk)
    path = tmp_path / "c.kvc"
    format.write_kvc(str(path), meta, parts)
    with format.FileSource(path) as src:
        return kvfile.decode(src, format.read_header(src))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_injected_logits_match_full_prefill(arch, tiny_lm, tmp_path):
    lm = tiny_lm(arch)
    doc = inference.document_ids(lm, DOC)
    prompt = inference.prompt_ids(lm, PROMPT)
    kv = roundtrip(inference.prefill(lm, doc), lm, tmp_path)
    with_cache = inference.logits_after(lm, kv, prompt)
    reference = inference.logits_after(lm, None, doc + prompt)[len(doc):]
    assert torch.allclose(with_cache, reference, atol=1e-4, rtol=0)
    assert inference.greedy(lm, kv, prompt, 8) == inference.greedy(lm, None, doc + prompt, 8)


def test_sliding_layers_hold_only_the_window(tiny_lm):
    lm = tiny_lm("gemma3")
    doc = inference.document_ids(lm, DOC)
    kv = inference.prefill(lm, doc)
    held = [k.shape[1] for k in kv.keys]
    assert held == [SLIDING_WINDOW - 1] * 3 + [len(doc)]
    assert kv.token_start(0) == len(doc) - SLIDING_WINDOW + 1


def test_injection_is_sensitive_to_the_cache(tiny_lm):
    """Guards the test above: a perturbed cache must change the logits."""
    lm = tiny_lm("llama")
    doc = inference.document_ids(lm, DOC)
    prompt = inference.prompt_ids(lm, PROMPT)
    kv = inference.prefill(lm, doc)
    kv.values[1] = kv.values[1] + 0.5
    reference = inference.logits_after(lm, None, doc + prompt)[len(doc):]
    assert (inference.logits_after(lm, kv, prompt) - reference).abs().max() > 1e-3


def test_default_model_injection_matches_prefill(default_lm, tmp_path):
    lm = default_lm
    doc = inference.document_ids(lm, "Kvcli stores the attention cache of a document so that it is computed once. " * 6)
    prompt = inference.prompt_ids(lm, " In short, kvcli")
    kv = roundtrip(inference.prefill(lm, doc), lm, tmp_path, chunk=64)
    with_cache = inference.logits_after(lm, kv, prompt)
    reference = inference.logits_after(lm, None, doc + prompt)[len(doc):]
    assert torch.allclose(with_cache, reference, atol=1e-4, rtol=0)
