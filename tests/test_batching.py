"""Batched prefill: every document gets the cache it would get alone (fp32, 1e-4)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, SLIDING_WINDOW

from kvcli.modeling import batching, inference

TEXTS = [
    "Short one.",
    "The harbour town of Velmora sits between two cliffs; its lighthouse keeper is Anna Brisk.",
    "Every evening she climbs 112 steps to light the lamp.",
    "A",
    "Fishing boats leave before dawn and come back with the tide, their holds full of herring and cod.",
]


def assert_same_caches(batched, alone, tol=1e-4):
    assert batched.token_ids == alone.token_ids
    assert batched.num_layers == alone.num_layers
    for i in range(alone.num_layers):
        for got, want in ((batched.keys[i], alone.keys[i]), (batched.values[i], alone.values[i])):
            assert got.shape == want.shape, (i, got.shape, want.shape)
            assert torch.allclose(got, want, atol=tol, rtol=0), (i, (got - want).abs().max())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_caches_equal_one_at_a_time(arch, tiny_lm):
    lm = tiny_lm(arch)
    docs = [inference.document_ids(lm, t) for t in TEXTS]
    assert max(map(len, docs)) > SLIDING_WINDOW  # sliding layers (gemma3) really drop tokens
    for got, ids in zip(batching.prefill_batch(lm, docs), docs):
        assert_same_caches(got, inference.prefill(lm, ids))


@pytest.mark.slow
def test_default_model_batched_caches_equal_one_at_a_time(default_lm):
    docs = [inference.document_ids(default_lm, t) for t in TEXTS]
    for got, ids in zip(batching.prefill_batch(default_lm, docs), docs):
        assert_same_caches(got, inference.prefill(default_lm, ids))


def test_padding_is_what_a_mask_would_hide(tiny_lm):
    """Without causality the pads would leak in: check they are really there and really inert, by changing them."""
    lm = tiny_lm("llama")
    short, long = inference.document_ids(lm, TEXTS[0]), inference.document_ids(lm, TEXTS[1])
    a = batching.prefill_batch(lm, [short, long])[0]
    b = batching.prefill_batch(lm, [short, long[:-3] + [5, 6, 7]])[0]
    assert_same_caches(a, b, tol=0)


def test_plan_batches_bounds_padded_size():
    lengths = [300, 10, 290, 5000, 310, 20]
    groups = batching.plan_batches(lengths, 1000)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 1000
    assert [3] in groups  # longer than the budget: alone
    assert batching.plan_batches(lengths, 1) == [[i] for i in sorted(range(6), key=lambda i: lengths[i])]


def test_length_dependent_rope_is_not_batched(tiny_lm):
    lm = tiny_lm("llama")
    assert batching.batchable(lm)
    cfg = lm.model.config
    saved = cfg.rope_parameters
    try:
        cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        assert not batching.batchable(lm)
    finally:
        cfg.rope_parameters = saved
