"""Model identity: equal for the same computation however the model was saved, different for any change in it."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
from tiny_models import byte_tokenizer

from kvcli.container import format, identity
from kvcli.errors import ModelLoadError
from kvcli.modeling import models

DOCS = Path(__file__).resolve().parent.parent / "docs" / "format.md"

# A transformers 5 config.json as save_pretrained writes it (the default model's fields).
V5_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "dtype": "float32", "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "transformers_version": "5.24.0", "use_cache": True, "vocab_size": 49152,
}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "kvcli-cache"
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(root))
    return root


def with_changes(base: dict, **changes) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# canonical JSON


@pytest.mark.parametrize("value, text", [
    (0, "0"), (-0.0, "0"), (1, "1"), (10000.0, "10000"), (1.5, "1.5"), (-0.5, "-0.5"), (1e-05, "0.00001"),
    (1e-06, "0.000001"), (1e-07, "1e-7"), (9.999999747378752e-06, "0.000009999999747378752"),
    (1e20, "100000000000000000000"), (1e21, "1e+21"), (1.5e300, "1.5e+300"), (0.1, "0.1"), (123.456, "123.456"),
    (5e-324, "5e-324"), (2 ** 53, "9007199254740992"),
])
def test_canonical_numbers_follow_rfc8785(value, text):
    assert identity.canonical_json(value) == text.encode()


def test_canonical_json_sorts_keys_and_escapes_minimally():
    doc = {"b": [True, None, 2.0], "a": "x\"\\\n\u00e9\u2028", "\u00e9": {}, "B": 1}
    assert identity.canonical_json(doc) == '{"B":1,"a":"x\\"\\\\\\n\u00e9\u2028","b":[true,null,2],"\u00e9":{}}'.encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2 ** 53 + 1, object()])
def test_canonical_json_refuses_what_is_not_exact_json(bad):
    with pytest.raises(ValueError):
        identity.canonical_json({"x": bad})


# ---------------------------------------------------------------------------------------------------------------
# config digest


def digest(config: dict) -> str:
    return identity.config_digest(config)


@pytest.mark.parametrize("noise", [
    {"deployment_note": "served from rack 4"},
    {"transformers_version": "9.9.9", "_name_or_path": "/elsewhere", "dtype": "bfloat16", "use_cache": False},
    {"bos_token_id": 7, "initializer_range": 0.5, "attention_dropout": 0.1, "some_future_field": [1, 2]},
])
def test_config_fields_that_do_not_change_the_computation_do_not_count(noise):
    assert digest(with_changes(V5_CONFIG, **noise)) == digest(V5_CONFIG)


@pytest.mark.parametrize("change", [
    {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
    {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "linear", "factor": 2.0}},
    {"rms_norm_eps": 1e-06},
    {"num_attention_heads": 8},
    {"num_key_value_heads": 9},
    {"head_dim": 32},
    {"num_hidden_layers": 29},
    {"hidden_size": 512},
    {"intermediate_size": 1024},
    {"vocab_size": 49153},
    {"max_position_embeddings": 4096},
    {"sliding_window": 4096},
    {"layer_types": ["full_attention"] * 30},
    {"hidden_act": "gelu"},
    {"attention_bias": True},
    {"tie_word_embeddings": False},
    {"final_logit_softcapping": 30.0},
    {"query_pre_attn_scalar": 256},
    {"model_type": "mistral"},
    {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
])
def test_every_computation_change_changes_the_config_digest(change):
    assert digest(with_changes(V5_CONFIG, **change)) != digest(V5_CONFIG)


def test_transformers_4_rope_form_equals_the_transformers_5_form():
    v4 = with_changes(V5_CONFIG, rope_parameters=None, rope_theta=100000, rope_scaling=None)
    assert digest(v4) == digest(V5_CONFIG)
    scaled5 = with_changes(V5_CONFIG, rope_parameters={
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    scaled4 = with_changes(V5_CONFIG, rope_parameters=None, rope_theta=500000.0, rope_scaling={
        "type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4})
    assert digest(scaled4) == digest(scaled5)
    assert digest(with_changes(scaled4, max_position_embeddings=131072)) != digest(scaled5)


def test_a_model_without_rope_hashes_null_empty_and_absent_rope_fields_alike():
    learned = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}
    assert digest(dict(learned, rope_scaling=None)) == digest(dict(learned, rope_parameters={})) == digest(learned)
    assert digest(dict(learned, partial_rotary_factor=0.5)) != digest(learned)


def test_gemma3_rope_forms_agree():
    common = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
              "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}
    v5 = dict(common, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    v4 = dict(common, rope_theta=1000000, rope_local_base_freq=10000, rope_scaling=None)
    assert digest(v4) == digest(v5)
    assert digest(dict(v4, rope_local_base_freq=20000)) != digest(v5)


@pytest.mark.parametrize("absent, present", [
    ("head_dim", 64), ("num_key_value_heads", 9), ("pretraining_tp", 1), ("attention_bias", False),
    ("mlp_bias", False),
])
def test_absent_field_equals_its_documented_default(absent, present):
    base = with_changes(V5_CONFIG, num_key_value_heads=9 if absent == "num_key_value_heads" else 3)
    assert digest(with_changes(base, **{absent: None})) == digest(with_changes(base, **{absent: present}))


def test_fields_without_a_universal_default_hash_as_saved():
    # Gemma's classes tie embeddings by default, Llama's do not: absent is not "false".
    assert digest(with_changes(V5_CONFIG, tie_word_embeddings=None)) != digest(V5_CONFIG)
    # Mistral's first class defaulted to a 4096 window, so an absent window is not "no window".
    assert digest(V5_CONFIG) != digest(with_changes(V5_CONFIG) | {"sliding_window": None})


def test_nested_text_config_is_canonicalized_recursively():
    wrapper = {"model_type": "gemma3", "text_config": with_changes(V5_CONFIG), "vision_config": {"hidden_size": 8}}
    noisy = json.loads(json.dumps(wrapper))
    noisy["text_config"]["deployment_note"] = "x"
    noisy["text_config"]["transformers_version"] = "9"
    assert digest(noisy) == digest(wrapper)
    changed = json.loads(json.dumps(wrapper))
    changed["text_config"]["rms_norm_eps"] = 1e-6
    assert digest(changed) != digest(wrapper)


def test_read_config_refuses_non_finite_numbers_and_non_objects(tmp_path):
    (tmp_path / "config.json").write_text('{"rms_norm_eps": NaN}')
    with pytest.raises(ModelLoadError, match="config.json: cannot read the model config"):
        identity.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ModelLoadError, match="config.json: the model config is not a JSON object"):
        identity.read_config(tmp_path)


@pytest.mark.parametrize("bad", [{"rope_scaling": [1.0]}, {"rms_norm_eps": float("inf")}, {"head_dim": 2 ** 60}])
def test_unusable_computation_values_are_refused_naming_the_config(bad):
    with pytest.raises(ModelLoadError, match="m/config.json: a computation field has an unusable value"):
        identity.config_digest(with_changes(V5_CONFIG, **bad), "m/config.json")


def test_docs_list_exactly_the_hashed_config_fields():
    text = DOCS.read_text()
    section = text[text.index("### Model identity"):]
    listed = re.search(r"<!-- config-fields -->(.*?)<!-- /config-fields -->", section, re.S).group(1)
    assert set(re.findall(r"`([a-z_0-9]+)`", listed)) == identity.CONFIG_FIELDS
    defaults = re.search(r"<!-- config-defaults -->(.*?)<!-- /config-defaults -->", section, re.S).group(1)
    assert set(re.findall(r"`([a-z_0-9]+)` = ", defaults)) == set(identity.CONFIG_DEFAULTS)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer digest


def test_tokenizer_json_runtime_state_and_serialization_changes_do_not_count():
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True},
           "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}
    newer = json.loads(json.dumps(doc))
    newer.update(version="2.0", truncation={"max_length": 512}, padding={"strategy": "BatchLongest"})
    newer["pre_tokenizer"]["use_regex"] = True
    newer["model"].update(merges=[["a", "b"]], ignore_merges=False, byte_fallback=False)
    assert identity.canonical_tokenizer(newer) == identity.canonical_tokenizer(doc)
    newer["model"]["ignore_merges"] = True
    assert identity.canonical_tokenizer(newer) != identity.canonical_tokenizer(doc)


def test_tokenizer_digest_is_memoized_by_the_serialized_text(tiny_lm, cache_dir):
    tokenizer = tiny_lm("qwen2").tokenizer
    first = identity.tokenizer_digest(tokenizer)
    # Loading the model (first use of the session-wide fixture, in whichever test) writes other digests here too.
    [entry] = [p for p in (cache_dir / "digests").glob("*.json") if json.loads(p.read_text())["key"]["kind"] == "tokenizer"]
    doc = json.loads(entry.read_text())
    doc["value"] = "0" * 64  # a hit returns the stored value: proof that nothing was recomputed
    entry.write_text(json.dumps(doc))
    assert identity.tokenizer_digest(tokenizer) == "0" * 64
    entry.unlink()
    assert identity.tokenizer_digest(tokenizer) == first


def test_tokenizer_digest_sees_bos_handling(tiny_lm):
    # llama's byte tokenizer adds a BOS, qwen2's does not; everything else is equal.
    assert tiny_lm("llama").identity["tokenizer_digest"] != tiny_lm("qwen2").identity["tokenizer_digest"]


# ---------------------------------------------------------------------------------------------------------------
# weights digest


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def age(path: Path, seconds: float = 60) -> None:
    """Make a file look written a minute ago, outside the racy window in which the digest cache stores nothing."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    for entry_name, _, _, begin, end in identity.read_safetensors_header(path):
        if entry_name == name:
            return begin, end
    raise KeyError(name)


def test_resharded_copy_has_the_same_identity(tiny_model_dir, tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama")
    resharded = copy_model(src, tmp_path / "resharded")
    (resharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(resharded, max_shard_size="100KB")
    shards = identity.weight_files(resharded)
    assert len(shards) > 2 and all(s.name.startswith("model-") for s in shards)
    assert models.load(str(resharded)).identity | {"name": "x"} == models.load(str(src)).identity | {"name": "x"}


def test_safetensors_metadata_and_tensor_order_do_not_count(tiny_model_dir, tmp_path, cache_dir):
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("qwen2") / "model.safetensors"
    tensors = load_file(src)
    other = tmp_path / "other.safetensors"
    save_file(dict(reversed(list(tensors.items()))), other, metadata={"format": "pt", "saved_by": "someone else"})
    assert other.read_bytes() != src.read_bytes()
    assert identity.weights_digest([other]) == identity.weights_digest([src])


def test_one_changed_float_changes_the_weights_digest(tiny_model_dir, tmp_path, cache_dir):
    copy = copy_model(tiny_model_dir("llama"), tmp_path / "copy")
    path = copy / "model.safetensors"
    before = identity.weights_digest([path])
    begin, end = tensor_span(path, "model.layers.2.mlp.down_proj.weight")
    with open(path, "r+b") as fh:  # flip the lowest mantissa bit of one float in the middle of a tensor
        fh.seek((begin + end) // 2 // 4 * 4)
        value = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([value[0] ^ 1]))
    assert identity.weights_digest([path]) != before


def test_weights_digest_does_not_depend_on_file_names_or_count(tiny_model_dir, tmp_path, cache_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_model_dir("llama") / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, tmp_path / "a.safetensors")
    save_file({n: tensors[n] for n in names[5:]}, tmp_path / "b.safetensors")
    assert identity.weights_digest([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]) == \
        identity.weights_digest([tiny_model_dir("llama") / "model.safetensors"])
    save_file({names[0]: tensors[names[0]]}, tmp_path / "c.safetensors")
    with pytest.raises(ModelLoadError, match=f"c.safetensors: tensor '{re.escape(names[0])}' is also in .*a.safetensors"):
        identity.weights_digest([tmp_path / "a.safetensors", tmp_path / "c.safetensors"])


def test_weights_digest_tells_seeds_apart(tiny_lm):
    a, b = tiny_lm("llama", 0), tiny_lm("llama", 1)
    assert a.identity["config_digest"] == b.identity["config_digest"]
    assert a.identity["tokenizer_digest"] == b.identity["tokenizer_digest"]
    assert a.identity["weights_digest"] != b.identity["weights_digest"]


def test_identity_does_not_depend_on_load_dtype(tiny_lm):
    assert tiny_lm("qwen2", 0, "float32").identity == tiny_lm("qwen2", 0, "bfloat16").identity


def test_config_json_with_a_deployment_note_loads_with_the_same_identity(tiny_model_dir, tmp_path, cache_dir):
    copy = copy_model(tiny_model_dir("gemma3"), tmp_path / "noted")
    config = json.loads((copy / "config.json").read_text())
    config["deployment_note"] = "pinned for the support bot"
    (copy / "config.json").write_text(json.dumps(config))
    assert models.load(str(copy)).identity["config_digest"] == models.load(str(tiny_model_dir("gemma3"))).identity["config_digest"]


def test_config_saved_by_transformers_4_loads_with_the_identity_of_its_transformers_5_save(tiny_model_dir, tmp_path, cache_dir):
    copy = copy_model(tiny_model_dir("llama"), tmp_path / "v4")
    config = json.loads((copy / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    config.pop("dtype")
    config.pop("head_dim")  # transformers 4.40 wrote no head_dim for Llama
    config.update(rope_theta=int(theta), rope_scaling=None, torch_dtype="float32", transformers_version="4.40.0")
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    loaded = models.load(str(copy))
    assert loaded.model.config.head_dim == 16 and loaded.model.config.rope_parameters["rope_theta"] == theta
    assert loaded.identity["config_digest"] == models.load(str(tiny_model_dir("llama"))).identity["config_digest"]


# ---------------------------------------------------------------------------------------------------------------
# safetensors header validation


def safetensors_bytes(header: dict, data: bytes = b"\0" * 8) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("blob, reason", [
    (b"\x10\0\0", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 1 << 40) + b"{}", "exceeds the file"),
    (struct.pack("<Q", 4) + b"{}", "exceeds the file"),
    (struct.pack("<Q", 3) + b"{x}", "Expecting property name"),
    (safetensors_bytes([1]), "not a JSON object"),
    (safetensors_bytes({"w": 1}), "entry is not an object"),
    (safetensors_bytes({"w": dict(GOOD["w"], dtype="F33")}), "unknown dtype 'F33'"),
    (safetensors_bytes({"w": dict(GOOD["w"], shape=[-2])}), "not a list of non-negative integers"),
    (safetensors_bytes({"w": dict(GOOD["w"], data_offsets=[0, 16])}), "fall outside the 8-byte data section"),
    (safetensors_bytes({"w": dict(GOOD["w"], data_offsets=[8, 0])}), "fall outside"),
    (safetensors_bytes({"w": dict(GOOD["w"], shape=[3])}), "needs 12 bytes, the offsets give 8"),
    (safetensors_bytes(GOOD, data=bytes(12)), "4 bytes after the last tensor"),
    (safetensors_bytes({"w": dict(GOOD["w"], shape=[1], data_offsets=[4, 8])}), "'w' starts at byte 73, where the previous one ends at 69"),
    (safetensors_bytes({"a": dict(GOOD["w"], shape=[1], data_offsets=[0, 4]), **GOOD}), "a gap or an overlap"),
    (safetensors_bytes(GOOD).replace(b'{"w"', b'{"w": 0, "w"', 1).replace(
        struct.pack("<Q", len(json.dumps(GOOD))), struct.pack("<Q", len(json.dumps(GOOD)) + 8)), "duplicate key"),
])
def test_malformed_safetensors_is_refused_naming_the_file(tmp_path, cache_dir, blob, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ModelLoadError, match=f"bad.safetensors: .*{re.escape(reason)}"):
        identity.weights_digest([path])


def test_well_formed_safetensors_header_is_read(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes({"__metadata__": {"a": "b"}, **GOOD, "e": {"dtype": "F4", "shape": [0], "data_offsets": [8, 8]}}))
    header_end = path.stat().st_size - 8
    assert identity.read_safetensors_header(path) == [("w", "F32", [2], header_end, header_end + 8),
                                                      ("e", "F4", [0], header_end + 8, header_end + 8)]


# ---------------------------------------------------------------------------------------------------------------
# digest cache


def test_digest_cache_is_used_while_the_file_is_unchanged(tmp_path, cache_dir):
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(GOOD))
    age(path)
    first = identity.weights_digest([path])
    [entry] = (cache_dir / "digests").glob("*.json")
    doc = json.loads(entry.read_text())
    assert doc["key"]["size"] == path.stat().st_size and doc["key"]["inode"] == path.stat().st_ino
    # Tamper with the stored digest: a hit returns it, which shows the data was not read again.
    doc["value"]["w"]["blake3"] = "0" * 64
    entry.write_text(json.dumps(doc))
    assert identity.weights_digest([path]) != first
    os.utime(path)  # a new mtime: the entry no longer applies
    age(path, 30)
    assert identity.weights_digest([path]) == first


def test_digest_cache_skips_files_modified_within_the_racy_window(tmp_path, cache_dir):
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(GOOD))
    identity.weights_digest([path])
    assert not list((cache_dir / "digests").glob("*.json"))


def test_damaged_digest_cache_entry_is_recomputed(tmp_path, cache_dir):
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(GOOD))
    age(path)
    first = identity.weights_digest([path])
    [entry] = (cache_dir / "digests").glob("*.json")
    entry.write_text('{"key": ')
    assert identity.weights_digest([path]) == first
    doc = json.loads(entry.read_text())
    doc["value"] = {"w": ["F32", [2], "0" * 64]}  # wrong shape of record: not trusted
    entry.write_text(json.dumps(doc))
    assert identity.weights_digest([path]) == first


def test_unreadable_file_is_a_model_load_error(tmp_path, cache_dir):
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(tmp_path))}: cannot read: Is a directory"):
        identity.cached_file_sha256(tmp_path)


def test_weight_files_follow_what_transformers_loads(tmp_path):
    (tmp_path / "model-1.safetensors").write_bytes(b"")
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    (tmp_path / identity.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    assert identity.weight_files(tmp_path) == [tmp_path / "model-1.safetensors"]
    (tmp_path / identity.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(ModelLoadError, match="index.json: names '../x.safetensors', which is not a file"):
        identity.weight_files(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert identity.weight_files(tmp_path) == [tmp_path / "model.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# sweeping stale temporaries


def test_sweep_removes_only_old_kvcli_temporaries(tmp_path):
    root = tmp_path / "cache"
    (root / "models").mkdir(parents=True)
    (root / "profiles").mkdir()
    (root / "digests").mkdir()
    old_dir = root / "models" / f"{identity.temp_prefix('abc-transformers-5')}x1y2.tmp"
    old_dir.mkdir()
    (old_dir / "model.safetensors").write_bytes(b"0")
    old_file = root / "profiles" / f"{identity.temp_prefix('key.json')}0a1b2c3d4e5f.tmp"
    old_file.write_bytes(b"{")
    old_digest = root / "digests" / f"{identity.temp_prefix('d.json')}q.tmp"
    old_digest.write_bytes(b"{")
    fresh = root / "models" / f"{identity.temp_prefix('def-transformers-5')}a1.tmp"
    fresh.mkdir()
    (fresh / "config.json").write_bytes(b"{}")
    foreign = [root / "models" / ".abc.xyz", root / "profiles" / ".key.json.abc123.tmp", root / "notes.kvcli-1.tmp",
               root / ".x.kvcli-1.tmp.keep", root / "models" / "abc-transformers-5", root / "digests" / "d.json"]
    for f in foreign:
        f.write_bytes(b"keep")
    for p in [old_dir, old_dir / "model.safetensors", old_file, old_digest, *foreign]:
        age(p, 2 * format.STALE_TEMP_SECONDS)
    age(fresh, 2 * format.STALE_TEMP_SECONDS)  # an old directory with a file written just now is in use

    removed = identity.sweep_cache_dir(root)

    assert sorted(removed) == sorted([old_dir, old_file, old_digest])
    assert not old_dir.exists() and not old_file.exists() and not old_digest.exists()
    assert fresh.is_dir() and all(f.exists() for f in foreign)


def test_sweep_removes_old_digest_entries_of_deleted_weight_files(tmp_path, cache_dir):
    kept, deleted, fresh = (tmp_path / f"{n}.safetensors" for n in ("kept", "deleted", "fresh"))
    for path in (kept, deleted, fresh):
        path.write_bytes(safetensors_bytes(GOOD))
        age(path)
        identity.weights_digest([path])
    identity.tokenizer_digest(byte_tokenizer(add_bos=False))  # an entry with no file behind it
    entries = {json.loads(e.read_text())["key"].get("path"): e for e in (cache_dir / "digests").glob("*.json")}
    for entry in entries.values():
        age(entry, 2 * format.STALE_TEMP_SECONDS)
    age(entries[str(fresh)], 10)
    deleted.unlink()
    fresh.unlink()
    assert identity.sweep_cache_dir() == [entries[str(deleted)]]
    assert entries[str(kept)].exists() and entries[str(fresh)].exists() and entries[None].exists()


def test_sweep_of_a_missing_cache_dir_does_nothing(tmp_path):
    assert identity.sweep_cache_dir(tmp_path / "absent") == []
