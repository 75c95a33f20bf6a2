"""Robust at the edges (issue 7): unsafe outputs, interrupted writes, resource bombs, and the small things users hit.

Each test names the defect it guards against; each asserts the exit code, the one-line message and what is left
on disk."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from cli_checks import one_line_error

from kvcli.container import format

PROMPT = " The keeper's name is"
KVCLI = [sys.executable, "-m", "kvcli"]




def run(args, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run(KVCLI + [str(a) for a in args], capture_output=True, env=env, timeout=120, **kwargs)


def rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    _, major, minor, hlen, _ = format.PREAMBLE.unpack(data[: format.PREAMBLE_SIZE])
    doc = json.loads(data[format.PREAMBLE_SIZE : format.PREAMBLE_SIZE + hlen])
    change(doc)
    raw = json.dumps(doc).encode()
    path.write_bytes(format.PREAMBLE.pack(format.MAGIC, major, minor, len(raw), zlib.crc32(raw)) + raw
                     + data[format.PREAMBLE_SIZE + hlen :])


def replace_header_bytes(path: Path, raw: bytes) -> None:
    data = path.read_bytes()
    hlen = struct_hlen(data)
    path.write_bytes(format.PREAMBLE.pack(format.MAGIC, format.MAJOR, 0, len(raw), zlib.crc32(raw)) + raw
                     + data[format.PREAMBLE_SIZE + hlen :])


def struct_hlen(data: bytes) -> int:
    return format.PREAMBLE.unpack(data[: format.PREAMBLE_SIZE])[3]


# ---------------------------------------------------------------- data loss and unsafe outputs


def test_output_that_is_the_input_is_refused(cli, llama, doc_file, tmp_path):
    before = doc_file.read_bytes()
    one_line_error(cli("prefill", doc_file, "-o", doc_file, "--model", llama), 2, "is the same file as the input")
    link = tmp_path / "hard-link.txt"
    os.link(doc_file, link)
    one_line_error(cli("prefill", doc_file, "-o", link, "--model", llama), 2, "is the same file as the input")
    assert doc_file.read_bytes() == before


def test_decode_onto_its_own_input_is_refused(cli, kvc):
    before = kvc.read_bytes()
    one_line_error(cli("decode", kvc, "-o", kvc), 2, "is the same file as the input")
    assert kvc.read_bytes() == before


def test_output_directory_is_checked_before_the_model_loads(cli, doc_file, tmp_path):
    # The model does not exist either: the output must be refused first (exit 8, not 7).
    out = tmp_path / "missing-dir" / "x.kvc"
    one_line_error(cli("prefill", doc_file, "-o", out, "--model", tmp_path / "no-model"), 8,
                   f"directory {out.parent} does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_directory_is_refused_before_work(cli, doc_file, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    one_line_error(cli("prefill", doc_file, "-o", locked / "x.kvc", "--model", tmp_path / "no-model"), 8, "not writable")


def test_output_that_is_a_directory_is_refused(cli, llama, doc_file, tmp_path):
    one_line_error(cli("prefill", doc_file, "-o", tmp_path, "--model", llama), 2, "is a directory")


def run_on_terminal(args) -> tuple[int, bytes]:
    """Run kvcli with stdout on a pseudo-terminal; returns the exit code and what reached the terminal."""
    main, child = pty.openpty()
    proc = subprocess.Popen(KVCLI + [str(a) for a in args], stdout=child, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=dict(os.environ, TQDM_DISABLE="1"))
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=120)
    os.close(main)
    return proc.returncode, seen + proc.stderr.read()


def test_binary_output_to_a_terminal_is_refused(llama, doc_file, kvc):
    code, seen = run_on_terminal(["prefill", doc_file, "-o", "-", "--model", llama])
    assert code == 2 and b"refusing to write binary data to a terminal" in seen and b"\x89KVC" not in seen
    code, seen = run_on_terminal(["decode", kvc, "-o", "-"])
    assert code == 2 and b"refusing to write binary data to a terminal" in seen


def test_decode_to_stdout_writes_the_export(cli, kvc, tmp_path):
    result = cli("decode", kvc, "-o", "-")
    assert result.exit_code == 0, result.stderr
    assert cli("decode", kvc, "-o", tmp_path / "kv.safetensors").exit_code == 0
    assert result.stdout_bytes == (tmp_path / "kv.safetensors").read_bytes()
    assert not (Path.cwd() / "-").exists()


def test_full_disk_on_stdout_is_a_storage_error(llama, doc_file):
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(KVCLI + ["prefill", str(doc_file), "-o", "-", "--model", llama, "-q", "lossless"],
                              stdout=full, stderr=subprocess.PIPE, timeout=120, env=dict(os.environ, TQDM_DISABLE="1"))
    assert proc.returncode == 8
    assert re.fullmatch(r"Error: stdout: write failed after 0 of [\d,]+ bytes: no space left on device\n",
                        proc.stderr.decode())


def test_sigterm_exits_cleanly_and_leaves_nothing(llama, tmp_path):
    """SIGTERM while kvcli waits on stdin: one line, exit 143, no output or temporary file."""
    out = tmp_path / "x.kvc"
    proc = subprocess.Popen(KVCLI + ["prefill", "-", "-o", str(out), "--model", llama], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, TQDM_DISABLE="1"))
    time.sleep(3)  # imports done: blocked reading stdin
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.decode().strip().splitlines()[-1] == "Error: terminated (SIGTERM)"
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_write_removes_the_temporary_file(tmp_path, monkeypatch):
    from kvcli.errors import Terminated

    def killed(fh, chunks):
        fh.write(chunks[0])
        raise Terminated("terminated by SIGTERM")

    monkeypatch.setattr(format, "_write_all", killed)
    with pytest.raises(Terminated):
        format.atomic_write(str(tmp_path / "out.kvc"), [b"x" * 1000, b"y"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- resource bombs and unbounded inputs


def small_foreign_cache(tmp_path: Path, lm, layers: int) -> Path:
    """A lossless file that respects every format bound and carries `lm`'s identity, with `layers` layers of
    2 heads x 200 tokens (the tiny models have 4 layers)."""
    from kvcli.codecs.lossless import ZstdCodec

    from kvcli.container import kvfile
    from kvcli.modeling.kvcache import KVCache

    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(2, 200, 16, generator=g) for _ in range(layers)]
    kv = KVCache([5] * 200, keys, [k.clone() for k in keys])
    meta, parts = kvfile.encode(kv, lm.identity, ZstdCodec(), 64)
    path = tmp_path / "bomb.kvc"
    format.write_kvc(str(path), meta, parts)
    return path


def test_cache_with_other_shapes_is_refused_before_decoding(cli, tiny_lm, llama, tmp_path, monkeypatch):
    bomb = small_foreign_cache(tmp_path, tiny_lm("llama"), layers=2)
    from kvcli.container import kvfile

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded before the layout check")

    monkeypatch.setattr(kvfile, "decode", must_not_decode)
    one_line_error(cli("generate", "--cache", bomb, "--model", llama, PROMPT), 6,
                   f"{bomb}: the cache has 2 layers, the model 4")


def test_token_ids_outside_the_vocabulary_are_refused(cli, kvc, llama):
    rewrite_header(kvc, lambda h: h["token_ids"].__setitem__(1, 999_999))
    one_line_error(cli("generate", "--cache", kvc, "--model", llama, PROMPT), 6,
                   "token id 999999 is outside the model's vocabulary of 258")


def test_prefill_of_dev_zero_is_refused_at_once(llama, tmp_path):
    started = time.monotonic()
    proc = run(["prefill", "/dev/zero", "-o", tmp_path / "x.kvc", "--model", llama])
    assert proc.returncode == 3
    assert "larger than 67,108,864 bytes" in proc.stderr.decode()
    assert time.monotonic() - started < 60 and list(tmp_path.iterdir()) == []


def test_document_too_long_in_bytes_is_refused_before_tokenizing(cli, llama, tmp_path, monkeypatch):
    doc = tmp_path / "big.txt"
    doc.write_text("word " * 20_000)  # 100,000 bytes; the tiny model's 512-token context allows 32,768
    from kvcli.modeling import inference

    monkeypatch.setattr(inference, "document_ids", lambda *a: pytest.fail("tokenized a hopeless document"))
    one_line_error(cli("prefill", doc, "-o", tmp_path / "x.kvc", "--model", llama), 3,
                   "100,000 bytes cannot fit the model's context of 512 tokens")


@pytest.mark.parametrize("raw,fragment", [
    (b'{"x":' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nests 200001 levels deep"),
    (b'{"x":' + b"7" * 5001 + b"}", "has a number that cannot be read"),
])
def test_hostile_header_json_is_one_line_everywhere(cli, llama, kvc, tmp_path, raw, fragment):
    replace_header_bytes(kvc, raw)
    one_line_error(cli("inspect", kvc), 4, fragment)
    one_line_error(cli("verify", kvc), 4, fragment)
    one_line_error(cli("decode", kvc, "-o", tmp_path / "x.safetensors"), 4, fragment)
    one_line_error(cli("generate", "--cache", kvc, "--model", llama, PROMPT), 4, fragment)
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- writers must not produce what readers refuse


def export(cli, kvc, tmp_path) -> Path:
    path = tmp_path / "kv.safetensors"
    assert cli("decode", kvc, "-o", path).exit_code == 0
    return path


def test_non_finite_values_are_refused_by_lossy_encode_and_kept_by_lossless(cli, kvc, llama, tmp_path):
    from safetensors.torch import load_file, save_file

    path = export(cli, kvc, tmp_path)
    tensors = load_file(path)
    tensors["keys.1"][0, 3, 2] = float("nan")
    tensors["values.2"][1, 4, 0] = float("inf")
    save_file(tensors, path)
    out = tmp_path / "nan.kvc"
    one_line_error(cli("encode", path, "-o", out, "--model", llama, "-q", "balanced"), 3, "keys.1 holds NaN or Inf")
    assert not out.exists()
    assert cli("encode", path, "-o", out, "--model", llama, "-q", "lossless").exit_code == 0
    back = tmp_path / "back.safetensors"
    assert cli("decode", out, "-o", back).exit_code == 0
    again = load_file(back)
    assert torch.isnan(again["keys.1"][0, 3, 2]) and torch.isinf(again["values.2"][1, 4, 0])


def test_encode_validates_the_layout_against_the_model(cli, kvc, llama, tmp_path):
    from safetensors.torch import load_file, save_file

    path = export(cli, kvc, tmp_path)
    tensors = load_file(path)
    tensors["input_ids"] = torch.cat([tensors["input_ids"], tensors["input_ids"]])
    save_file(tensors, path)
    out = tmp_path / "x.kvc"
    one_line_error(cli("encode", path, "-o", out, "--model", llama), 6, "layer 0 holds tokens from")
    assert not out.exists()


def test_encode_of_a_directory_says_so(cli, llama, tmp_path):
    one_line_error(cli("encode", tmp_path, "-o", tmp_path / "x.kvc", "--model", llama), 3, "is a directory")


# ---------------------------------------------------------------- small things users hit


def test_inspect_says_larger_for_a_lossless_file(cli, kvc):
    text = cli("inspect", kvc).stdout
    assert "x larger" in text and "x smaller" not in text


def test_provenance_is_recorded_and_shown(cli, kvc, doc_file, llama, tmp_path):
    info = json.loads(cli("inspect", kvc, "--json").stdout)
    raw = doc_file.read_bytes()
    assert info["source"] == {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    assert info["created_at"] == "2026-01-01T00:00:00Z" and info["created_by"].startswith("kvcli ")
    assert "extra" not in info
    assert f"{len(raw):,} bytes" in cli("inspect", kvc).stdout
    # decode then encode keeps the provenance (it travels in the export's safetensors metadata)
    again = tmp_path / "again.kvc"
    assert cli("encode", export(cli, kvc, tmp_path), "-o", again, "--model", llama, "-q", "lossless",
               "--chunk-tokens", "32").exit_code == 0
    assert json.loads(cli("inspect", again, "--json").stdout)["source"] == info["source"]


def test_created_at_follows_the_clock_without_source_date_epoch(llama, doc_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    out = tmp_path / "x.kvc"
    subprocess.run(KVCLI + ["prefill", str(doc_file), "-o", str(out), "--model", llama, "-q", "lossless"],
                   check=True, env=env, capture_output=True, timeout=120)
    header = format.read_header(format.BytesSource(out.read_bytes()))
    made = time.mktime(time.strptime(header.created_at, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(made - time.time()) < 300


@pytest.mark.parametrize("args,fragment", [
    (["decode"], "Missing argument 'file'. (see `kvcli decode --help`)"),
    (["prefill", "x.txt", "-o", "y.kvc", "--chunk-tokens", "0"], "Invalid value for '--chunk-tokens'"),
    (["inspect", "--bogus"], "No such option: --bogus"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line(args, fragment):
    proc = run(args)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], lines


def test_prefill_json_goes_to_stdout(cli, llama, doc_file, tmp_path):
    out = tmp_path / "x.kvc"
    result = cli("prefill", doc_file, "-o", out, "--model", llama, "-q", "lossless", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and summary["bytes"] == out.stat().st_size


def test_empty_prompt_is_refused_before_anything_loads(cli, kvc, tmp_path):
    one_line_error(cli("generate", "--cache", kvc, "--model", tmp_path / "no-model", ""), 2, "the prompt is empty")


def test_internal_errors_are_not_blamed_on_the_file(cli, kvc, monkeypatch):
    from kvcli.container import report

    monkeypatch.setattr(report, "describe", lambda *a: {}["boom"])
    one_line_error(cli("inspect", kvc), 10, "internal error: KeyError")
    assert "--debug" in cli("inspect", kvc).stderr


# ---------------------------------------------------------------- generate for RAG users


def test_stop_sequences_cut_the_answer(cli, kvc, llama):
    full = cli("generate", "--cache", kvc, "--model", llama, "-n", "16", "--json", PROMPT)
    text = json.loads(full.stdout)["text"]
    assert len(text) > 4
    stop = text[3:5]
    cut = json.loads(cli("generate", "--cache", kvc, "--model", llama, "-n", "16", "--json", "--stop", stop,
                         PROMPT).stdout)
    assert cut["text"] == text[: text.find(stop)] and cut["stopped_by"] == "stop"


def test_prompts_file_answers_each_line_with_one_load(cli, kvc, llama, tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": PROMPT}) + "\n\n" + json.dumps(" Every evening") + "\n")
    result = cli("generate", "--cache", kvc, "--model", llama, "-n", "6", "--prompts", prompts)
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line.get("id") for line in lines] == ["a", None]
    single = cli("generate", "--cache", kvc, "--model", llama, "-n", "6", PROMPT).stdout.strip()
    assert lines[0]["text"].strip() == single
    assert {"model_load_s", "cache_load_s", "ttft_s", "total_s"} <= set(lines[0])


def test_prompts_file_errors_name_the_line(cli, kvc, llama, tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    one_line_error(cli("generate", "--cache", kvc, "--model", llama, "--prompts", prompts), 3, "line 2: expected")


def test_chat_needs_a_chat_template(cli, kvc, llama):
    one_line_error(cli("generate", "--cache", kvc, "--model", llama, "--chat", PROMPT), 2, "has no chat template")


def test_json_timings_separate_the_stages(cli, kvc, llama):
    info = json.loads(cli("generate", "--cache", kvc, "--model", llama, "-n", "4", "--json", PROMPT).stdout)
    assert info["model_load_s"] > 0 and info["cache_load_s"] > 0 and info["ttft_s"] > 0
    assert info["total_s"] >= info["model_load_s"] + info["cache_load_s"]


def test_codec_refusals_at_encode_time_are_input_errors(cli, kvc, llama, tmp_path):
    """Data a codec cannot store within its reader's bounds (here all zeros, beyond zstd's maximum expansion)
    is refused before anything is written, as an input problem, not an internal error."""
    from safetensors.torch import load_file, save_file

    path = export(cli, kvc, tmp_path)
    tensors = {k: (torch.zeros_like(v) if k != "input_ids" else v) for k, v in load_file(path).items()}
    save_file(tensors, path)
    out = tmp_path / "zeros.kvc"
    one_line_error(cli("encode", path, "-o", out, "--model", llama, "-q", "lossless"), 3,
                   "cannot store this cache with codec zstd")
    assert not out.exists()


def test_lossy_preset_without_a_profile_says_so_once(cli, llama, doc_file, tmp_path, monkeypatch):
    from kvcli.reuse import pipeline

    monkeypatch.setattr(pipeline, "_warned_no_profile", set())
    first = cli("prefill", doc_file, "-o", tmp_path / "a.kvc", "--model", llama, "-q", "balanced")
    again = cli("prefill", doc_file, "-o", tmp_path / "b.kvc", "--model", llama, "-q", "small")
    assert first.exit_code == 0 and again.exit_code == 0
    assert first.stderr.count("no calibration profile for llama-00") == 1 and "kvcli calibrate" in first.stderr
    assert "no calibration profile" not in again.stderr
    lossless = cli("prefill", doc_file, "-o", tmp_path / "c.kvc", "--model", llama, "-q", "lossless")
    assert "no calibration profile" not in lossless.stderr
