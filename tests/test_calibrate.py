"""Calibration is a product feature: measured once per model, stored, found again, and recorded in headers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvcli import calibrate, format, inference, pipeline, profiles, quality
from kvcli.codecs import KvqCodec
from kvcli.rope import inv_freq_per_layer

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
    from kvcli.codecs.quantize import rope_tables, unrotate_keys

    lm = tiny_lm("llama")
    ids = inference.document_ids(lm, TEXT)[:40]
    captured = {}
    hook = lm.model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))
    kv = inference.prefill(lm, ids)
    hook.remove()
    pre = captured["k"][0].reshape(len(ids), 2, 16).transpose(0, 1)
    cos, sin = rope_tables(torch.from_numpy(inv_freq_per_layer(lm.model)[1]), 0, len(ids))
    assert torch.allclose(unrotate_keys(kv.keys[1].transpose(1, 2), cos, sin).transpose(1, 2), pre, atol=1e-5)


def test_calibrate_profile_roundtrip(tiny_lm, profile_dir, cli, tiny_model_dir, tmp_path):
    lm = tiny_lm("llama")
    assert profiles.find(lm.identity) is None
    doc = tmp_path / "calib.txt"
    doc.write_text(TEXT * 2)
    result = cli("calibrate", "--model", tiny_model_dir("llama"), "--text", doc, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    found = profiles.find(lm.identity)
    assert found is not None and found.digest() == summary["digest"]
    assert found.sensitivity.shape == (4, 2, 2) and (found.sensitivity > 0).all()
    assert len(found.key_weights) == 4 and found.key_weights[0].shape == (2, 16)
    codec = pipeline.codec_for("balanced", lm)
    assert codec.params()["profile"] == f"{found.name}:{found.digest()}"


def test_sensitivity_is_measured_per_head(tiny_lm):
    lm = tiny_lm("qwen2")
    ref = quality.reference(lm, inference.document_ids(lm, TEXT * 2), prefix=200, continuation=32)
    probe = KvqCodec(1.0, inv_freq=inv_freq_per_layer(lm.model))
    base = calibrate.sensitivity(lm, ref, probe)
    assert base.shape == (4, 2, 2) and (base >= 0).all() and base.max() > 0


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
    for preset in ("high", "balanced", "small"):
        path = tmp_path / f"{preset}.kvc"
        sizes[preset] = pipeline.write_cache(str(path), ref.kv, lm.identity, pipeline.codec_for(preset, lm), 256)
        with format.FileSource(path) as src:
            decoded = pipeline.load_cache(src, format.read_header(src), lm).kv
        top1[preset] = quality.compare(lm, ref, decoded).top1
    assert sizes["high"] > sizes["balanced"] > sizes["small"]
    assert top1["high"] >= 0.9 and top1["small"] >= 0.75
    elements = sum(k.numel() + v.numel() for k, v in zip(ref.kv.keys, ref.kv.values))
    assert 8 * sizes["balanced"] / elements < 4.0


def test_profile_refuses_malformed_json(tmp_path):
    from kvcli.errors import FormatError

    with pytest.raises(FormatError, match="malformed profile"):
        profiles.from_json({"format": "kvcli-profile", "version": 1, "name": "x", "model": {},
                            "sensitivity": [[1, 2, 3]], "key_weights": None}, "p.json")
