"""Model identity: cheap digests that still tell models apart."""

from __future__ import annotations

import pytest

from kvcli import identity, models
from kvcli.errors import ModelLoadError


def test_config_digest_ignores_load_details():
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4}
    noisy = dict(base, dtype="bfloat16", transformers_version="9.9", _name_or_path="/x", use_cache=False)
    assert identity.config_digest(base) == identity.config_digest(noisy)
    assert identity.config_digest(base) != identity.config_digest(dict(base, hidden_size=65))


@pytest.mark.parametrize("size", [100, (1 << 20) + 10, 8 << 20])
def test_sampled_digest_sees_changes_in_data(tmp_path, size):
    path = tmp_path / "w.safetensors"
    data = bytearray(bytes(range(256)) * (size // 256 + 1))[:size]
    path.write_bytes(data)
    before = identity.sampled_file_digest([path])
    # A fine-tune rewrites whole tensors: change a 64 KiB stretch in the middle.
    mid = size // 2
    data[mid : mid + 65536] = bytes((b + 1) % 256 for b in data[mid : mid + 65536])
    path.write_bytes(data)
    assert identity.sampled_file_digest([path]) != before


def test_weights_digest_tells_seeds_apart(tiny_lm):
    a, b = tiny_lm("llama", 0), tiny_lm("llama", 1)
    assert a.identity["config_digest"] == b.identity["config_digest"]
    assert a.identity["tokenizer_digest"] == b.identity["tokenizer_digest"]
    assert a.identity["weights_digest"] != b.identity["weights_digest"]


def test_identity_does_not_depend_on_load_dtype(tiny_lm):
    assert tiny_lm("qwen2", 0, "float32").identity == tiny_lm("qwen2", 0, "bfloat16").identity


def test_tokenizer_digest_sees_bos_handling(tiny_lm):
    # llama's byte tokenizer adds a BOS, qwen2's does not; everything else is equal.
    assert tiny_lm("llama").identity["tokenizer_digest"] != tiny_lm("qwen2").identity["tokenizer_digest"]


def test_resolve_refuses_pickle_only_directories(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        models.resolve(str(tmp_path))


def test_resolve_non_gguf_file(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="expected a model directory or a .gguf file"):
        models.resolve(str(f))


def test_hub_id_offline_is_a_clean_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local path"):
        models.load("someone/some-model-that-is-not-cached")
