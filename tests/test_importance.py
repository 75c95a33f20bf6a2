"""Token weights' input: the attention each cached token receives, measured by hooks during prefill, checked
against the model's own attention probabilities (eager attention with output_attentions), for full and
sliding-window layers, single and batched prefills; and what the lossy presets write with it."""

from __future__ import annotations

import pytest
import torch
from kvcli.codecs.base import CodecError
from kvcli.codecs.kvq import KvqCodec

from kvcli.container import format, kvfile
from kvcli.modeling import batching, importance, inference, models
from kvcli.modeling.kvcache import KVCache
from kvcli.reuse import pipeline

ARCHS = ["llama", "qwen2", "gemma3", "mistral-sliding"]


def eager_received(lm, ids: list[int], held: list[int]) -> list[torch.Tensor]:
    """The RMS over the last QUERIES positions (and the query heads of a group) of the attention probabilities
    the model itself reports, per layer (kv_heads, held)."""
    cfg = lm.model.config.get_text_config(decoder=True)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        lm.model.set_attn_implementation(previous)
    result = []
    for probs, kept in zip(out.attentions, held):
        last = probs[0, :, -importance.QUERIES :, :]  # (heads, nq, n)
        rms = last.pow(2).mean(1).reshape(cfg.num_key_value_heads, group, -1).mean(1).sqrt()
        result.append(rms[:, rms.shape[1] - kept :])
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_measure_the_attention_the_model_computes(tiny_model_dir, arch):
    lm = models.load(str(tiny_model_dir(arch)))
    ids = [0] + [int(x) for x in torch.randint(2, 250, (299,), generator=torch.Generator().manual_seed(1))]
    kv = inference.prefill(lm, ids, attention=True)
    assert kv.attention is not None and len(kv.attention) == kv.num_layers
    want = eager_received(lm, ids, [k.shape[1] for k in kv.keys])
    for layer, (a, b) in enumerate(zip(kv.attention, want)):
        assert a.shape == (kv.keys[layer].shape[0], kv.keys[layer].shape[1])
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-7, msg=f"layer {layer}")
    if arch in ("gemma3", "mistral-sliding"):  # sliding-window layers hold fewer tokens than the prefill
        assert min(k.shape[1] for k in kv.keys) < len(ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_prefill_measures_each_document_as_alone(tiny_model_dir, arch):
    lm = models.load(str(tiny_model_dir(arch)))
    g = torch.Generator().manual_seed(2)
    docs = [[0] + torch.randint(2, 250, (n,), generator=g).tolist() for n in (120, 40, 300)]
    together = batching.prefill_batch(lm, docs, attention=True)
    for ids, kv in zip(docs, together):
        alone = inference.prefill(lm, ids, attention=True)
        for a, b in zip(kv.attention, alone.attention):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_cache_without_weights_gets_the_prefills_from_its_last_queries_run_again(tiny_model_dir, arch):
    """What `push --quality` measures for a decoded file (kvcli/reuse/levels.py): the last QUERIES tokens run after
    the cache of the others give the weights the whole prefill measured; a sliding-window layer's cache lacks the
    keys before its window, so such a model gets none."""
    lm = models.load(str(tiny_model_dir(arch)))
    ids = [0] + torch.randint(2, 250, (400,), generator=torch.Generator().manual_seed(3)).tolist()
    kv = inference.prefill(lm, ids, attention=True)
    again = inference.measure_attention(lm, KVCache(kv.token_ids, kv.keys, kv.values))
    if min(k.shape[1] for k in kv.keys) < len(ids):
        assert again is None
        return
    for a, b in zip(again, kv.attention):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_prefill_measures_nothing_unless_asked(tiny_model_dir):
    lm = models.load(str(tiny_model_dir("llama")))
    assert inference.prefill(lm, [0, 5, 6, 7]).attention is None
    assert batching.prefill_batch(lm, [[0, 5, 6], [0, 7]])[0].attention is None


def test_lossy_prefill_writes_token_weights_and_lossless_does_not(cli, llama, doc_file, tmp_path):
    for quality, expected in (("balanced", True), ("lossless", False)):
        out = tmp_path / f"{quality}.kvc"
        assert cli("prefill", doc_file, "-o", out, "--model", llama, "-q", quality).exit_code == 0
        header = format.read_header(format.FileSource(out))
        names = {s.name for s in header.segments if s.kind == "aux"}
        assert ("kvq.tokens" in names) is expected


def test_exponents_follow_the_attention_and_spare_the_sinks():
    codec = KvqCodec(1.0)  # kvq's default alpha, no cap (the rated presets cap the coarse side: test_presets.py)
    a = torch.tensor([[1.0, 1.0, 16.0, 1 / 16, 2.0**-40, 2.0**40]])
    e = codec.token_exponents(a, skip=1)
    assert e[0, 0] == 0  # a sink
    # alpha 0.25: 16x the head's geometric mean of attention -> steps 2^-1, i.e. exponent -8; clipped at +-24.
    mean = torch.log2(a[0, 1:].clamp_min(1e-12)).mean().item()
    assert e[0, 2] == round(-2 * (4 - mean)) and e[0, 4] == 24 and e[0, 5] == -24


def test_token_coarsest_caps_only_the_coarse_side():
    """A token the last queries ignored gets at most 2^(coarsest/8) coarser steps; finer ones are untouched."""
    a = torch.tensor([[1.0, 1.0, 16.0, 1 / 16, 2.0**-40, 2.0**40]])
    full = KvqCodec(1.0).token_exponents(a, skip=1)
    capped = KvqCodec(1.0, token_coarsest=4).token_exponents(a, skip=1)
    assert full[0, 3] > 4 and full[0, 4] == 24
    assert capped[0, 3] == capped[0, 4] == 4
    assert (capped[0, [0, 1, 2, 5]] == full[0, [0, 1, 2, 5]]).all() and capped[0, 5] == -24
    with pytest.raises(CodecError, match="token_coarsest"):
        KvqCodec(1.0, token_coarsest=25)


def test_a_model_the_hooks_cannot_read_still_prefills_without_weights(tmp_path):
    """DeepSeek-V2 passes its rotary embedding as one complex tensor: no measurement, the same cache, a lossy file
    without token weights. Its rotary frequencies span only the rotary part of the key head, so the codec the
    commands build codes those keys as they are (it used to fail un-rotating them) and they decode within the
    step bound."""
    from tiny_models import byte_tokenizer
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    torch.manual_seed(0)
    cfg = DeepseekV2Config(vocab_size=258, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=512, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                           first_k_dense_replace=2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    byte_tokenizer(add_bos=True).save_pretrained(tmp_path / "m")
    lm = models.load(str(tmp_path / "m"))
    ids = list(range(2, 42))
    plain, measured = inference.prefill(lm, ids), inference.prefill(lm, ids, attention=True)
    assert measured.attention is None
    assert all(torch.equal(a, b) for a, b in zip(plain.keys + plain.values, measured.keys + measured.values))
    codec = pipeline.codec_for("balanced", lm)
    assert codec.inv_freq is not None and 2 * len(codec.inv_freq[0]) < measured.keys[0].shape[2]
    meta, parts = kvfile.encode(measured, lm.identity, codec, 16)
    assert "kvq.tokens" not in {p.name for p in parts if p.kind == "aux"}
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    src = format.BytesSource(data)
    decoded = kvfile.decode(src, format.read_header(src))
    for exact, got in zip(measured.keys + measured.values, decoded.keys + decoded.values):
        spread = (exact[:, 1:] - exact[:, 1:].mean(1, keepdim=True)).abs().max()
        assert (got - exact).abs().max() <= spread  # quantized, not garbage; sinks exact
        torch.testing.assert_close(got[:, :1], exact[:, :1])


def test_queries_scored_in_several_blocks_give_the_same_weights(tiny_model_dir, monkeypatch):
    lm = models.load(str(tiny_model_dir("llama")))
    ids = [0] + torch.randint(2, 250, (299,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = inference.prefill(lm, ids, attention=True).attention
    monkeypatch.setattr(importance, "SCORES", 1000)  # 2 heads x 300 keys: blocks of one query
    blocks = inference.prefill(lm, ids, attention=True).attention
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_a_failure_inside_the_measurement_leaves_the_prefill_alone(tiny_model_dir, monkeypatch):
    lm = models.load(str(tiny_model_dir("llama")))
    ids = [0, 5, 6, 7, 8, 9]
    plain = inference.prefill(lm, ids)
    monkeypatch.setattr(importance, "QUERIES", None)  # any error in the hooks' arithmetic
    measured = inference.prefill(lm, ids, attention=True)
    assert measured.attention is None
    assert all(torch.equal(a, b) for a, b in zip(plain.keys + plain.values, measured.keys + measured.values))
