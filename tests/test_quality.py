"""The quality protocol used by calibration and the benchmarks."""

from __future__ import annotations

import pytest

from kvcli.calibration import quality
from kvcli.modeling import inference
from kvcli.modeling.kvcache import KVCache

TEXT = "A quiet harbour, a lighthouse, and a keeper who counts the steps every evening. " * 6


def test_exact_cache_agrees_with_itself(tiny_lm):
    lm = tiny_lm("llama")
    ref = quality.reference(lm, inference.document_ids(lm, TEXT), prefix=300, continuation=40)
    assert ref.kv.num_tokens == 300 and len(ref.feed) == 40 and ref.targets.shape == (40,)
    same = quality.compare(lm, ref, ref.kv)
    assert same.top1 == 1.0 and abs(same.dnll) < 1e-6 and abs(same.kl) < 1e-6


def test_damaged_cache_disagrees(tiny_lm):
    lm = tiny_lm("llama")
    ref = quality.reference(lm, inference.document_ids(lm, TEXT), prefix=300, continuation=40)
    noisy = KVCache(ref.kv.token_ids, [k * 0 for k in ref.kv.keys], [v * 0 for v in ref.kv.values])
    worse = quality.compare(lm, ref, noisy)
    assert worse.kl > 1e-3 and worse.dnll != 0


def test_prefix_shrinks_to_fit_the_document_and_the_model(tiny_lm):
    lm = tiny_lm("llama")  # 512-token context
    ids = inference.document_ids(lm, TEXT * 3)
    ref = quality.reference(lm, ids, prefix=2048, continuation=64)
    assert ref.kv.num_tokens == 512 - 64


def test_too_short_document_is_refused(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match="too short"):
        quality.reference(lm, inference.document_ids(lm, "short"), continuation=64)


@pytest.mark.parametrize("a,b,expected", [([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 5, 3], 1), ([4], [5], 0)])
def test_first_divergence(a, b, expected):
    assert quality.first_divergence(a, b) == expected
