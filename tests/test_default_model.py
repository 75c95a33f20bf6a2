"""The bundled default model end to end, through the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcli.modeling import models

DOC = ("Marta Ilves founded the Ostrava Glassworks in 1921. The works made lamp chimneys at first, then bottles. "
       "In 1954 the factory moved to a new site by the river, and Marta's grandson Pavel ran it until 1990.\n")


def kvcli(*args, input=None):
    exe = Path(sys.executable).with_name("kvcli")
    assert exe.exists(), "the kvcli console script is not installed beside this Python"
    return subprocess.run([exe, *map(str, args)], input=input, capture_output=True, text=True, timeout=600)


def test_default_model_resolves_to_the_bundled_gguf():
    source = models.resolve(None)
    assert source.gguf is not None and source.gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_model_identity(default_lm):
    assert default_lm.identity["architecture"] == "LlamaForCausalLM"
    cfg = default_lm.model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (30, 3, 64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generate_from_cache_prints_the_same_text_as_full_prefill(tmp_path, dtype):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    out = tmp_path / "doc.kvc"
    made = kvcli("prefill", doc, "-o", out, "--dtype", dtype, "--quality", "lossless")
    assert made.returncode == 0, made.stderr
    question = "\nQuestion: In which year did the factory move?\nAnswer:"
    cached = kvcli("generate", "--cache", out, "-n", "16", question)
    full = kvcli("generate", "--document", doc, "--dtype", dtype, "-n", "16", question)
    assert cached.returncode == 0 and full.returncode == 0, cached.stderr + full.stderr
    assert cached.stdout == full.stdout and cached.stdout.strip()


@pytest.mark.slow
def test_chat_answers_end_where_the_turn_ends(tmp_path):
    """--chat on a plain document cache: the answer stops at the template's end of turn, and equals the answer
    of the same chat prompt after a full prefill of the document."""
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    out = tmp_path / "doc.kvc"
    assert kvcli("prefill", doc, "-o", out, "--quality", "lossless").returncode == 0
    question = "In which year did the factory move? Answer with the year only."
    cached = kvcli("generate", "--cache", out, "--chat", "-n", "48", "--json", question)
    full = kvcli("generate", "--document", doc, "--chat", "-n", "48", "--json", question)
    assert cached.returncode == 0, cached.stderr
    answer = json.loads(cached.stdout)
    assert answer["text"] == json.loads(full.stdout)["text"]
    assert answer["stopped_by"] == "eos" and answer["text"].strip()
