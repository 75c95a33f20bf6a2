"""Quality of the levels `kvcli push FILE STORE --quality …` makes from one file, against a prefill's own levels.

    python bench/pushed_levels.py [--model M] [--corpus DIR] [--documents N] [--levels balanced small tiny]

For each document, the quality protocol of bench/rate_distortion.py (kvcli/calibration/quality.py: the first
2,048 tokens as the context, the next 128 teacher-forced against the exact cache): each level as a prefill
stores it (encoded with the attention the prefill measured), and as `push --quality` makes it from a lossless file
and from a `high` file of that prefill (kvcli/reuse/levels.py: decoded, encoded without attention). One JSON line
per (document, level, source): bits per element of the stored file, top-1 agreement, dNLL and KL; then one summary
line per (level, source) with the means.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import DEFAULT_CORPUS, corpus, emit, environment

from kvcli.calibration import quality
from kvcli.container import format, kvfile
from kvcli.modeling import inference, models
from kvcli.reuse import levels, pipeline
from kvcli.storage import store

SOURCES = ("prefill", "push from lossless", "push from high")


def write(path: Path, kv, lm, quality_name: str) -> Path:
    """`quality_name` of `kv` as a prefill writes it (256-token chunks, its attention weighing the tokens)."""
    pipeline.write_cache(str(path), kv, lm.identity, pipeline.codec_for(quality_name, lm), 256)
    return path


def decoded(path: Path):
    with format.FileSource(path) as src:
        return kvfile.decode(src, format.read_header(src)), src.size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory or .gguf file [default: the bundled model]")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--documents", type=int, default=0, help="only the first N documents")
    ap.add_argument("--levels", nargs="+", default=["balanced", "small", "tiny"])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = models.load(args.model, "float32")
    env = {**environment(), "model": lm.name}
    rows: dict[tuple[str, str], list[dict]] = {}
    for doc in corpus(args.corpus)[: args.documents or None]:
        ref = quality.reference(lm, inference.document_ids(lm, doc.read_text()))
        elements = sum(k.numel() + v.numel() for k, v in zip(ref.kv.keys, ref.kv.values))
        with tempfile.TemporaryDirectory(prefix="kvcli-bench-") as tmp:
            tmp = Path(tmp)
            files = {("prefill", q): write(tmp / f"{q}.kvc", ref.kv, lm, q) for q in args.levels}
            for source in ("lossless", "high"):
                target = store.DirStore(tmp / f"from-{source}", create=True)
                result = levels.push_levels(target, write(tmp / f"{source}.kvc", ref.kv, lm, source), args.levels,
                                            args.model)
                files.update({(f"push from {source}", lv["quality"]): Path(lv["url"]) for lv in result["levels"]})
            for (source, level), path in files.items():
                kv, size = decoded(path)
                agree = quality.compare(lm, ref, kv)
                row = {"what": "pushed_levels", "document": doc.name, "level": level, "source": source,
                       "tokens": ref.kv.num_tokens, "bits_per_element": round(8 * size / elements, 4),
                       "top1": round(agree.top1, 4), "dnll": round(agree.dnll, 5), "kl": round(agree.kl, 6)}
                rows.setdefault((level, source), []).append(row)
                emit({**row, **env})
    for (level, source), rs in sorted(rows.items(), key=lambda item: (args.levels.index(item[0][0]),
                                                                        SOURCES.index(item[0][1]))):
        means = {k: round(statistics.mean(r[k] for r in rs), 5) for k in ("bits_per_element", "top1", "dnll", "kl")}
        emit({"what": "pushed_levels_summary", "level": level, "source": source, "documents": len(rs), **means, **env})


if __name__ == "__main__":
    main()
