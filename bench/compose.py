"""Composed caches against full prefill of the concatenated documents: quality, time to first token, a needle.

    python bench/compose.py [--corpus DIR] [--doc-tokens 512] [--fraction 0.05 --fraction 0.15 ...]
                            [--quality lossless --quality balanced] [--repeats 3]

Documents are the first --doc-tokens tokens of each corpus file (four of them), composed in the four cyclic
orders. Quality follows kvcli/calibration/quality.py: the next 128 tokens of the last document are teacher-forced after the
prefill of the concatenation (the reference) and after the composed cache, from exact per-document caches, with
no recomputation and with each fraction. TTFT goes through the CLI's path (read, decode, compose, recompute, run
the question) from files of each quality. The needle is a sentence planted mid-way into one document.
One JSON line per measurement, on the default model in float32.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

import torch
from common import DEFAULT_CORPUS, corpus, emit, environment, spread, timed
from kvcli.codecs.presets import QUALITIES

from kvcli.calibration import quality
from kvcli.modeling import inference, models
from kvcli.reuse import compose, pipeline

QUESTION = "\nQuestion: What are these documents about?\nAnswer:"
NEEDLE = " The access code for the archive room is 7341."
NEEDLE_QUESTION = "\nQuestion: What is the access code for the archive room?\nAnswer: The access code is"
NEEDLE_ANSWER = "7341"


def chunks(lm, paths: list[Path], tokens: int) -> list[tuple[list[int], list[int]]]:
    """Per file: its first `tokens` tokens, and the continuation tokens that follow them."""
    out = []
    for path in paths:
        ids = inference.document_ids(lm, path.read_text())
        need = tokens + quality.CONTINUATION_TOKENS + 1
        if len(ids) < need:
            raise SystemExit(f"{path}: {len(ids)} tokens, fewer than the {need} the benchmark needs")
        out.append((ids[:tokens], ids[tokens:need]))
    return out


def measure_quality(lm, docs, names, fractions, env) -> dict[float, list[quality.Agreement]]:
    results: dict[float, list] = {f: [] for f in (0.0, *fractions)}
    for shift in range(len(docs)):
        order = docs[shift:] + docs[:shift]
        order_names = names[shift:] + names[:shift]
        caches = [inference.prefill(lm, ids) for ids, _ in order]
        kv = compose.compose_caches(lm, caches, order_names)
        ref = quality.reference(lm, kv.token_ids + order[-1][1], prefix=kv.num_tokens)
        exact = quality.greedy_continuation(lm, ref, ref.kv)
        layer0 = (kv.keys[0] - ref.kv.keys[0]).abs().max().item()
        for fraction in results:
            blend = compose.recompute_tokens(lm, kv, fraction)
            agreement = quality.compare(lm, ref, blend.kv)
            results[fraction].append(agreement)
            emit({"what": "compose_quality", "documents": order_names, "context_tokens": kv.num_tokens,
                  "recompute_fraction": fraction, "recomputed_tokens": len(blend.recomputed),
                  "top1": round(agreement.top1, 4), "dnll": round(agreement.dnll, 5), "kl": round(agreement.kl, 5),
                  "first_divergence": quality.first_divergence(exact, quality.greedy_continuation(lm, ref, blend.kv)),
                  "layer0_max_abs_error": layer0, "model": lm.name, "dtype": "float32", **env})
    return results


def measure_ttft(lm, docs, names, qualities, fractions, repeats, env) -> None:
    prompt = inference.prompt_ids(lm, QUESTION)
    caches = [inference.prefill(lm, ids) for ids, _ in docs]
    joined = compose.compose_caches(lm, caches, names).token_ids
    full_times, full_token = timed(lambda: int(inference.logits_after(lm, None, joined + prompt)[-1].argmax()), repeats)
    emit({"what": "compose_ttft", "path": "full_prefill", "context_tokens": len(joined),
          "ttft_s": spread(full_times), "model": lm.name, "dtype": "float32", **env})
    with tempfile.TemporaryDirectory() as tmp:
        for q in qualities:
            paths = [str(Path(tmp) / f"{j}.{q}.kvc") for j in range(len(caches))]
            sizes = [pipeline.write_cache(p, kv, lm.identity, pipeline.codec_for(q, lm), 256)
                     for p, kv in zip(paths, caches)]
            for fraction in (0.0, *fractions):
                def first_token():
                    with contextlib.ExitStack() as stack:
                        opened = []
                        for p in paths:
                            src, header = pipeline.read_header(p)
                            stack.enter_context(src)
                            opened.append((src, header))
                        kv = pipeline.load_composed(opened, lm, fraction)
                    return int(inference.logits_after(lm, kv, prompt)[-1].argmax())

                times, token = timed(first_token, repeats)
                emit({"what": "compose_ttft", "path": "composed", "quality": q, "recompute_fraction": fraction,
                      "context_tokens": len(joined), "file_bytes": sum(sizes), "ttft_s": spread(times),
                      "speedup": round(statistics.median(full_times) / statistics.median(times), 3),
                      "same_first_token": token == full_token, "model": lm.name, "dtype": "float32", **env})


def plant(lm, ids: list[int]) -> list[int]:
    """The document's text with NEEDLE inserted after the sentence nearest its middle."""
    text = lm.tokenizer.decode(ids, skip_special_tokens=True)
    cut = text.find(". ", len(text) // 2)
    cut = len(text) // 2 if cut < 0 else cut + 1
    return inference.document_ids(lm, text[:cut] + NEEDLE + text[cut:])


def measure_needle(lm, docs, names, fractions, env) -> None:
    question = inference.prompt_ids(lm, NEEDLE_QUESTION)
    for position in range(len(docs)):
        texts = [plant(lm, ids) if j == position else ids for j, (ids, _) in enumerate(docs)]
        kv = compose.compose_caches(lm, [inference.prefill(lm, ids) for ids in texts], names)
        answers = {"full_prefill": lm.tokenizer.decode(inference.greedy(lm, None, kv.token_ids + question, 6))}
        for fraction in (0.0, *fractions):
            blend = compose.recompute_tokens(lm, kv, fraction)
            answers[str(fraction)] = lm.tokenizer.decode(inference.greedy(lm, blend.kv, question, 6))
        emit({"what": "compose_needle", "needle_in": names[position], "position": position,
              "context_tokens": kv.num_tokens, "answers": answers,
              "correct": {k: NEEDLE_ANSWER in v for k, v in answers.items()}, "model": lm.name, **env})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--fraction", type=float, action="append")
    ap.add_argument("--quality", action="append", choices=QUALITIES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", action="append", choices=("quality", "ttft", "needle"), default=[])
    args = ap.parse_args()
    fractions = tuple(args.fraction or (0.05, 0.15, 0.30))
    lm = models.load(None, "float32")
    env = environment()
    paths = corpus(args.corpus)[:4]
    docs = chunks(lm, paths, args.doc_tokens)
    names = [p.name for p in paths]
    if "quality" not in args.skip:
        results = measure_quality(lm, docs, names, fractions, env)
        for fraction, agreements in results.items():
            emit({"what": "compose_quality_mean", "recompute_fraction": fraction, "arrangements": len(agreements),
                  "top1": round(statistics.mean(a.top1 for a in agreements), 4),
                  "dnll": round(statistics.mean(a.dnll for a in agreements), 5),
                  "kl": round(statistics.mean(a.kl for a in agreements), 5), "model": lm.name, **env})
    if "ttft" not in args.skip:
        measure_ttft(lm, docs, names, args.quality or ["lossless", "balanced"], fractions, args.repeats, env)
    if "needle" not in args.skip:
        measure_needle(lm, docs, names, fractions, env)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
