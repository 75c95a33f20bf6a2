"""Ingestion throughput: many short documents prefilled one at a time against batched forward passes.

    python bench/ingest.py [--corpus DIR] [--docs 200] [--tokens 300] [--batch-tokens 1 --batch-tokens 2048 ...]
                           [--quality balanced]

Documents of about --tokens tokens (lengths spread over +-15%) are cut from the corpus with the default model's
tokenizer. Each setting runs in its own process (so its peak memory is its own) through the same engine as
`kvcli prefill --out-dir`: tokenize, prefill, encode, validate and store into a fresh directory. One JSON line
per setting: documents/s and tokens/s end to end, the share of time in forward passes, peak RSS and the RSS
after the model loaded. --batch-tokens 1 is one document per forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_CORPUS, corpus, emit, environment

WARMUP_DOCS = 4


def make_documents(lm, paths: list[Path], count: int, tokens: int) -> list[dict]:
    """`count` documents cut from the corpus at evenly spaced token offsets, lengths within +-15% of `tokens`."""
    streams = [lm.tokenizer(p.read_text(), add_special_tokens=False)["input_ids"] for p in paths]
    per_stream = -(-count // len(streams))
    docs = []
    for s, ids in enumerate(streams):
        for j in range(per_stream):
            length = int(tokens * (0.85 + 0.3 * ((j * 37 + s * 11) % 101) / 100))
            start = (len(ids) - length) * j // max(per_stream - 1, 1)
            docs.append({"id": f"{paths[s].stem}-{j}", "text": lm.tokenizer.decode(ids[start : start + length])})
    return docs[:count]


def worker(args) -> None:
    """One setting in this process: prints one JSON object with the measurements."""
    from kvcli.modeling import models
    from kvcli.reuse import ingest, pipeline
    from kvcli.storage.store import open_store

    lm = models.load(None, "float32")
    docs = make_documents(lm, corpus(args.corpus), args.docs + WARMUP_DOCS, args.tokens)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    settings = ingest.Settings(pipeline.EncodeOptions(quality=args.quality), batch_tokens=args.worker)
    with tempfile.TemporaryDirectory() as tmp:
        engine = ingest.Ingest(lm, open_store(tmp), settings)
        list(engine.run(ingest.record_source(d, d["id"]) for d in docs[args.docs:]))  # warm-up, not counted
        forward = _time_forward_passes(engine)
        start = time.perf_counter()
        lines = list(engine.run(ingest.record_source(d, d["id"]) for d in docs[: args.docs]))
        seconds = time.perf_counter() - start
    statuses = {line["status"] for line in lines}
    if statuses != {"written"}:
        raise SystemExit(f"not all written: {statuses}")
    tokens = sum(line["tokens"] for line in lines)
    print(json.dumps({
        "docs": len(lines), "tokens": tokens, "seconds": round(seconds, 3),
        "docs_per_s": round(len(lines) / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "forward_share": round(forward["seconds"] / seconds, 3), "forward_passes": forward["calls"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_load_mb": round(rss_loaded / 1024, 1),
        "bytes_per_doc": round(sum(line["bytes"] for line in lines) / len(lines)),
    }))


def _time_forward_passes(engine) -> dict:
    """Wrap the engine's batched prefill to add up the time spent in forward passes."""
    from kvcli.modeling import batching

    totals = {"seconds": 0.0, "calls": 0}
    inner = batching.prefill_batch

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            totals["seconds"] += time.perf_counter() - t0
            totals["calls"] += 1

    batching.prefill_batch = timed
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--quality", default="balanced")
    ap.add_argument("--batch-tokens", type=int, action="append", help="repeatable [default: 1 and 2048]")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args)
        return
    env = environment()
    for batch in args.batch_tokens or [1, 2048]:
        cmd = [sys.executable, __file__, "--worker", str(batch), "--corpus", str(args.corpus), "--docs",
               str(args.docs), "--tokens", str(args.tokens), "--quality", args.quality]
        load = os.getloadavg()[0]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        emit({"bench": "ingest", "mode": "one_at_a_time" if batch == 1 else "batched", "batch_tokens": batch,
              "quality": args.quality, "model": "SmolLM2-135M-Instruct", "dtype": "float32", **result,
              "load_average_1min": round(load, 2), **env})


if __name__ == "__main__":
    main()
