"""Model loading at the edges: damaged files end in one ModelLoadError naming the file, and a re-saved or copied
model keeps its identity and its calibration profile."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from kvcli.codecs.kvq import Profile

from kvcli.calibration import profiles
from kvcli.container import identity
from kvcli.errors import ModelLoadError
from kvcli.modeling import models


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "kvcli-cache"
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(root))
    return root


def leftovers(cache_dir: Path) -> list[str]:
    return [p.name for p in cache_dir.rglob("*") if identity.TEMP_NAME.match(p.name)]


def test_text_file_named_gguf_is_refused_naming_it(tmp_path, cache_dir):
    fake = tmp_path / "notes.gguf"
    fake.write_text("these are my notes, not a model\n")
    with pytest.raises(ModelLoadError, match=r"notes.gguf: not a GGUF file \(it starts with b'thes'") as err:
        models.load(str(fake))
    assert err.value.exit_code == 7 and "\n" not in str(err.value)
    assert leftovers(cache_dir) == []


def test_cli_reports_a_bad_model_file_in_one_line_with_exit_7(cli, tmp_path, cache_dir, doc_file):
    fake = tmp_path / "notes.gguf"
    fake.write_text("these are my notes, not a model\n")
    result = cli("prefill", doc_file, "-o", tmp_path / "doc.kvc", "--model", fake)
    assert result.exit_code == 7
    assert result.stderr == f"Error: {fake}: not a GGUF file (it starts with b'thes', not b'GGUF')\n"
    assert not (tmp_path / "doc.kvc").exists()


@pytest.mark.parametrize("keep", [100, 5_000_000, -16])
def test_truncated_gguf_is_refused_naming_it(tmp_path, cache_dir, keep):
    data = models.default_gguf_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ModelLoadError, match="cut.gguf: not a readable GGUF file") as err:
        models.load(str(cut))
    assert "\n" not in str(err.value)
    assert leftovers(cache_dir) == []


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gguf_string(b: bytes) -> bytes:
    return u64(len(b)) + b


def gguf_bytes(version=3, kvs=None, tensors=None, data=bytes(64), alignment=32) -> bytes:
    """A GGUF file by hand: header, metadata (type-tagged values), tensor infos, padding, data."""
    kvs = [(b"general.alignment", 4, u32(alignment)), (b"tokens", 9, u32(8) + u64(2) + gguf_string(b"a") + gguf_string(b"bc"))] \
        if kvs is None else kvs
    tensors = [(b"w", [8], 0, 0), (b"q", [32], 2, 32)] if tensors is None else tensors  # F32, then Q4_0
    out = b"GGUF" + u32(version) + u64(len(tensors)) + u64(len(kvs))
    for key, kind, value in kvs:
        out += gguf_string(key) + u32(kind) + value
    for name, shape, ggml_type, offset in tensors:
        out += gguf_string(name) + u32(len(shape)) + b"".join(u64(d) for d in shape) + u32(ggml_type) + u64(offset)
    return out + bytes(-len(out) % alignment) + data


def test_well_formed_gguf_header_passes(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes(data=bytes(32 + 18)))
    models.check_gguf(path)


@pytest.mark.parametrize("blob, reason", [
    (gguf_bytes(version=1), "GGUF version 1"),
    (gguf_bytes(data=bytes(32 + 17)), "tensor 'q' ends at byte"),
    (gguf_bytes(tensors=[]), "no tensors"),
    (gguf_bytes(tensors=[(b"w", [], 0, 0)]), "tensor 'w' has 0 dimensions"),
    (gguf_bytes(tensors=[(b"w", [8], 99, 0)]), "unknown ggml type 99"),
    (gguf_bytes(tensors=[(b"q", [31], 2, 0)]), "31 is not a multiple of its block size 32"),
    (gguf_bytes(kvs=[(b"k", 13, b"")]), "metadata value type 13"),
    (gguf_bytes(kvs=[(b"k", 9, u32(9) + u64(1) + u32(9) + u64(1) + u32(9) + u64(1) + u32(0) + u64(0))]), "nested too deep"),
    (gguf_bytes(kvs=[(b"k", 9, u32(8) + u64(1 << 60))]), "past the end of the file"),
    (gguf_bytes(kvs=[(b"general.alignment", 4, u32(0))]), "general.alignment is 0"),
    (gguf_bytes()[:30], "past the end of the file"),
])
def test_damaged_gguf_header_is_refused_naming_the_file(tmp_path, blob, reason):
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(ModelLoadError, match=f"bad.gguf: not a readable GGUF file .*{re.escape(reason)}"):
        models.check_gguf(path)


def test_failed_conversion_leaves_no_temporary_directory(tmp_path, cache_dir):
    # A whole GGUF that is no model: transformers fails after the temporary directory exists.
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(gguf_bytes(data=bytes(32 + 18)))
    with pytest.raises(ModelLoadError, match="fake.gguf: cannot convert this GGUF model: .*general.architecture"):
        models.load(str(fake))
    assert (cache_dir / "models").is_dir() and list((cache_dir / "models").iterdir()) == []


@pytest.mark.slow
def test_sigterm_during_the_first_conversion_leaves_no_temporary_directory(tmp_path, cache_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document.\n")
    exe = Path(sys.executable).with_name("kvcli")
    proc = subprocess.Popen([exe, "prefill", doc, "-o", tmp_path / "doc.kvc"], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, KVCLI_CACHE_DIR=str(cache_dir)))
    deadline = time.time() + 120
    while not leftovers(cache_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert leftovers(cache_dir), "the conversion never started"
    time.sleep(1.0)  # let transformers get into the conversion
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "SIGTERM" in err
    assert leftovers(cache_dir) == [] and not any((cache_dir / "models").iterdir())


@pytest.mark.parametrize("keep", [4, 100, -1])
def test_truncated_model_safetensors_is_refused_naming_it(tiny_model_dir, tmp_path, cache_dir, keep):
    copy = Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "copy"))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(ModelLoadError, match=r"copy/model.safetensors: not a valid safetensors file") as err:
        models.load(str(copy))
    assert err.value.exit_code == 7 and "\n" not in str(err.value)


def test_resaved_model_still_finds_the_profile_made_for_the_original(tiny_model_dir, tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("qwen2")
    original = models.load(str(src))
    sens = np.ones((original.config.num_hidden_layers, 2))
    profiles.save(Profile("tiny", sens, None), original.identity, {"texts": []})
    resaved = Path(shutil.copytree(src, tmp_path / "resaved"))
    (resaved / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(resaved, max_shard_size="100KB")
    assert len(identity.weight_files(resaved)) > 1
    found = profiles.find(models.load(str(resaved)).identity)
    assert found is not None and found.name == "tiny"
    assert profiles.find(models.load(str(tiny_model_dir("qwen2", 1))).identity) is None


def test_malformed_user_profile_is_named(tmp_path, cache_dir):
    from kvcli.errors import FormatError

    (cache_dir / "profiles").mkdir(parents=True)
    (cache_dir / "profiles" / "broken.json").write_text('{"model": ')
    with pytest.raises(FormatError, match="broken.json: cannot read profile"):
        profiles.find({"config_digest": "c", "weights_digest": "w"})


@pytest.mark.slow
def test_plain_copy_of_the_converted_default_model_has_its_identity(default_lm, tmp_path):
    converted = models.converted_dir(models.default_gguf_path())
    copy = Path(shutil.copytree(converted, tmp_path / "smollm2-copy"))
    copied = models.load(str(copy)).identity
    assert copied | {"name": None} == default_lm.identity | {"name": None}


@pytest.mark.slow
def test_shipped_profile_matches_the_default_model(default_lm):
    found = profiles.find(default_lm.identity)
    assert found is not None and found.name == "SmolLM2-135M-Instruct"
