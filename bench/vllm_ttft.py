"""Time to first token of vLLM (the CPU build in .venv-vllm) for the corpus documents plus a question: recomputing,
and with the kvcli connector loading from a local directory store and from `kvcli serve-cache` behind a throttled
link, at each quality. One JSON line per (document, setting).

    .venv/bin/python bench/vllm_ttft.py [--tokens 2048] [--qualities lossless,balanced] [--rates 1e9,1e8]

Each setting runs in a fresh engine (tests/vllm_runs.py, prefix caching off so that every repetition loads or
computes). The stores are written by vLLM itself: an engine with saves on answers every prompt once, waits for its
saves, then answers them again loading (the "dir" lines). The served settings read those stores through
serve-cache and a TCP proxy limited to the given bits per second (tests/servers.py's ThrottleProxy, in this
process: on a small CPU it may not reach the nominal rate, so the line also gives the file's bytes).
TTFT is the wall time of a 1-token answer, submission to return, inside the engine's process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_CORPUS, REPO, corpus, environment

sys.path.insert(0, str(REPO / "tests"))
from servers import CacheServer, ThrottleProxy  # noqa: E402

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
QUESTION = "\nQuestion: What is this document about?\nAnswer:"


def engine(spec: dict, workdir: Path, name: str) -> list[dict]:
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    with open(workdir / f"{name}.log", "w") as log:
        out = subprocess.run([str(VLLM_PYTHON), str(REPO / "tests" / "vllm_runs.py"), str(spec_path)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=log, text=True, timeout=3600,
                             env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or len(lines) != len(spec["prompts"]) + 1:
        raise SystemExit(f"engine {name} failed ({out.returncode}); see {workdir / (name + '.log')}")
    return lines


def emit(doc: str, tokens: int, setting: dict, runs: list[dict], baseline: float | None, env: dict) -> float:
    times = [r["seconds"] for r in runs]
    median = statistics.median(times)
    line = {"what": "vllm_ttft", "document": doc, "prompt_tokens": tokens, **setting,
            "ttft_s": {"median": round(median, 4), "min": round(min(times), 4), "max": round(max(times), 4)},
            "repeats": len(times), "num_cached_tokens": runs[-1]["num_cached_tokens"],
            "speedup_vs_recompute": round(baseline / median, 2) if baseline else None, **env}
    print(json.dumps(line), flush=True)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tokens", type=int, default=2048, help="document tokens (each document is cut to this)")
    parser.add_argument("--qualities", default="lossless,balanced")
    parser.add_argument("--rates", default="1e9,1e8", help="link speeds for serve-cache, bits per second")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: bash scripts/setup.sh vllm")
    from transformers import AutoTokenizer

    from kvcli.modeling import models

    model = str(models.local_directory(models.resolve(None)))
    tok = AutoTokenizer.from_pretrained(model)
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    docs = [(p.name, tok(p.read_text(), add_special_tokens=True)["input_ids"][: args.tokens] + question)
            for p in corpus(args.corpus)]
    prompts = [ids for _, ids in docs]
    env = {**environment(), "vllm": "vllm-cpu 0.32.0", "model": models.DEFAULT_MODEL_NAME, "dtype": "float32"}
    base = {"model": model, "max_tokens": 1, "max_model_len": args.tokens + 256}
    with tempfile.TemporaryDirectory(prefix="vllm-ttft-") as tmp:
        work = Path(tmp)
        recompute = engine({**base, "prompts": prompts * args.repeats, "connector": None}, work, "recompute")
        baseline = {}
        for i, (name, ids) in enumerate(docs):
            baseline[name] = emit(name, len(ids), {"setting": "recompute"}, recompute[i::len(docs)][: args.repeats],
                                  None, env)
        for quality in args.qualities.split(","):
            store = work / f"store-{quality}"
            settings = {"store": str(store), "quality": quality, "stats_dir": str(work / f"stats-{quality}")}
            runs = engine({**base, "prompts": prompts * (args.repeats + 1), "connector": settings,
                           "await_saves": len(docs), "await_saves_before": len(docs)}, work, f"dir-{quality}")
            sizes = {p.name: p.stat().st_size for p in store.glob("*.kvc")}
            for i, (name, ids) in enumerate(docs):
                emit(name, len(ids), {"setting": "dir", "quality": quality, "store_bytes": sum(sizes.values())},
                     runs[len(docs) + i::len(docs)][: args.repeats], baseline[name], env)
            for rate in (float(r) for r in args.rates.split(",")):
                with CacheServer(store) as server:
                    host, port = server.url.removeprefix("http://").split(":")
                    with ThrottleProxy((host, int(port)), rate=rate / 8) as proxy:
                        url = f"http://127.0.0.1:{proxy.port}"
                        runs = engine({**base, "prompts": prompts * args.repeats,
                                       "connector": {"store": url, "quality": "none"}}, work,
                                      f"served-{quality}-{rate:g}")
                for i, (name, ids) in enumerate(docs):
                    emit(name, len(ids), {"setting": "serve-cache", "quality": quality, "link_bits_per_s": rate},
                         runs[i::len(docs)][: args.repeats], baseline[name], env)


if __name__ == "__main__":
    main()
