"""CPU encoding speed of kvcli's lossy presets: `kvfile.encode` of one document's cache (quantization, table
fitting, rANS coding, aux segments), in elements per second.

    python bench/encode.py [--document FILE] [--tokens 2048] [--presets balanced small high] [--repeats 7]
                           [--threads N]

One JSON line per preset: elements, bits per element, encode seconds (median, min, max over the repeats, after a
warm-up), elements per second from the median, and the CPU seconds the process spent per encode (median), which
a shared machine disturbs less than the wall time. To compare two builds, run this script from each in turn,
alternating, several times (PYTHONPATH=<other build> python bench/encode.py ...), and compare medians taken in the
same minutes; timings depend on load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import DEFAULT_CORPUS, emit, environment, spread

from kvcli.container import format, kvfile
from kvcli.modeling import inference, models
from kvcli.reuse import pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--document", default=str(DEFAULT_CORPUS / "python-tutorial-controlflow.txt"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--presets", nargs="+", default=["balanced", "small", "high"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = models.load(None, "float32")
    ids = inference.document_ids(lm, open(args.document, encoding="utf-8").read())[: args.tokens]
    kv = inference.prefill(lm, ids, attention=True)  # with the attention that token weights are set from
    elements = sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))
    for preset in args.presets:
        codec = pipeline.codec_for(preset, lm)
        meta, parts = kvfile.encode(kv, lm.identity, codec, kvfile.DEFAULT_CHUNK_TOKENS)  # warm-up
        size = len(format.build_header(meta, parts)) + sum(len(p.data) for p in parts)
        wall, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            kvfile.encode(kv, lm.identity, codec, kvfile.DEFAULT_CHUNK_TOKENS)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        emit({"bench": "encode", "preset": preset, "document": args.document.rsplit("/", 1)[-1],
              "tokens": kv.num_tokens, "elements": elements, "bits_per_element": round(8 * size / elements, 4),
              "encode_s": spread(wall), "encode_elements_per_s": round(elements / statistics.median(wall)),
              "cpu_s": round(statistics.median(cpu), 5), **environment()})


if __name__ == "__main__":
    main()
