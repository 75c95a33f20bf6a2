"""--device and --backend: the kernel file path against the torch path, through kvfile and through the commands.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest) with lanes of 3 steps (the `short_lanes`
fixture: encoder and both decoders read the same lane count rule, so the files are valid under it and the
interpreter takes few steps). With `pytest --gpu` the same tests run compiled on CUDA at the real lane length.
"""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from cli_checks import one_line_error  # noqa: E402
from kvcli.codecs.kvq import (
    KvqCodec,  # noqa: E402
    KvqDecoder,  # noqa: E402
)
from kvcli.kernels.placement import Placement, resolve  # noqa: E402

from kvcli.container import format, kvfile  # noqa: E402
from kvcli.errors import FormatError  # noqa: E402
from kvcli.modeling.kvcache import KVCache  # noqa: E402

IDENT = {"architecture": "X", "config_digest": "a" * 64, "weights_digest": "b" * 64, "tokenizer_digest": "c" * 64}
PROMPT = "Who keeps the lighthouse?"


def lossy_parts(dtype, tokens=45, heads=2, dim=8, outliers=0.2, seed=0):
    """A kvq file's header fields and segments: 3 layers, the middle one a 19-token sliding window (segments start
    mid-chunk), 2 exact sinks, and `outliers` of the values far out so that many tuples escape."""
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for layer in range(3):
        held = 19 if layer == 1 else tokens
        k = torch.randn(heads, held, dim, generator=g) + torch.randn(heads, 1, dim, generator=g) * 4
        v = torch.randn(heads, held, dim, generator=g)
        far = torch.rand(heads, held, dim, generator=g) < outliers
        keys.append(torch.where(far, k * 40, k).to(dtype))
        values.append(torch.where(far, v * 40, v).to(dtype))
    freqs = [1.0 / (10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim)) for _ in range(3)]
    # Attention received spanning 2^-12..2^12 around its mean: token weights over their whole range.
    attention = [torch.exp2(torch.randn(heads, k.shape[1], generator=g) * 4) for k in keys]
    kv = KVCache(list(range(tokens)), keys, values, attention)
    return kvfile.encode(kv, IDENT, KvqCodec(0.3, 2, None, freqs), 16)


def decode_with(data: bytes, device, backend: str) -> KVCache:
    src = format.BytesSource(data)
    return kvfile.decode(src, format.read_header(src), device=device, backend=backend)


def build(meta, parts) -> bytes:
    return format.build_header(meta, parts) + b"".join(p.data for p in parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [None, 700])
def test_triton_decode_is_bit_identical_to_torch(device, short_lanes, monkeypatch, dtype, batch):
    """One batch, and batches of a few segments each (read ahead while the previous one decodes)."""
    if batch:
        monkeypatch.setattr(KvqDecoder, "device_batch_elements", batch)
    data = build(*lossy_parts(dtype))
    want = decode_with(data, "cpu", "torch")
    got = decode_with(data, device, "triton")
    assert got.token_ids == want.token_ids and got.dtype == dtype
    for a, b in zip(want.keys + want.values, got.keys + got.values):
        assert b.device.type == device.type and torch.equal(a, b.cpu())


@pytest.mark.parametrize("tokens,sinks", [(1, 1), (3, 5), (2, 0)])
def test_triton_decode_of_tiny_and_all_sink_caches(device, tokens, sinks):
    g = torch.Generator().manual_seed(tokens)
    keys = [torch.randn(2, tokens, 4, generator=g).half()]
    values = [torch.full((2, tokens, 4), 65500.0).half()]  # near float16's limit: the clamp must agree
    kv = KVCache(list(range(tokens)), keys, values)
    meta, parts = kvfile.encode(kv, IDENT, KvqCodec(0.3, sinks, None, [np.ones(2, np.float32)]), 16)
    data = build(meta, parts)
    want, got = decode_with(data, "cpu", "torch"), decode_with(data, device, "triton")
    for a, b in zip(want.keys + want.values, got.keys + got.values):
        assert torch.equal(a, b.cpu())


def damage(parts, what: str):
    """A copy of `parts` with one tensor segment damaged (checksums are recomputed: the codec must notice)."""
    tensor = [p for p in parts if p.kind != "aux"]
    escaped = next(p for p in tensor if struct.unpack_from("<III", p.data)[2] and p.token_start >= 16)
    lanes, words, esc = struct.unpack_from("<III", escaped.data)
    raw = bytearray(escaped.data)
    if what == "word flipped":
        raw[12 + 4 * lanes + words] ^= 0x5A
    elif what == "state below 2^16":
        raw[12:16] = struct.pack("<I", 5)
    elif what == "escape frame dropped":
        body = 12 + 4 * lanes + 2 * words
        raw = bytearray(struct.pack("<III", lanes, words, 0)) + raw[12:body] + raw[body + esc :]
    elif what == "sink not finite":
        escaped = next(p for p in tensor if p.token_start == 0)
        raw = bytearray(escaped.data)
        raw[-4:] = struct.pack("<f", float("nan"))
    return [type(p)(p.kind, p.layer, p.token_start, p.token_count, bytes(raw), p.name) if p is escaped else p
            for p in parts]


@pytest.mark.parametrize("what", ["word flipped", "state below 2^16", "escape frame dropped", "sink not finite"])
def test_triton_decode_refuses_what_torch_refuses(device, short_lanes, what):
    meta, parts = lossy_parts(torch.float32)
    data = build(meta, damage(parts, what))
    errors = []
    for dev, backend in (("cpu", "torch"), (device, "triton")):
        with pytest.raises(FormatError) as err:
            decode_with(data, dev, backend)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "segment layer" in errors[0], errors


def test_auto_placement_follows_the_hardware():
    cuda = torch.cuda.is_available()
    assert resolve() == Placement(torch.device("cuda" if cuda else "cpu"), "triton" if cuda else "torch")
    assert resolve("cpu", "auto") == Placement(torch.device("cpu"), "torch")


# ---------------------------------------------------------------- the commands


@pytest.fixture
def placed(gpu) -> list[str]:
    """The arguments that put the triton path on this run's device."""
    return ["--backend", "triton", "--device", "cuda" if gpu else "cpu"]


@pytest.fixture
def torch_placed(gpu) -> list[str]:
    """The torch path on the same device: a model's forward pass differs between devices, the backends must not."""
    return ["--backend", "torch", "--device", "cuda" if gpu else "cpu"]


@pytest.fixture
def lossy_kvc(cli, llama, doc_file, tmp_path, short_lanes):
    out = tmp_path / "doc-balanced.kvc"
    result = cli("prefill", doc_file, "-o", out, "--model", llama, "--chunk-tokens", "32", "--device", "cpu",
                 "--backend", "torch")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("file", ["kvc", "lossy_kvc"])
def test_decode_backends_agree(cli, file, request, tmp_path, placed):
    """Lossless and lossy files alike: the same tensors, byte for byte."""
    path = request.getfixturevalue(file)
    torch_out, triton_out = tmp_path / "torch.safetensors", tmp_path / "triton.safetensors"
    assert cli("decode", path, "-o", torch_out, "--backend", "torch", "--device", "cpu").exit_code == 0
    result = cli("decode", path, "-o", triton_out, *placed)
    assert result.exit_code == 0, result.stderr
    assert triton_out.read_bytes() == torch_out.read_bytes()


def test_encode_and_prefill_with_triton_write_the_torch_bytes(cli, llama, doc_file, lossy_kvc, tmp_path, placed,
                                                              torch_placed):
    exported = tmp_path / "kv.safetensors"
    assert cli("decode", lossy_kvc, "-o", exported, "--device", "cpu").exit_code == 0
    for command, source in (("encode", exported), ("prefill", doc_file)):
        outs = []
        for backend in (torch_placed, placed):
            out = tmp_path / f"{command}-{backend[1]}.kvc"
            result = cli(command, source, "-o", out, "--model", llama, "--chunk-tokens", "32", *backend)
            assert result.exit_code == 0, result.stderr
            outs.append(out.read_bytes())
        assert outs[0] == outs[1], command


def test_generate_from_the_triton_path_answers_as_torch(cli, llama, lossy_kvc, placed, torch_placed):
    torch_answer = cli("generate", "--cache", lossy_kvc, "--model", llama, "-n", "8", *torch_placed, PROMPT)
    triton_answer = cli("generate", "--cache", lossy_kvc, "--model", llama, "-n", "8", *placed, PROMPT)
    assert torch_answer.exit_code == 0 and triton_answer.exit_code == 0, triton_answer.stderr
    assert triton_answer.stdout == torch_answer.stdout and torch_answer.stdout.strip()


def command_lines(kvc, doc_file, tmp_path) -> dict[str, list]:
    """Each command with --device/--backend, otherwise valid; the output it must not write."""
    return {"prefill": ["prefill", doc_file, "-o", tmp_path / "out.kvc"],
            "generate": ["generate", "--cache", kvc, PROMPT],
            "decode": ["decode", kvc, "-o", tmp_path / "out.safetensors"],
            "encode": ["encode", tmp_path / "in.safetensors", "-o", tmp_path / "out.kvc"]}


COMMANDS = ["prefill", "generate", "decode", "encode"]


@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_without_cuda_is_refused(cli, kvc, doc_file, tmp_path, command):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli(*command_lines(kvc, doc_file, tmp_path)[command], "--device", "cuda")
    one_line_error(result, 9, "--device cuda: torch")
    assert "use --device cpu" in result.stderr and not list(tmp_path.glob("out.*"))


@pytest.mark.parametrize("command", COMMANDS)
def test_triton_on_cpu_needs_the_interpreter(cli, kvc, doc_file, tmp_path, monkeypatch, command):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    result = cli(*command_lines(kvc, doc_file, tmp_path)[command], "--device", "cpu", "--backend", "triton")
    one_line_error(result, 9, "Triton needs a GPU or TRITON_INTERPRET=1")
    assert not list(tmp_path.glob("out.*"))


@pytest.mark.parametrize("command", COMMANDS)
def test_triton_backend_without_triton_is_refused(cli, kvc, doc_file, tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "triton", None)  # what Python does for a package that is not installed
    result = cli(*command_lines(kvc, doc_file, tmp_path)[command], "--backend", "triton")
    one_line_error(result, 9, "--backend triton: triton is not installed; pip install 'kvcli[gpu]'")
    assert not list(tmp_path.glob("out.*"))


@pytest.mark.parametrize("flag,value", [("--device", "tpu"), ("--backend", "cuda")])
def test_unknown_device_or_backend_is_a_usage_error(cli, kvc, tmp_path, flag, value):
    one_line_error(cli("decode", kvc, "-o", tmp_path / "out.safetensors", flag, value), 2, f"unknown {flag}")


def test_prefill_into_a_store_with_triton_writes_the_torch_files(cli, llama, doc_file, tmp_path, placed,
                                                                torch_placed, short_lanes):
    stores = []
    for name, backend in (("torch", torch_placed), ("triton", placed)):
        store = tmp_path / name
        result = cli("prefill", doc_file, "--out-dir", store, "--model", llama, "--chunk-tokens", "32", *backend)
        assert result.exit_code == 0, result.stderr
        stores.append({p.name: p.read_bytes() for p in store.glob("*.kvc")})
    assert stores[0] and stores[0] == stores[1]
