"""KvcliConnector end to end in a real vLLM (the CPU build, in .venv-vllm): each engine runs in its own process
(tests/vllm_runs.py) on the default model in float32, one engine per role:

- R: vLLM without a connector, the reference answers;
- A: saves the first prompt's KV to a directory store at two levels (lossless and balanced, one file each);
- B: a fresh engine reading the same files from S3 (moto_server): the same tokens as R, num_cached_tokens shows
  the hit (512 of a 573-token prompt, 512 for a second question, 256 for a prompt sharing only 300 tokens); then
  the S3 server is stopped and the next answer is computed, right, with the fault counted;
- F: under a deadline, a serve-cache server over a copy of the store whose lossless file has a damaged segment in
  a late layer: the load claims that level and vLLM recomputes the blocks and answers right; a cache made by
  `kvcli prefill` (transformers, lossless and balanced) answers in vLLM (a deadline load of its lossless level,
  chunk by chunk), with the KL of its next-token
  distribution against vLLM's own prefill measured; then the server is stopped: the next prompt is computed too.
And the other way: the cache vLLM saved answers in `kvcli generate`, with the KL against kvcli's own prefill.

Skipped only when .venv-vllm is absent outside CI (`bash scripts/setup.sh vllm` builds it); in CI (CI=true) a
missing environment is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kvcli.container import format
from kvcli.integrations.vllm.deadline import speeds_name
from kvcli.reuse import controller
from kvcli.storage.store import DirStore, open_store
from servers import KVCLI, REPO, CacheServer, moto_server

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
ENGINE_TIMEOUT_S = 420
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{VLLM_PYTHON} is missing: `bash scripts/setup.sh vllm` builds it")
        pytest.skip(f"{VLLM_PYTHON} is missing: `bash scripts/setup.sh vllm` builds it")
    return VLLM_PYTHON


QUESTION2 = "\nQuestion: Which module is described?\nAnswer:"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """The default model's directory and four prompts: over one document of 560 tokens, the document plus a
    question, plus another question, and its first 300 tokens plus something else; then a second document (a text
    file, for `kvcli prefill`) plus a question."""
    from transformers import AutoTokenizer

    from kvcli.modeling import models

    directory = models.local_directory(models.resolve(None))
    tok = AutoTokenizer.from_pretrained(str(directory))
    text = (REPO / "kvcli/calibration/data/calibration-python-heapq.txt").read_text()
    ids = tok(text, add_special_tokens=True)["input_ids"]
    doc = ids[:560]

    def words(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    second = tmp_path_factory.mktemp("docs") / "second.txt"
    second.write_text(tok.decode(ids[1200:1500]))
    return str(directory), [doc + words("\nQuestion: What does heappush do?\nAnswer:"), doc + words(QUESTION2),
                            ids[:300] + words(" Now about tomatoes.\nQuestion: What is grown?\nAnswer:"),
                            tok(second.read_text(), add_special_tokens=True)["input_ids"] + words(QUESTION2)], second


def run_engine(python: Path, tmp: Path, name: str, spec: dict, env: dict | None = None, on_pause=None) -> list[dict]:
    """One engine process answering spec's prompts; on_pause(i) runs when it waits before prompt i."""
    (tmp / name).mkdir()
    spec_path = tmp / name / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log = open(tmp / name / "engine.log", "w")
    results = open(tmp / name / "results.jsonl", "w")  # a file, not a pipe: nobody reads a pipe while we wait
    proc = subprocess.Popen([str(python), str(REPO / "tests" / "vllm_runs.py"), str(spec_path)], cwd=REPO,
                            stdout=results, stderr=log, text=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
    try:
        pending = list(spec.get("pause_before", []))
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while pending and time.monotonic() < deadline and proc.poll() is None:
            hand = Path(spec["handshake_dir"])
            if (hand / f"ready.{pending[0]}").exists():
                on_pause(pending[0])
                (hand / f"go.{pending[0]}").touch()
                pending.pop(0)
            time.sleep(0.1)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        results.close()
    out = (tmp / name / "results.jsonl").read_text()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) != len(spec["prompts"]) + 1:
        tail = (out + (tmp / name / "engine.log").read_text())[-4000:]
        pytest.fail(f"engine {name} exited {proc.returncode} with {len(lines)} result lines:\n{tail}")
    return lines


def connector(store: str, tmp: Path, name: str, **settings) -> dict:
    return {"store": store, "stats_dir": str(tmp / name / "stats"), **settings}


def lossless_file(directory: Path) -> Path:
    """The store's lossless file (engine A saves two levels)."""
    (path,) = [p for p in directory.glob("*.kvc") if header_of(p).codec["name"] == "zstd"]
    return path


def header_of(path: Path) -> format.Header:
    src = format.open_source(str(path))
    try:
        return format.read_header(src)
    finally:
        src.close()


def damage_late_segment(path: Path) -> str:
    """Flip one byte inside the second chunk's value segment of the second-to-last layer: the header and index stay
    sound (a first load under a deadline takes its first chunk from the lowest level: the second is read here)."""
    src = format.open_source(str(path))
    header = format.read_header(src)
    src.close()
    seg = next(s for s in header.segments if s.kind == "v" and s.layer == len(header.layers) - 2
               and s.token_start == header.chunk_tokens)
    data = bytearray(path.read_bytes())
    data[header.data_offset + seg.offset + seg.length // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return seg.label()


@pytest.fixture(scope="module")
def engines(vllm_python, prompts, tmp_path_factory):
    model, ids, second = prompts
    tmp = tmp_path_factory.mktemp("vllm")
    base = {"model": model, "max_tokens": 8}
    reference = run_engine(vllm_python, tmp, "R", {**base, "prompts": ids, "connector": None, "logprobs_for": [3]})
    store = tmp / "store"
    saver = run_engine(vllm_python, tmp, "A", {**base, "prompts": ids[:1], "await_saves": 1,
                                                "connector": connector(str(store), tmp, "A",
                                                                       quality="lossless,balanced")})
    return {"tmp": tmp, "ids": ids, "model": model, "store": store, "R": reference, "A": saver, "second": second}


def test_a_saved_prefix_answers_in_a_fresh_engine_from_s3(vllm_python, engines):
    """Lossless: the same tokens as the saving engine and as vLLM without a connector; num_cached_tokens counts
    the loaded tokens (whole 256-token chunks, whole blocks, never the last prompt token)."""
    tmp, ids, ref = engines["tmp"], engines["ids"], engines["R"]
    assert engines["A"][0]["tokens"] == ref[0]["tokens"]
    saved = engines["A"][1]["stats"]
    assert saved["saves"] == 1 and saved["saved_files_lossless"] == 1 and saved["saved_files_balanced"] == 1
    header = header_of(lossless_file(engines["store"]))  # both levels hold the prompt's chunks in the index
    hits = DirStore(engines["store"]).prefix_hits(header.model, header.dtype, ids[0])
    assert sorted(h.quality for h in hits) == ["balanced", "lossless"] and {h.tokens for h in hits} == {512}
    with moto_server() as aws:
        import boto3

        os.environ.update(aws)  # the store and the engine read the endpoint from the environment
        try:
            boto3.client("s3").create_bucket(Bucket="caches")
            s3 = open_store("s3://caches/kv")
            for key_entry in DirStore(engines["store"]).list():
                s3.put(key_entry["key"], engines["store"] / f"{key_entry['key']}.kvc")

            def stop_store(i: int) -> None:
                aws.proc.terminate()
                aws.proc.wait(10)

            spec = {"model": engines["model"], "max_tokens": 8, "prompts": ids[:3] + ids[:1], "pause_before": [3],
                    "handshake_dir": str(tmp), "connector": connector("s3://caches/kv", tmp, "B", quality="none")}
            loaded = run_engine(vllm_python, tmp, "B", spec, env=dict(aws, AWS_MAX_ATTEMPTS="1"), on_pause=stop_store)
        finally:
            for name in aws:
                os.environ.pop(name, None)
    assert [r["tokens"] for r in loaded[:3]] == [r["tokens"] for r in ref[:3]]
    assert [r["num_cached_tokens"] for r in loaded[:3]] == [512, 512, 256]
    # the store is gone: the lookup fails, the prompt is computed, the answer is still right
    assert loaded[3]["tokens"] == ref[0]["tokens"] and loaded[3]["num_cached_tokens"] == 0
    stats = loaded[4]["stats"]
    assert stats["loads"] == 3 and stats["loaded_tokens"] == 512 + 512 + 256
    assert stats["fault_store_unavailable"] >= 1


def kl(p: dict, q: dict) -> float:
    """KL(p || q) in nats of two whole next-token distributions given as {token: log-probability}."""
    import math

    return sum(math.exp(lp) * (lp - q[t]) for t, lp in p.items())


def test_faults_end_in_recomputation_and_a_kvcli_prefill_cache_answers(vllm_python, engines):
    """A damaged segment in a late layer, then a cache `kvcli prefill` made, then the server stopped."""
    tmp, ids, ref = engines["tmp"], engines["ids"], engines["R"]
    root = tmp / "damaged"
    shutil.copytree(engines["store"], root)
    path = lossless_file(root)
    damage_late_segment(path)
    made = subprocess.run([*KVCLI, "prefill", str(engines["second"]), "--out-dir", str(root), "--quality",
                           "lossless,balanced"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    (tmp / "F-hand").mkdir()
    with CacheServer(root) as server:
        spec = {"model": engines["model"], "max_tokens": 8, "prompts": [ids[0], ids[3], ids[1]], "pause_before": [2],
                "handshake_dir": str(tmp / "F-hand"), "logprobs_for": [1],
                "connector": connector(server.url, tmp, "F", quality="none", deadline="20s")}
        answers = run_engine(vllm_python, tmp, "F", spec, on_pause=lambda i: server.stop())
    assert answers[0]["tokens"] == ref[0]["tokens"]  # recomputed after the damaged segment
    assert answers[1]["num_cached_tokens"] == 256  # the kvcli prefill cache's whole chunk
    divergence = kl(ref[3]["first_logprobs"], answers[1]["first_logprobs"])
    print(f"\nKL(vLLM prefill || vLLM loading a kvcli prefill cache), first token: {divergence:.3g} nats; "
          f"tokens {ref[3]['tokens']} vs {answers[1]['tokens']}")
    assert answers[1]["tokens"][0] == ref[3]["tokens"][0] and divergence < 0.01
    assert answers[2]["tokens"] == ref[1]["tokens"] and answers[2]["num_cached_tokens"] == 0  # the store is down
    stats = answers[3]["stats"]
    assert stats["fault_corrupt"] == 1 and stats["recomputed_blocks"] >= 1 and stats["loads"] == 1
    assert stats["fault_store_unavailable"] >= 1
    # under the deadline both loads claimed the top level, lossless (the deadline is far; balanced, 10 times
    # smaller, loads sooner than vLLM computes the prompt, so nothing is given back). The first load, the link
    # unmeasured, took its first chunk from balanced, then met the damaged lossless chunk; the good one is one chunk
    print(f"connector counters: {stats}")
    assert stats["deadline_level_lossless"] == 2 and stats["deadline_loads"] == 2
    assert stats["deadline_chunks_balanced"] == 1 and stats["deadline_chunks_lossless"] == 1
    assert "deadline_chunks_given_back" not in stats
    # vLLM's steps measured the prefill rate, the load the decode speed: kept for the next claim
    header = header_of(path)
    kept = controller._recall(controller._memory("speeds", speeds_name(header.model, "cpu", header.dtype)))
    print(f"\nspeeds kept by the engine: {kept}")
    assert kept["prefill_s_per_token"] > 0 and kept["decode_s_per_element.lossless"] > 0
    log = (tmp / "F" / "engine.log").read_text()
    assert log.count("kvcli connector: cannot load") == 1  # logged once


def test_a_cache_vllm_saved_answers_in_kvcli_generate(engines, tmp_path):
    """`kvcli generate --cache` takes the file vLLM wrote; the KL of the next token after it, against kvcli's own
    prefill of the same tokens, is measured beside the loss of the `high` preset on the same context."""
    import torch.nn.functional as F

    from kvcli.modeling import inference, models
    from kvcli.reuse import pipeline

    path = lossless_file(engines["store"])
    out = subprocess.run([*KVCLI, "generate", "--cache", str(path), QUESTION2, "--max-new-tokens", "8"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    lm = models.load(None)
    src, header = pipeline.read_header(str(path))
    from_vllm = pipeline.load_cache(src, header, lm).kv
    own = inference.prefill(lm, header.token_ids)
    question = inference.prompt_ids(lm, QUESTION2)

    def divergence(kv) -> float:
        exact = inference.logits_after(lm, own, question)[-1].log_softmax(-1)
        other = inference.logits_after(lm, kv, question)[-1].log_softmax(-1)
        return float(F.kl_div(other, exact, log_target=True, reduction="sum"))

    high = tmp_path / "high.kvc"
    pipeline.write_cache(str(high), own, lm.identity, pipeline.codec_for("high", lm), 256)
    src_high, header_high = pipeline.read_header(str(high))
    cross, preset = divergence(from_vllm), divergence(pipeline.load_cache(src_high, header_high, lm).kv)
    print(f"\nKL(kvcli prefill || kvcli loading vLLM's cache): {cross:.3g} nats; the high preset's: {preset:.3g}")
    assert cross < 0.01
