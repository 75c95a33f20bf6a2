"""Time to first token: `generate --cache` (read, decode, inject, run the prompt) against full prefill.

    python bench/ttft.py [--corpus DIR] [--quality lossless] [--repeats 5]

One JSON line per document and quality, on the default model in float32. The ratio is the figure that matters.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import DEFAULT_CORPUS, corpus, emit, environment, spread, timed
from kvcli.codecs.presets import QUALITIES

from kvcli.container import format, kvfile
from kvcli.modeling import inference, models
from kvcli.reuse import pipeline

QUESTION = "\nQuestion: What is this document about?\nAnswer:"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--quality", action="append", choices=QUALITIES)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    qualities = args.quality or ["lossless"]
    lm = models.load(None, "float32")
    env = environment()
    prompt = inference.prompt_ids(lm, QUESTION)
    with tempfile.TemporaryDirectory() as tmp:
        for doc in corpus(args.corpus):
            ids = inference.document_ids(lm, doc.read_text())
            prefill_times, kv = timed(lambda: inference.prefill(lm, ids), args.repeats)
            full_times, full_token = timed(lambda: int(inference.logits_after(lm, None, ids + prompt)[-1].argmax()), args.repeats)
            for quality in qualities:
                path = str(Path(tmp) / f"{doc.stem}.{quality}.kvc")
                size = pipeline.write_cache(path, kv, lm.identity, pipeline.codec_for(quality, lm), 256)

                def load():
                    with format.FileSource(path) as src:
                        return kvfile.decode(src, format.read_header(src))

                def cached_first_token():
                    with format.FileSource(path) as src:
                        header = format.read_header(src)
                        decoded = pipeline.load_cache(src, header, lm).kv
                    return int(inference.logits_after(lm, decoded, prompt)[-1].argmax())

                load_times, decoded = timed(load, args.repeats)
                cache_times, cache_token = timed(cached_first_token, args.repeats)
                emit({
                    "what": "ttft", "document": doc.name, "tokens": len(ids), "quality": quality,
                    "file_bytes": size, "bits_per_element": round(8 * size / decoded_elements(decoded), 4),
                    "prefill_s": spread(prefill_times), "load_s": spread(load_times),
                    "ttft_cache_s": spread(cache_times), "ttft_prefill_s": spread(full_times),
                    "speedup": round(spread(full_times)["median"] / spread(cache_times)["median"], 3),
                    "same_first_token": cache_token == full_token, "model": lm.name, "dtype": "float32", **env,
                })


def decoded_elements(kv) -> int:
    return sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
