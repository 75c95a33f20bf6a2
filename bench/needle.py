"""Needle retrieval from lossy caches: a fact planted in a document, asked after the document's cache.

    python bench/needle.py [--model M] [--profile auto|none|PATH ...] [--corpus DIR] [--tokens 1024]
                           [--presets balanced small] [--no-transform] [--kvq-version 3|4] [--kvtc B ...]
                           [--documents 4] [--seed 0] [--variants SPEC ...]

Teacher-forced KL (bench/rate_distortion.py) measures how a lossy cache changes the continuation of the
document itself; this measures whether a fact stated once, anywhere in it, can still be read back. Each corpus
document is cut to its first --tokens tokens and a sentence "The access code for the archive room is NNNN." (a
random four-digit code per trial) is inserted after the sentence nearest 10%, 30%, 50%, 70% and 90% of its text.
The model answers a fixed question greedily (6 tokens) after the exact cache and after each preset's decoded
file (coded as kvcli codes it: through the model's per-head transform where its profile names a dictionary;
`--no-transform`, `--kvq-version` as in bench/rate_distortion.py; `--variants` replaces each preset's row by its
rows kvcli:PRESET{SPEC}, as there); an answer is correct if it contains the
code. `--kvtc B` adds the KVTC baseline at target B bits per element
(bench/kvtc.py, its basis fitted on kvcli's calibration texts). One JSON line per trial, then one summary line
per codec.
"""

from __future__ import annotations

import argparse
import random

import torch
from common import corpus, emit, environment
from kvtc import Kvtc
from rate_distortion import kvcli_codec, model_options, variants_option

from kvcli.calibration.calibrate import default_texts
from kvcli.container import format, kvfile
from kvcli.modeling import inference, models

FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
QUESTION = "\nQuestion: What is the access code for the archive room?\nAnswer: The access code is"


def planted(text: str, fraction: float, code: str) -> str:
    cut = text.find(". ", int(len(text) * fraction))
    cut = int(len(text) * fraction) if cut < 0 else cut + 1
    return text[:cut] + f" The access code for the archive room is {code}." + text[cut:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_options(ap)
    ap.add_argument("--tokens", type=int, default=1024, help="each document's first N tokens, before planting")
    ap.add_argument("--presets", nargs="+", default=["balanced", "small"])
    ap.add_argument("--no-transform", action="store_true",
                    help="kvcli's presets without the model's per-head transform (its profile's dictionary)")
    ap.add_argument("--kvq-version", type=int, choices=(3, 4),
                    help="kvq bitstream version kvcli's presets write [default: kvcli's]")
    ap.add_argument("--kvtc", type=float, nargs="*", default=[], help="also KVTC at these target bits per element")
    ap.add_argument("--documents", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    variants_option(ap)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = models.load(args.model, "float32")
    env = {**environment(), "model": lm.name}
    question = inference.prompt_ids(lm, QUESTION)
    variants = args.variants or [("", {})]
    codecs = [(f"kvcli:{preset}" + (f"[{prof}]" if len(args.profile) > 1 else "") + (f"{{{spec}}}" if spec else ""),
               kvcli_codec(lm, preset, prof, settings.get("scale", 1.0), args.kvq_version, not args.no_transform,
                           settings))
              for prof in args.profile for preset in args.presets for spec, settings in variants]
    kvtc = Kvtc.fit(lm, [text for _, text in default_texts()]) if args.kvtc else None
    kvtc_plans = {f"kvtc@{b:g}": kvtc.plans(b) for b in args.kvtc} if kvtc else {}
    correct = {"exact": 0, **{label: 0 for label, _ in codecs}, **{label: 0 for label in kvtc_plans}}
    rng = random.Random(args.seed)
    trials = 0
    for doc in corpus(args.corpus)[: args.documents]:
        ids = inference.document_ids(lm, doc.read_text())[: args.tokens]
        text = lm.tokenizer.decode(ids, skip_special_tokens=True)
        for fraction in FRACTIONS:
            code = str(rng.randint(1000, 9999))
            kv = inference.prefill(lm, inference.document_ids(lm, planted(text, fraction, code)), attention=True)
            answers = {"exact": lm.tokenizer.decode(inference.greedy(lm, kv, question, 6))}
            for label, codec in codecs:
                meta, parts = kvfile.encode(kv, lm.identity, codec, 256)
                src = format.BytesSource(format.build_header(meta, parts) + b"".join(p.data for p in parts))
                decoded = kvfile.decode(src, format.read_header(src))
                answers[label] = lm.tokenizer.decode(inference.greedy(lm, decoded, question, 6))
            for label, plans in kvtc_plans.items():
                decoded, _ = kvtc.roundtrip(plans, kv)
                answers[label] = lm.tokenizer.decode(inference.greedy(lm, decoded, question, 6))
            hits = {label: code in answer for label, answer in answers.items()}
            for label, hit in hits.items():
                correct[label] += hit
            trials += 1
            emit({"what": "needle", "document": doc.name, "fraction": fraction, "tokens": kv.num_tokens,
                  "code": code, "answers": answers, "correct": hits, **env})
    for label, n in correct.items():
        emit({"what": "needle_summary", "codec": label, "trials": trials, "correct": n, **env})


if __name__ == "__main__":
    main()
