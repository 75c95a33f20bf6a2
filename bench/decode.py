"""CPU decoding speed of kvcli's presets: `kvfile.decode` of one document's cache, and for the lossy presets the
same decode with reconstruction in torch (KvqDecoder.dequantize_body_ref, the path before the fused C one),
interleaved in one process so that their ratio survives a shared machine.

    python bench/decode.py [--model M] [--document FILE] [--tokens 2048] [--presets balanced lossless ...] [--repeats 5]
                           [--threads N] [--kvq-versions 3 4] [--transform fit|DICT.kvd]

One JSON line per preset: elements, bits per element, decode seconds (median, min, max over the repeats, each
after a warm-up) and the process's CPU seconds per decode (all threads; steadier than wall time when other work
shares the cores), elements per second from the median, the seconds of opening the file's decoder alone (part of
each decode, once per file whatever its size: the aux segments' tables, and a dictionary found, verified and
unpacked), and for kvq presets the torch-reconstruction seconds and the speed-up. With --transform, each lossy preset is also written as version 4 with the per-head transform
(bench/xf_dictionary.py; "fit" learns it on the calibration texts and saves it in $KVCLI_CACHE_DIR: point that at a
temporary directory), its line marked "transform": true. Timings depend on load: run it on a quiet machine for
absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import xf_dictionary
from common import DEFAULT_CORPUS, emit, environment, spread
from kvcli.codecs.kvq import FORMAT_VERSION, KvqCodec, KvqDecoder

from kvcli.calibration import quality
from kvcli.container import format, kvfile
from kvcli.modeling import inference, models
from kvcli.reuse import pipeline


def decode_seconds(src, header, threads: int | None, torch_reconstruct: bool) -> tuple[float, float]:
    """Wall and process CPU seconds of one decode (CPU time, all threads, moves less with other work on the machine)."""
    fused = KvqDecoder.dequantize_body
    if torch_reconstruct:  # the same decode, every body rebuilt by the torch reference instead
        KvqDecoder.dequantize_body = KvqDecoder.dequantize_body_ref
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        kvfile.decode(src, header, threads=threads)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        KvqDecoder.dequantize_body = fused


def open_seconds(src, header) -> float:
    """Wall seconds of opening the file's decoder, as each decode does first (kvfile.open_decoder)."""
    t0 = time.perf_counter()
    kvfile.open_decoder(src, header)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model directory or .gguf file [default: the bundled model]")
    ap.add_argument("--document", default=str(DEFAULT_CORPUS / "python-tutorial-controlflow.txt"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--presets", nargs="+", default=["balanced", "small", "high", "lossless"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="decoding threads (default: usable cores)")
    ap.add_argument("--kvq-versions", type=int, nargs="+", choices=(3, 4), default=[FORMAT_VERSION],
                    help="kvq bitstream versions to write each lossy preset in, timed side by side")
    ap.add_argument("--transform", help="also version 4 with the per-head transform: fit, or a dictionary file")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = models.load(args.model, "float32")
    ids = inference.document_ids(lm, open(args.document, encoding="utf-8").read())[: args.tokens]
    ref = quality.reference(lm, ids)
    elements = sum(k.numel() + v.numel() for k, v in zip(ref.kv.keys, ref.kv.values))
    found = xf_dictionary.load(lm, args.transform, pipeline.codec_for("balanced", lm), environment()) \
        if args.transform else None
    files = []
    for preset in args.presets:
        preset_codec = pipeline.codec_for(preset, lm)
        kvq = isinstance(preset_codec, KvqCodec)
        for version in (args.kvq_versions + (["4+xf"] if found else []) if kvq else [None]):
            codec = preset_codec
            if version == "4+xf":
                codec = xf_dictionary.with_transform(codec, found)
            elif version is not None:  # the preset's codec, writing this bitstream version
                codec = KvqCodec(codec.scale, codec.sinks, codec.profile, codec.inv_freq, codec.meta,
                                 codec.token_alpha, version)
            meta, parts = kvfile.encode(ref.kv, lm.identity, codec, 256)
            data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
            src = format.BytesSource(data)
            header = format.read_header(src)
            variants = [False, True] if header.codec["name"] == "kvq" else [False]
            for v in variants:  # warm-up
                decode_seconds(src, header, args.threads, v)
            files.append((preset, version, len(data), src, header, {v: [] for v in variants}, [], []))
    # Every file's repeats interleaved, so that versions and presets see the same load.
    for _ in range(args.repeats):
        for *_, src, header, times, cpu, opening in files:
            for v in times:
                wall, used = decode_seconds(src, header, args.threads, v)
                times[v].append(wall)
                if not v:
                    cpu.append(used)
            opening.append(open_seconds(src, header))
    for preset, version, size, src, header, times, cpu, opening in files:
        fast = statistics.median(times[False])
        record = {"bench": "decode", "preset": preset, "model": lm.name, "document": args.document.rsplit("/", 1)[-1],
                  "tokens": ref.kv.num_tokens, "elements": elements, "bits_per_element": round(8 * size / elements, 4),
                  "decode_s": spread(times[False]), "decode_cpu_s": spread(cpu), "open_s": spread(opening),
                  "decode_elements_per_s": round(elements / fast)}
        if version is not None:
            slow = statistics.median(times[True])
            record |= {"kvq_version": 4 if version == "4+xf" else version, "transform": version == "4+xf",
                       "torch_reconstruct_decode_s": spread(times[True]), "speedup": round(slow / fast, 3)}
        emit(record | {"decode_threads": args.threads or kvfile.usable_cores(), **environment()})

if __name__ == "__main__":
    main()
