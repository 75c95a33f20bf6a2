"""`kvcli prefill`: run the model over a document once and write its KV cache."""

from __future__ import annotations

import sys
import time
from typing import Optional

import typer

from .common import (ChunkOpt, ModelOpt, QualityOpt, SinksOpt, StepScaleOpt, check_output, check_quality, emit_json,
                     handled, status)


def prefill(
    doc: str = typer.Argument(..., help="Document to prefill, or - for stdin"),
    out: str = typer.Option(..., "--output", "-o", help="Output .kvc file, or - for stdout"),
    model: Optional[str] = ModelOpt,
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    quality: str = QualityOpt,
    step_scale: float = StepScaleOpt,
    sinks: Optional[int] = SinksOpt,
    chunk_tokens: int = ChunkOpt,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout (with -o FILE)"),
) -> None:
    """Run the model over DOC once and write its KV cache as a .kvc file."""
    from .. import inference, models, pipeline
    from ..errors import UsageError

    check_quality(quality)
    if as_json and out == "-":
        raise UsageError("--json prints on stdout, which -o - already uses for the cache")
    check_output(out, [doc])  # before the model loads: a bad output must not cost a prefill
    document = inference.read_document(doc)  # bad input fails before the model loads
    with status("loading model"):
        lm = models.load(model, dtype)
    t0 = time.perf_counter()
    ids = pipeline.checked_ids(lm, document)
    codec = pipeline.codec_for(quality, lm, step_scale, sinks)
    with status("prefilling and encoding"):
        kv, size = pipeline.prefill_document(document, ids, lm, codec, chunk_tokens, out)
    summary = {"output": out, "tokens": kv.num_tokens, "bytes": size, "quality": quality,
               "model": lm.name, "dtype": dtype, "seconds": round(time.perf_counter() - t0, 3)}
    if as_json:
        emit_json(summary)
    elif out != "-":
        print(f"wrote {out}: {kv.num_tokens} tokens, {size:,} bytes ({quality})", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command()(handled(prefill))
