"""CPU encoding speed of kvcli's lossy presets: `kvfile.encode` of one document's cache (quantization, table
fitting, rANS coding, aux segments), in elements per second.

    python bench/encode.py [--model M] [--document FILE] [--tokens 2048] [--presets balanced small high]
                           [--repeats 7] [--threads N] [--without-transform]

One JSON line per preset: elements, bits per element, encode seconds (median, min, max over the repeats, after a
warm-up), elements per second from the median, and the CPU seconds the process spent per encode (median), which
a shared machine disturbs less than the wall time. Each preset codes as kvcli writes it: `small` and `tiny`
through the model's per-head transform where its profile names a dictionary (the default model ships one; for
another model point KVCLI_CACHE_DIR at a directory that holds its profile and dictionary), their lines marked
"transform": true. --without-transform also times each of those presets without the transform (the same profile,
version 4), its repeats interleaved with the transform's in this process, so that the two see the same load. To
compare two builds, run this script from each in turn, alternating, several times (PYTHONPATH=<other build>
python bench/encode.py ...), and compare medians taken in the same minutes; timings depend on load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import DEFAULT_CORPUS, emit, environment, spread

from kvcli.codecs.kvq import KvqCodec
from kvcli.container import format, kvfile
from kvcli.modeling import inference, models
from kvcli.reuse import pipeline


def encode_seconds(kv, lm, codec) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    kvfile.encode(kv, lm.identity, codec, kvfile.DEFAULT_CHUNK_TOKENS)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model directory or .gguf file [default: the bundled model]")
    ap.add_argument("--document", default=str(DEFAULT_CORPUS / "python-tutorial-controlflow.txt"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--presets", nargs="+", default=["balanced", "small", "high"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--without-transform", action="store_true",
                    help="also time the presets that code through the transform without it, interleaved")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = models.load(args.model, "float32")
    ids = inference.document_ids(lm, open(args.document, encoding="utf-8").read())[: args.tokens]
    kv = inference.prefill(lm, ids, attention=True)  # with the attention that token weights are set from
    elements = sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))
    runs = []  # (preset, codec, transform or None for a codec that cannot have one)
    for preset in args.presets:
        codec = pipeline.codec_for(preset, lm)
        transformed = isinstance(codec, KvqCodec) and codec.transforms is not None
        runs.append((preset, codec, transformed if isinstance(codec, KvqCodec) else None))
        if transformed and args.without_transform:  # the A/B is the transform alone: both in version 4
            plain = pipeline.codec_for(preset, lm, transform=False)
            plain = KvqCodec(plain.scale, plain.sinks, plain.profile, plain.inv_freq, plain.meta, plain.token_alpha, 4)
            runs.append((preset, plain, False))
    timed = []
    for preset, codec, transformed in runs:
        meta, parts = kvfile.encode(kv, lm.identity, codec, kvfile.DEFAULT_CHUNK_TOKENS)  # warm-up
        size = len(format.build_header(meta, parts)) + sum(len(p.data) for p in parts)
        timed.append((preset, codec, transformed, size, [], []))
    for _ in range(args.repeats):  # every run's repeats interleaved, so that they see the same load
        for _, codec, _, _, wall, cpu in timed:
            w, c = encode_seconds(kv, lm, codec)
            wall.append(w)
            cpu.append(c)
    for preset, codec, transformed, size, wall, cpu in timed:
        record = {"bench": "encode", "preset": preset, "model": lm.name,
                  "document": args.document.rsplit("/", 1)[-1], "tokens": kv.num_tokens, "elements": elements,
                  "bits_per_element": round(8 * size / elements, 4), "encode_s": spread(wall),
                  "encode_elements_per_s": round(elements / statistics.median(wall)),
                  "cpu_s": round(statistics.median(cpu), 5)}
        if transformed is not None:
            record |= {"kvq_version": codec.version, "transform": transformed}
        emit(record | environment())


if __name__ == "__main__":
    main()
