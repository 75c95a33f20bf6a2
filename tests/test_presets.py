"""Each preset's encoder settings beyond its step (codecs/presets.py), as files and calibration's scale choice get them."""

from __future__ import annotations

import torch

from kvcli.calibration import scales
from kvcli.codecs.kvq import TOKEN_EXPONENT_LIMIT, KvqCodec
from kvcli.codecs.presets import TOKEN_COARSEST, make_codec
from kvcli.container import format, kvfile
from kvcli.modeling import inference
from kvcli.modeling.rope import inv_freq_per_layer

TEXT = "The access code for the archive room is 7311. The library opened in 1908 and closed in 1976. " * 4


def _ignored_cache(lm):
    """A cache with its measured attention, where one token received none from the last queries: a fact that only a
    later question asks for."""
    kv = inference.prefill(lm, inference.document_ids(lm, TEXT), attention=True)
    kv.attention = [a.clone() for a in kv.attention]
    for a in kv.attention:
        a[:, a.shape[1] // 3] = 1e-12
    return kv


def _bits(lm, kv, codec) -> float:
    meta, parts = kvfile.encode(kv, lm.identity, codec, scales.CHUNK_TOKENS)
    size = len(format.build_header(meta, parts)) + sum(len(p.data) for p in parts)
    return 8 * size / sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))


def test_the_rated_presets_code_no_token_much_coarser_than_its_head_typical_one(tiny_lm):
    """`balanced` and `small` cap the token exponents at 8, `tiny` at 4 (TOKEN_COARSEST: steps at most 2^(8/8) and
    2^(4/8) coarser for an ignored token); `high` keeps the whole range, and so reaches past the caps on the same
    cache."""
    lm = tiny_lm("llama")
    kv = _ignored_cache(lm)
    starts = [kv.token_start(layer) for layer in range(kv.num_layers)]
    top = {}
    for quality in ("high", "balanced", "small", "tiny"):
        encoder = make_codec(quality, inv_freq=inv_freq_per_layer(lm.model)).fit(kv.keys, kv.values, starts,
                                                                                  kv.attention)
        top[quality] = max(int(w.exponents.max()) for w in encoder.tokens.values())
    assert top["tiny"] == TOKEN_COARSEST["tiny"] == 4
    assert top["balanced"] == top["small"] == TOKEN_COARSEST["small"] == TOKEN_COARSEST["balanced"] == 8
    assert top["high"] > 8


def test_calibration_chooses_tiny_scale_with_tiny_cap(tiny_lm):
    """The scale calibration sets for `tiny` is measured on files coded as `tiny` codes them, cap included."""
    lm = tiny_lm("llama")
    kv = _ignored_cache(lm)
    tiny = make_codec("tiny", inv_freq=inv_freq_per_layer(lm.model), base_scale=2.6)
    capped, uncapped = (_bits(lm, kv, KvqCodec(tiny.scale, tiny.sinks, tiny.profile, tiny.inv_freq, tiny.meta,
                                               tiny.token_alpha, tiny.version, token_coarsest=cap))
                        for cap in (4, TOKEN_EXPONENT_LIMIT))
    assert scales.bits_per_element(lm, None, "tiny", 2.6, [kv], [None]) == capped != uncapped
