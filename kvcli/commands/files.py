"""Commands on .kvc files themselves: decode, encode, inspect, verify."""

from __future__ import annotations

from typing import Optional

import typer

from ..stdio import write_stdout_text
from .common import (
    BackendOpt,
    ChunkOpt,
    DeviceOpt,
    QualityOpt,
    SinksOpt,
    StepScaleOpt,
    check_output,
    emit_json,
    handled,
)


def decode(
    file: str = typer.Argument(..., help=".kvc file, or - for stdin"),
    out: str = typer.Option(..., "--output", "-o", help="Output .safetensors file, or - for stdout"),
    device: str = DeviceOpt,
    backend: str = BackendOpt,
) -> None:
    """Export the decoded cache as safetensors: keys.{i}, values.{i} (kv_heads, tokens, head_dim) and input_ids."""
    from ..container import format, kvfile
    from ..container.tensorfile import save_tensors
    from ..kernels.placement import resolve
    from ..modeling.kvcache import KVCache, to_tensor_dict

    where = resolve(device, backend)
    check_output(out, [file])
    with format.open_source(file) as src:
        header = format.read_header(src)
        kv = kvfile.decode(src, header, device=where.device, backend=where.backend)
    kv = KVCache(kv.token_ids, [k.cpu() for k in kv.keys], [v.cpu() for v in kv.values])
    save_tensors(out, to_tensor_dict(kv), {"created_at": header.created_at, "source": header.source})


def encode(
    tensors: str = typer.Argument(..., help="safetensors file with keys.{i}, values.{i}, input_ids"),
    out: str = typer.Option(..., "--output", "-o", help="Output .kvc file, or - for stdout"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model that produced the cache [default: bundled]"),
    quality: str = QualityOpt,
    step_scale: float = StepScaleOpt,
    sinks: Optional[int] = SinksOpt,
    chunk_tokens: int = ChunkOpt,
    device: str = DeviceOpt,
    backend: str = BackendOpt,
    self_contained: bool = typer.Option(False, "--self-contained",
                                        help="Embed the model's dictionary, if the codec uses one, in the file: "
                                             "for a file sent alone (written to stdout, it always is)"),
) -> None:
    """Write a cache produced elsewhere (a safetensors export) as a .kvc file for MODEL."""
    from ..container.tensorfile import load_tensors
    from ..kernels.placement import resolve
    from ..modeling import models
    from ..modeling.kvcache import KVCache, from_tensor_dict
    from ..reuse import pipeline

    where = resolve(device, backend)
    options = pipeline.EncodeOptions(quality, step_scale, sinks, chunk_tokens, where.backend)
    check_output(out, [tensors])
    exported, provenance = load_tensors(tensors)
    kv = from_tensor_dict(exported, tensors)
    kv = KVCache(kv.token_ids, [k.to(where.device) for k in kv.keys], [v.to(where.device) for v in kv.values])
    lm = models.load(model, "float32", where.device)
    pipeline.check_shapes(kv, lm, tensors)
    pipeline.check_finite(kv, options, tensors)
    codec = options.codec(lm)
    pipeline.write_cache(out, kv, lm.identity, codec, options.chunk_tokens, {**pipeline.provenance(), **provenance},
                         options.backend, self_contained)


def inspect(
    file: str = typer.Argument(..., help=".kvc file, or - for stdin"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Show what a .kvc file holds: model, tokens, shapes, codec, sizes and per-layer bytes."""
    from ..container import format, report

    with format.open_source(file) as src:
        info = report.describe(format.read_header(src), src.size)
    if as_json:
        emit_json(info)
    else:
        write_stdout_text(report.render(info) + "\n")


def verify(
    file: str = typer.Argument(..., help=".kvc file, or - for stdin"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Check everything a reader checks short of loading the model: header, codec, every checksum, every segment
    decoded. Exit 0 only if all pass."""
    from ..container import format, kvfile

    with format.open_source(file) as src:
        result = kvfile.verify(src, format.read_header(src))
    if as_json:
        emit_json({"file": file, **result})
    else:
        found = result["dictionary"]
        uses = f", dictionary {found['sha256'][:16]}… from {found['found_in']}" if found else ""
        write_stdout_text(f"{file}: ok ({result['segments']} segments{uses})\n")


def register(app: typer.Typer) -> None:
    for command in (decode, encode, inspect, verify):
        app.command()(handled(command))
