"""The command line: exit codes, exact messages, stdin/stdout, and no partial output on failure."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from cli_checks import one_line_error

PROMPT = " The keeper's name is"




def test_prefill_then_generate_matches_full_prefill(cli, llama, kvc, doc_file):
    cached = cli("generate", "--cache", kvc, "--model", llama, "-n", "12", PROMPT)
    full = cli("generate", "--document", doc_file, "--model", llama, "-n", "12", PROMPT)
    assert cached.exit_code == 0 and full.exit_code == 0
    assert cached.stdout == full.stdout and cached.stdout.strip()


def test_prefill_stdin_to_stdout_equals_file_output(cli, llama, kvc, doc_file):
    result = cli("prefill", "-", "-o", "-", "--model", llama, "--chunk-tokens", "32", "-q", "lossless",
                 input=doc_file.read_bytes())
    assert result.exit_code == 0
    assert result.stdout_bytes == kvc.read_bytes()


def test_rerun_is_idempotent(cli, llama, kvc, doc_file):
    before = kvc.read_bytes()
    assert cli("prefill", doc_file, "-o", kvc, "--model", llama, "--chunk-tokens", "32", "-q", "lossless").exit_code == 0
    assert kvc.read_bytes() == before


def test_decode_encode_roundtrip_is_byte_identical(cli, llama, kvc, tmp_path):
    st = tmp_path / "kv.safetensors"
    assert cli("decode", kvc, "-o", st).exit_code == 0
    again = tmp_path / "again.kvc"
    result = cli("encode", st, "-o", again, "--model", llama, "--chunk-tokens", "32", "-q", "lossless")
    assert result.exit_code == 0, result.stderr
    assert again.read_bytes() == kvc.read_bytes()


def test_decode_export_layout(cli, kvc, tmp_path, tiny_lm):
    from safetensors.torch import load_file

    st = tmp_path / "kv.safetensors"
    assert cli("decode", kvc, "-o", st).exit_code == 0
    tensors = load_file(st)
    n = tensors["input_ids"].shape[0]
    assert str(tensors["input_ids"].dtype) == "torch.int64"
    assert tuple(tensors["keys.0"].shape) == (2, n, 16) and tuple(tensors["values.3"].shape) == (2, n, 16)


def test_decode_exports_the_header_dtype_and_only_the_tokens_a_window_holds(cli, tmp_path):
    """docs/format.md, "Export": keys.{i} and values.{i} in the cache's dtype, a sliding-window layer only its held
    tokens, input_ids int64 with every token, the provenance in one metadata entry; no model needed."""
    from pathlib import Path

    from safetensors import safe_open

    golden = Path(__file__).parent / "golden" / "tiny-kvq-balanced.kvc"  # float16; layer 1 holds 39 of 259 tokens
    st = tmp_path / "kv.safetensors"
    assert cli("decode", golden, "-o", st).exit_code == 0
    with safe_open(st, "pt") as f:
        names, meta = set(f.keys()), f.metadata()
        tensors = {name: f.get_tensor(name) for name in names}
    assert names == {"input_ids"} | {f"{kind}.{i}" for kind in ("keys", "values") for i in range(3)}
    assert tensors["input_ids"].dtype == torch.int64 and tensors["input_ids"].tolist() == list(range(1000, 1259))
    assert {t.dtype for name, t in tensors.items() if name != "input_ids"} == {torch.float16}
    assert [tuple(tensors[f"keys.{i}"].shape) for i in range(3)] == [(2, 259, 8), (2, 39, 8), (2, 259, 8)]
    assert json.loads(meta["kvcli.provenance"]) == {"created_at": "2026-01-01T00:00:00Z"}


def test_inspect_json(cli, kvc):
    result = cli("inspect", kvc, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["layers"] == 4 and info["kv_heads"] == 2 and info["head_dim"] == 16
    assert info["codec"]["name"] == "zstd" and info["dtype"] == "float32"
    assert info["file_bytes"] == kvc.stat().st_size
    assert info["ratio_vs_fp16"] == pytest.approx(info["elements"] * 2 / info["file_bytes"], rel=1e-3)
    assert sum(r["k_bytes"] + r["v_bytes"] for r in info["per_layer"]) + info["header_bytes"] == info["file_bytes"]


def test_inspect_text(cli, kvc):
    result = cli("inspect", kvc)
    assert result.exit_code == 0
    assert "LlamaForCausalLM" in result.stdout and "bits/element" in result.stdout


def test_verify_ok(cli, kvc):
    result = cli("verify", kvc)
    assert result.exit_code == 0 and result.stdout.strip().endswith("ok (48 segments)")


# ---------------------------------------------------------------- bad input


def test_missing_document(cli, llama, tmp_path):
    out = tmp_path / "o.kvc"
    one_line_error(cli("prefill", tmp_path / "nope.txt", "-o", out, "--model", llama), 3, "no such file")
    assert not out.exists()


def test_empty_document(cli, llama, tmp_path):
    doc, out = tmp_path / "empty.txt", tmp_path / "o.kvc"
    doc.write_text("  \n")
    one_line_error(cli("prefill", doc, "-o", out, "--model", llama), 3, "document is empty")
    assert not out.exists()


def test_non_utf8_document(cli, llama, tmp_path):
    doc, out = tmp_path / "latin1.txt", tmp_path / "o.kvc"
    doc.write_bytes("café".encode("latin-1"))
    one_line_error(cli("prefill", doc, "-o", out, "--model", llama), 3, "not UTF-8 text (invalid byte at offset 3)")
    assert not out.exists()


def test_document_longer_than_context(cli, llama, tmp_path):
    doc, out = tmp_path / "long.txt", tmp_path / "o.kvc"
    doc.write_text("x" * 600)
    one_line_error(cli("prefill", doc, "-o", out, "--model", llama), 3,
                   "the document is 601 tokens, longer than the model's context of 512 tokens")
    assert not out.exists()


def damaged(kvc, tmp_path, fn):
    path = tmp_path / "bad.kvc"
    path.write_bytes(fn(kvc.read_bytes()))
    return path


@pytest.mark.parametrize("name,fn,code,fragment", [
    ("truncated", lambda d: d[: len(d) // 2], 4, "truncated"),
    ("flipped", lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:], 4, "checksum mismatch"),
    ("magic", lambda d: b"GGUF" + d[4:], 4, "not a .kvc file (wrong magic)"),
    ("future", lambda d: d[:8] + struct.pack("<H", 9) + d[10:], 5, ".kvc major version 9 is not supported"),
    ("claims", lambda d: d[:12] + struct.pack("<I", len(d) * 2) + d[16:], 4, "header claims"),
])
def test_damaged_cache(cli, llama, kvc, tmp_path, name, fn, code, fragment):
    bad = damaged(kvc, tmp_path, fn)
    one_line_error(cli("generate", "--cache", bad, "--model", llama, PROMPT), code, fragment)
    one_line_error(cli("verify", bad), code, fragment)
    out = tmp_path / "x.safetensors"
    one_line_error(cli("decode", bad, "-o", out), code, fragment)
    assert not out.exists()


def test_flipped_byte_names_the_segment(cli, kvc, tmp_path):
    bad = damaged(kvc, tmp_path, lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:])
    one_line_error(cli("verify", bad), 4, "segment layer 3 V tokens")


def test_cache_from_a_different_model(cli, kvc, tiny_model_dir):
    other = tiny_model_dir("llama", seed=1)  # same architecture and shapes, other weights
    one_line_error(cli("generate", "--cache", kvc, "--model", other, PROMPT), 6, "weights differ")


def test_cache_from_a_different_architecture(cli, kvc, tiny_model_dir):
    one_line_error(cli("generate", "--cache", kvc, "--model", tiny_model_dir("qwen2"), PROMPT), 6, "architecture")


def test_model_path_does_not_exist(cli, doc_file, tmp_path):
    out = tmp_path / "o.kvc"
    one_line_error(cli("prefill", doc_file, "-o", out, "--model", tmp_path / "no-model"), 7, "model path does not exist")
    assert not out.exists()


def test_missing_cache_file(cli, llama, tmp_path):
    one_line_error(cli("generate", "--cache", tmp_path / "none.kvc", "--model", llama, PROMPT), 3, "no such file")


def test_generate_needs_exactly_one_context(cli, llama, kvc, doc_file):
    one_line_error(cli("generate", "--model", llama, PROMPT), 2, "exactly one of")
    one_line_error(cli("generate", "--cache", kvc, "--document", doc_file, PROMPT), 2, "exactly one of")


def test_unknown_quality(cli, llama, doc_file, tmp_path):
    one_line_error(cli("prefill", doc_file, "-o", tmp_path / "o.kvc", "--quality", "best"), 2, "unknown --quality")


def test_debug_keeps_the_traceback(cli, tmp_path):
    from typer.testing import CliRunner

    from kvcli.cli import app
    from kvcli.errors import InputError

    result = CliRunner().invoke(app, ["--debug", "verify", str(tmp_path / "none.kvc")])
    assert isinstance(result.exception, InputError)


def test_real_entry_point_exit_code(tmp_path):
    """The installed console script, not the in-process runner: stderr and exit code as a shell sees them."""
    proc = subprocess.run([sys.executable, "-m", "kvcli", "verify", str(tmp_path / "none.kvc")],
                          capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stderr == f"Error: {tmp_path / 'none.kvc'}: no such file\n"


def test_default_quality_is_balanced_and_inspect_shows_bits(cli, llama, doc_file, tmp_path):
    out = tmp_path / "lossy.kvc"
    assert cli("prefill", doc_file, "-o", out, "--model", llama, "--step-scale", "0.5", "--sinks", "2").exit_code == 0
    info = json.loads(cli("inspect", out, "--json").stdout)
    params = info["codec"]["params"]
    assert info["codec"]["name"] == "kvq" and params["quality"] == "balanced"
    assert params["step_scale"] == 0.5 and params["sinks"] == 2 and params["profile"] == "none"
    assert all(r["k_bits_per_element"] > 0 and r["v_bits_per_element"] > 0 for r in info["per_layer"])
    text = cli("inspect", out).stdout
    assert "K bits/el" in text and "quality=balanced" in text


def test_quality_tiny_is_the_smallest_preset(cli, llama, doc_file, tmp_path):
    sizes = {}
    for preset in ("small", "tiny"):
        out = tmp_path / f"{preset}.kvc"
        assert cli("prefill", doc_file, "-o", out, "--model", llama, "-q", preset).exit_code == 0
        info = json.loads(cli("inspect", out, "--json").stdout)
        assert info["codec"]["name"] == "kvq" and info["codec"]["params"]["quality"] == preset
        sizes[preset] = out.stat().st_size
        assert cli("verify", out).exit_code == 0
    assert sizes["tiny"] < sizes["small"]


def test_lossy_cache_answers(cli, llama, doc_file, tmp_path):
    out = tmp_path / "lossy.kvc"
    assert cli("prefill", doc_file, "-o", out, "--model", llama, "-q", "high").exit_code == 0
    result = cli("generate", "--cache", out, "--model", llama, "-n", "8", PROMPT)
    assert result.exit_code == 0 and result.stdout.strip()


@pytest.mark.parametrize("command", [[], ["prefill"], ["generate"], ["decode"], ["inspect"], ["verify"], ["push"],
                                     ["pull"], ["serve-cache"], ["calibrate"]])
def test_help_shows_no_type_for_flags(cli, command):
    """A flag takes no value: typer's `<bool>` beside it read as if it wanted one."""
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.stderr
    assert "--help" in result.stdout and "<bool>" not in result.stdout


def test_help_still_shows_the_type_of_options_that_take_a_value(cli):
    assert "<int range>" in cli("prefill", "--help").stdout
