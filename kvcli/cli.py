"""The command line: wires commands to pipeline functions and maps errors to exit codes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from typing import Optional

import typer

from . import __version__
from .errors import KvcliError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Offline KV-cache files for language models: prefill a document once, answer from the cache later.",
)
_state = {"debug": False}

ModelOpt = typer.Option(None, "--model", "-m", help="Model directory, .gguf file or hub id [default: bundled SmolLM2-135M-Instruct]")
QualityOpt = typer.Option("balanced", "--quality", "-q", help="lossless, high, balanced, small, or raw")
StepScaleOpt = typer.Option(1.0, "--step-scale", min=1e-3, max=1e3, help="Expert: multiply the preset's quantization steps (recorded in the header)")
SinksOpt = typer.Option(None, "--sinks", min=0, max=4096, help="Expert: leading tokens kept exact by lossy presets [default: the first token]")
ChunkOpt = typer.Option(256, "--chunk-tokens", min=1, help="Tokens per segment")


def _err(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)


def handled(fn):
    """Expected failures print one line and exit with their class's code; --debug keeps the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KvcliError as err:
            if _state["debug"]:
                raise
            _err(str(err))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            raise typer.Exit(141) from None

    return wrapper


def _status(message: str):
    """A spinner on stderr while something slow runs, only when a person is watching."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


def _version(value: bool) -> None:
    if value:
        print(f"kvcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for expected errors too"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version"),
) -> None:
    _state["debug"] = debug


@app.command()
@handled
def prefill(
    doc: str = typer.Argument(..., help="Document to prefill, or - for stdin"),
    out: str = typer.Option(..., "--output", "-o", help="Output .kvc file, or - for stdout"),
    model: Optional[str] = ModelOpt,
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    quality: str = QualityOpt,
    step_scale: float = StepScaleOpt,
    sinks: Optional[int] = SinksOpt,
    chunk_tokens: int = ChunkOpt,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary to stderr"),
) -> None:
    """Run the model over DOC once and write its KV cache as a .kvc file."""
    from . import inference, models, pipeline

    _check_quality(quality)
    text = inference.read_document(doc)  # bad input fails before the model loads
    with _status("loading model"):
        lm = models.load(model, dtype)
    t0 = time.perf_counter()
    codec = pipeline.codec_for(quality, lm, step_scale, sinks)
    with _status("prefilling and encoding"):
        kv, size = pipeline.prefill_document(text, lm, codec, chunk_tokens, out)
    summary = {"output": out, "tokens": kv.num_tokens, "bytes": size, "quality": quality,
               "model": lm.name, "dtype": dtype, "seconds": round(time.perf_counter() - t0, 3)}
    if as_json:
        print(json.dumps(summary), file=sys.stderr)
    elif out != "-":
        print(f"wrote {out}: {kv.num_tokens} tokens, {size:,} bytes ({quality})", file=sys.stderr)


@app.command()
@handled
def generate(
    prompt: str = typer.Argument(..., help="The question or continuation prompt"),
    cache: Optional[str] = typer.Option(None, "--cache", "-c", help=".kvc file holding the context"),
    document: Optional[str] = typer.Option(None, "--document", "-d", help="Prefill this document instead (reference path)"),
    model: Optional[str] = ModelOpt,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Model dtype [default: the cache's, else float32]"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of plain text"),
) -> None:
    """Answer PROMPT after a cached context (--cache) or after a full prefill of a document (--document)."""
    from . import inference, models, pipeline

    if (cache is None) == (document is None):
        raise UsageError("give exactly one of --cache FILE or --document DOC")
    t0 = time.perf_counter()
    if cache is not None:
        src, header = pipeline.read_header(cache)
        with src, _status("loading model and cache"):
            lm = models.load(model, dtype or header.dtype)
            kv = pipeline.load_cache(src, header, lm).kv
        context_ids = kv.token_ids
    else:
        text = inference.read_document(document)
        with _status("loading model"):
            lm = models.load(model, dtype or "float32")
        context_ids = inference.document_ids(lm, text)
        kv = None
    ids = inference.prompt_ids(lm, prompt)
    if kv is None:
        ids = context_ids + ids
    first: dict = {}
    start = time.perf_counter()
    tokens = inference.greedy(lm, kv, ids, max_new_tokens, on_first_token=lambda t: first.setdefault("t", time.perf_counter()))
    text_out = lm.tokenizer.decode(tokens, skip_special_tokens=True)
    if as_json:
        print(json.dumps({"text": text_out, "tokens": len(tokens), "context_tokens": len(context_ids),
                          "ttft_s": round(first.get("t", start) - start, 4),
                          "total_s": round(time.perf_counter() - t0, 3)}))
    else:
        print(text_out)


@app.command()
@handled
def decode(
    file: str = typer.Argument(..., help=".kvc file, or - for stdin"),
    out: str = typer.Option(..., "--output", "-o", help="Output .safetensors file"),
) -> None:
    """Export the decoded cache as safetensors: keys.{i}, values.{i} (kv_heads, tokens, head_dim) and input_ids."""
    from . import format, kvfile
    from .kvcache import to_tensor_dict
    from .tensorfile import save_tensors

    src = format.open_source(file)
    with src:
        kv = kvfile.decode(src, format.read_header(src))
    save_tensors(out, to_tensor_dict(kv))


@app.command()
@handled
def encode(
    tensors: str = typer.Argument(..., help="safetensors file with keys.{i}, values.{i}, input_ids"),
    out: str = typer.Option(..., "--output", "-o", help="Output .kvc file, or - for stdout"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model that produced the cache [default: bundled]"),
    quality: str = QualityOpt,
    step_scale: float = StepScaleOpt,
    sinks: Optional[int] = SinksOpt,
    chunk_tokens: int = ChunkOpt,
) -> None:
    """Write a cache produced elsewhere (a safetensors export) as a .kvc file for MODEL."""
    from . import models, pipeline
    from .kvcache import from_tensor_dict
    from .tensorfile import load_tensors

    _check_quality(quality)
    kv = from_tensor_dict(load_tensors(tensors), tensors)
    lm = models.load(model, "float32")
    pipeline.check_shapes(kv, lm)
    pipeline.write_cache(out, kv, lm.identity, pipeline.codec_for(quality, lm, step_scale, sinks), chunk_tokens)


@app.command()
@handled
def inspect(
    file: str = typer.Argument(..., help=".kvc file, or - for stdin"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Show what a .kvc file holds: model, tokens, shapes, codec, sizes and per-layer bytes."""
    from . import format, report

    src = format.open_source(file)
    with src:
        info = report.describe(format.read_header(src), src.size)
    print(json.dumps(info, indent=2) if as_json else report.render(info))


@app.command()
@handled
def verify(file: str = typer.Argument(..., help=".kvc file, or - for stdin")) -> None:
    """Check the header and every segment checksum; exit 0 only if all pass."""
    from . import format, kvfile

    src = format.open_source(file)
    with src:
        count = kvfile.verify(src, format.read_header(src))
    print(f"{file}: ok ({count} segments)")


@app.command()
@handled
def calibrate(
    model: Optional[str] = ModelOpt,
    text: Optional[list[str]] = typer.Option(None, "--text", "-t", help="Calibration document (repeatable) [default: the two bundled texts]"),
    out: Optional[str] = typer.Option(None, "--output", "-o", help="Write the profile here instead of the profile directory"),
    as_json: bool = typer.Option(False, "--json", help="Print the profile's summary as JSON"),
) -> None:
    """Measure MODEL's sensitivity to cache loss once; lossy presets then use the stored profile."""
    from pathlib import Path

    from rich.progress import Progress

    from . import calibrate as calib
    from . import inference, models, profiles

    texts = [(t, inference.read_document(t)) for t in text] if text else calib.default_texts()
    lm = models.load(model, "float32")
    cfg = lm.model.config.get_text_config(decoder=True)
    layers = cfg.num_hidden_layers
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("calibrating", total=2 * layers * cfg.num_key_value_heads * len(texts))
        profile, details = calib.calibrate(lm, texts, progress=lambda: bar.advance(task))
    path = profiles.save(profile, lm.identity, details, Path(out) if out else None)
    profile = profiles.load(path)  # as stored: the digest must describe the rounded numbers the codec will use
    s = profile.sensitivity
    summary = {"profile": str(path), "name": profile.name, "digest": profile.digest(), "layers": layers,
               "sensitivity_range": [float(s.min()), float(s.max())], "texts": details["texts"]}
    print(json.dumps(summary) if as_json else f"wrote profile {path} (sensitivity spans {s.max() / max(s.min(), 1e-12):.0f}x across layers)")


def _check_quality(quality: str) -> None:
    from .codecs.presets import QUALITIES

    if quality not in QUALITIES:
        raise UsageError(f"unknown --quality {quality!r}; choose one of {', '.join(QUALITIES)}")


def main() -> None:
    # transformers' GGUF reader draws a tqdm bar that ignores its own progress switch; tqdm reads this variable
    # only when it is first imported, so it is set before anything imports it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    app(prog_name="kvcli")
