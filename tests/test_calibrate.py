"""Calibration is a product feature: measured once per model, stored, found again, and recorded in headers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kvcli.codecs.kvq import KvqCodec
from kvcli.codecs.presets import make_codec

from kvcli.calibration import calibrate, profiles, quality
from kvcli.container import format
from kvcli.modeling import inference
from kvcli.modeling.kvcache import KVCache
from kvcli.modeling.rope import inv_freq_per_layer
from kvcli.reuse import pipeline

TEXT = ("Calibration measures which layers of a model are sensitive to errors in the cached keys and values. "
        "Every layer is probed on its own, with coarse quantization, and the change in the next-token "
        "distribution is recorded. ") * 3


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path))
    return tmp_path / "profiles"


def test_rope_frequencies_found_for_each_architecture(tiny_lm):
    for arch in ("llama", "qwen2", "mistral", "gemma3"):
        freqs = inv_freq_per_layer(tiny_lm(arch).model)
        assert freqs is not None and len(freqs) == 4 and all(f.shape == (8,) for f in freqs)


def test_pre_rope_keys_are_what_the_model_projects(tiny_lm):
    """Undoing RoPE with the frequencies found must give back k_proj's output: the codec's premise."""
    from kvcli.codecs.kvq_ops.rope import rope_tables, unrotate_keys

    lm = tiny_lm("llama")
    ids = inference.document_ids(lm, TEXT)[:40]
    captured = {}
    hook = lm.model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))
    kv = inference.prefill(lm, ids)
    hook.remove()
    pre = captured["k"][0].reshape(len(ids), 2, 16).transpose(0, 1)
    cos, sin = rope_tables(torch.from_numpy(inv_freq_per_layer(lm.model)[1]), 0, len(ids))
    assert torch.allclose(unrotate_keys(kv.keys[1].transpose(1, 2), cos, sin).transpose(1, 2), pre, atol=1e-5)


@pytest.mark.parametrize("method", calibrate.METHODS)
def test_calibrate_profile_roundtrip(tiny_lm, profile_dir, cli, tiny_model_dir, tmp_path, method):
    lm = tiny_lm("llama")
    assert profiles.find(lm.identity) is None
    doc = tmp_path / "calib.txt"
    doc.write_text(TEXT * 2)
    result = cli("calibrate", "--model", tiny_model_dir("llama"), "--text", doc, "--json", "--method", method)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    found = profiles.find(lm.identity)
    assert found is not None and found.digest() == summary["digest"]
    assert found.sensitivity.shape == (4, 2, 2) and (found.sensitivity > 0).all()
    assert len(found.key_weights) == 4 and found.key_weights[0].shape == (2, 16)
    assert summary["method"] == method and json.loads(next(profile_dir.glob("*.json")).read_text())["method"] == method
    codec = pipeline.codec_for("balanced", lm)
    assert codec.params()["profile"] == f"{found.name}:{found.digest()}"


def _ranks(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a.ravel()))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_probes_that_start_at_the_changed_layer_measure_what_full_passes_do(tiny_lm, arch):
    """A probe runs only the layers from its first changed one: the KL must be that of the whole model's pass,
    from either method's reference (the Fisher forward pass, under autograd, makes the default method's)."""
    lm = tiny_lm(arch)
    context, _ = calibrate.prefill_and_key_weights(lm, inference.document_ids(lm, TEXT * 2), 200)
    kv = context[0]
    coarse = quality.decoded_as(kv, KvqCodec(1.0, inv_freq=inv_freq_per_layer(lm.model)))
    own = calibrate.continuation_reference(lm, context)
    _, from_fisher = calibrate.fisher_sensitivity(lm, context, coarse)
    assert torch.allclose(from_fisher.ref.logits, own.ref.logits, atol=1e-5) and not from_fisher.ref.logits.requires_grad
    for reference in (own, from_fisher):
        assert reference.layer_outputs is not None and len(reference.layer_outputs) == 4
        for layer in (1, 3):
            for mixed in (KVCache(kv.token_ids, kv.keys[:layer] + coarse.keys[layer:], kv.values),
                          KVCache(kv.token_ids, kv.keys, kv.values[:layer] + coarse.values[layer:])):
                full = quality.compare(lm, own.ref, mixed).kl
                assert full > 1e-7 and calibrate._kl(lm, reference, mixed, layer) == pytest.approx(full, rel=1e-4)
    assert all(not hasattr(layer, "forward") or "forward" not in vars(layer) for layer in lm.model.model.layers)


def test_decoded_as_is_what_encoding_with_the_probe_decodes_to(tiny_lm, tmp_path):
    """The probe's perturbation carries the encoder's token weights: decoding a file written with the probe
    codec gives the coarse cache back, and the weights change it (uniform token steps would not match)."""
    lm = tiny_lm("llama")
    context, _ = calibrate.prefill_and_key_weights(lm, inference.document_ids(lm, TEXT * 2), 200)
    kv = context[0]
    assert kv.attention is not None
    probe = KvqCodec(1.0, inv_freq=inv_freq_per_layer(lm.model))
    coarse = quality.decoded_as(kv, probe)
    path = tmp_path / "probe.kvc"
    pipeline.write_cache(str(path), kv, lm.identity, probe, 256)
    with format.FileSource(path) as src:
        decoded = pipeline.load_cache(src, format.read_header(src), lm).kv
    for a, b in zip(coarse.keys + coarse.values, decoded.keys + decoded.values):
        assert torch.allclose(a, b, atol=1e-5)
    uniform = quality.decoded_as(KVCache(kv.token_ids, kv.keys, kv.values), probe)
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(uniform.values, coarse.values))


@pytest.mark.parametrize("method", ["fisher", "probes"])
def test_progress_advances_once_per_counted_pass(tiny_lm, method):
    """The progress bar's total (passes) is what calibrate reports, the token alpha and the scales included."""
    lm = tiny_lm("llama")
    steps = []
    calibrate.calibrate(lm, [("t", TEXT)], prefix=200, method=method, progress=lambda: steps.append(1))
    assert len(steps) == calibrate.passes(lm, 1, method)


@pytest.mark.parametrize("layers", [2, 4, 5, 18, 30])
def test_probe_blocks_cover_every_layer_once(layers):
    keys, values = calibrate.blocks_per_kind(layers)
    for blocks in (keys, values):
        assert [i for b in blocks for i in b] == list(range(layers)) and all(len(b) > 0 for b in blocks)
    alone = min(calibrate.KEY_LAYERS_ALONE, layers)
    assert [len(b) for b in keys[:alone]] == [1] * alone
    assert len(keys) == alone + min(calibrate.KEY_BLOCKS, layers - alone)
    assert len(values) == min(calibrate.VALUE_BLOCKS, layers)


def test_fisher_ranks_heads_as_the_probes_do(tiny_lm):
    """The fast estimate must order (layer, K/V, head) places as the per-head probes measure them."""
    lm = tiny_lm("qwen2")
    context, _ = calibrate.prefill_and_key_weights(lm, inference.document_ids(lm, TEXT * 2), 200)
    coarse = quality.decoded_as(context[0], KvqCodec(1.0, inv_freq=inv_freq_per_layer(lm.model)))
    probes = calibrate.probe_sensitivity(lm, calibrate.continuation_reference(lm, context), coarse)
    fisher, _ = calibrate.fisher_sensitivity(lm, context, coarse)
    assert probes.shape == fisher.shape == (4, 2, 2) and (probes >= 0).all() and (fisher > 0).all()
    assert np.corrcoef(_ranks(probes), _ranks(fisher))[0, 1] > 0.8
    blocks = (calibrate.blocks_of(4, 4), calibrate.blocks_of(4, 2))
    scaled = calibrate.scale_to_blocks(fisher, [np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 6.0])], blocks)
    assert np.allclose(scaled[:, 0].sum(1), [1, 2, 3, 4]) and np.allclose([scaled[:2, 1].sum(), scaled[2:, 1].sum()], [5, 6])
    assert np.allclose(scaled[:2, 1] / scaled[:2, 1].sum(), fisher[:2, 1] / fisher[:2, 1].sum())


def _kl_top1(lm, ref, codec, tmp_path) -> tuple[float, float, int]:
    path = tmp_path / "probe.kvc"
    size = pipeline.write_cache(str(path), ref.kv, lm.identity, codec, 256)
    with format.FileSource(path) as src:
        decoded = pipeline.load_cache(src, format.read_header(src), lm).kv
    agree = quality.compare(lm, ref, decoded)
    return agree.kl, agree.top1, size


def test_first_lossy_encode_calibrates_once_and_a_resaved_copy_reuses_it(tiny_lm, tiny_model_dir, profile_dir,
                                                                          tmp_path, capsys, monkeypatch):
    """No stored profile: `balanced` still meets calibrated quality (measured: KL 0.00046 in 24,103 bytes, where
    uniform steps at kvcli's default scale gave 0.0014 in 29,163), the profile is written once, and the same
    weights saved elsewhere find it."""
    from tiny_models import make_model_dir

    from kvcli.modeling import models

    monkeypatch.setenv("KVCLI_AUTO_CALIBRATE", "1")  # the default, whatever the test session set
    lm = tiny_lm("llama", seed=3)
    ref = quality.reference(lm, inference.document_ids(lm, TEXT * 3), prefix=300, continuation=64)
    codec = pipeline.codec_for("balanced", lm)
    stored = list(profile_dir.glob("*.json"))
    assert len(stored) == 1 and capsys.readouterr().err.count("kvcli: calibrated") == 1
    kl, top1, size = _kl_top1(lm, ref, codec, tmp_path)
    uniform_kl, _, uniform_size = _kl_top1(lm, ref, make_codec("balanced", None, inv_freq_per_layer(lm.model)), tmp_path)
    assert kl <= 0.001 and top1 >= 0.9 and kl < uniform_kl / 2 and size < uniform_size
    mtime = stored[0].stat().st_mtime_ns
    copy = models.load(str(make_model_dir("llama", tmp_path / "resaved", seed=3)))
    again = pipeline.codec_for("small", copy)
    assert again.params()["profile"] == codec.params()["profile"] != "none"
    assert list(profile_dir.glob("*.json")) == stored and stored[0].stat().st_mtime_ns == mtime
    assert "calibrated" not in capsys.readouterr().err


def test_auto_calibration_can_be_turned_off(tiny_lm, profile_dir, monkeypatch, capsys):
    monkeypatch.setenv("KVCLI_AUTO_CALIBRATE", "0")
    monkeypatch.setattr(pipeline, "_warned_no_profile", set())
    codec = pipeline.codec_for("balanced", tiny_lm("llama", seed=4))
    assert codec.params()["profile"] == "none" and not profile_dir.exists()
    assert "no calibration profile" in capsys.readouterr().err


def test_calibrate_command_refuses_an_unknown_method(cli, llama):
    result = cli("calibrate", "--model", llama, "--method", "guess")
    assert result.exit_code == 2 and "--method must be one of fisher, probes" in result.stderr


def test_shipped_profile_matches_the_default_model(default_lm):
    profile = profiles.find(default_lm.identity)
    assert profile is not None and profile.sensitivity.shape == (30, 2, 3)
    s = profile.sensitivity
    assert s.max() / s.min() > 50  # the spread that motivates per-layer steps


def test_lossy_presets_on_the_default_model(default_lm, tmp_path):
    """Smaller presets give smaller files, and even `small` keeps most next-token choices."""
    lm = default_lm
    text = (" ".join(f"Item {i} of the inventory is a box of {i * 7 % 13} screws stored on shelf {i % 5}." for i in range(60)))
    ref = quality.reference(lm, inference.document_ids(lm, text), prefix=600, continuation=64)
    sizes, top1 = {}, {}
    for preset in ("high", "balanced", "small", "tiny"):
        path = tmp_path / f"{preset}.kvc"
        sizes[preset] = pipeline.write_cache(str(path), ref.kv, lm.identity, pipeline.codec_for(preset, lm), 256)
        with format.FileSource(path) as src:
            decoded = pipeline.load_cache(src, format.read_header(src), lm).kv
        top1[preset] = quality.compare(lm, ref, decoded).top1
    assert sizes["high"] > sizes["balanced"] > sizes["small"] > sizes["tiny"]
    assert top1["high"] >= 0.9 and top1["small"] >= 0.75
    elements = sum(k.numel() + v.numel() for k, v in zip(ref.kv.keys, ref.kv.values))
    assert 8 * sizes["balanced"] / elements < 4.0
    assert 8 * sizes["tiny"] / elements < 1.2  # 1.0 on real text (docs/codec.md, "Presets"); this one is a list


def test_profile_refuses_malformed_json(tmp_path):
    from kvcli.errors import FormatError

    with pytest.raises(FormatError, match="malformed profile"):
        profiles.from_json({"format": "kvcli-profile", "version": 1, "name": "x", "model": {},
                            "sensitivity": [[1, 2, 3]], "key_weights": None}, "p.json")
