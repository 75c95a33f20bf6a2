"""KV caches to and from .kvc containers: chunking, codec calls, parallel decode."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from . import __version__, format
from .codecs import Codec, CodecError, SegmentContext, codec_from_header
from .errors import FormatError
from .kvcache import KVCache

DEFAULT_CHUNK_TOKENS = 256
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _chunks(start: int, end: int, chunk: int):
    """Absolute-aligned pieces of [start, end): sliding-window layers start mid-chunk."""
    pos = start
    while pos < end:
        stop = min(end, (pos // chunk + 1) * chunk)
        yield pos, stop
        pos = stop


def _context(header_dtype: str, kind: str, layer: int, shape: format.LayerShape, start: int, count: int):
    dim = shape.key_dim if kind == "k" else shape.value_dim
    return SegmentContext(kind, layer, start, shape.kv_heads, count, dim, header_dtype)


def layer_shapes(kv: KVCache) -> list[format.LayerShape]:
    return [
        format.LayerShape(kv.keys[i].shape[0], kv.keys[i].shape[2], kv.values[i].shape[2], kv.token_start(i))
        for i in range(kv.num_layers)
    ]


def encode(kv: KVCache, model_identity: dict, codec: Codec, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
           extra: dict | None = None) -> tuple[dict, list[format.SegmentData]]:
    """Header fields and segment bytes for `kv`; hand both to format.write_kvc."""
    dtype = DTYPE_NAMES[kv.dtype]
    shapes = layer_shapes(kv)
    codec.fit(kv.keys, kv.values, [s.token_start for s in shapes])
    jobs = []
    for c_start, c_end in _chunks(0, kv.num_tokens, chunk_tokens):
        for li, shape in enumerate(shapes):
            lo = max(c_start, shape.token_start)
            if lo >= c_end:
                continue
            for kind, tensors in (("k", kv.keys), ("v", kv.values)):
                ctx = _context(dtype, kind, li, shape, lo, c_end - lo)
                local = slice(lo - shape.token_start, c_end - shape.token_start)
                jobs.append((ctx, tensors[li][:, local, :]))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        blobs = list(pool.map(lambda job: codec.encode(job[1], job[0]), jobs))
    parts = [format.SegmentData("aux", -1, 0, 0, data, name) for name, data in sorted(codec.aux().items())]
    parts += [format.SegmentData(ctx.kind, ctx.layer, ctx.token_start, ctx.tokens, blob) for (ctx, _), blob in zip(jobs, blobs)]
    meta = {
        "model": model_identity,
        "dtype": dtype,
        "token_ids": kv.token_ids,
        "layers": [vars(s) for s in shapes],
        "chunk_tokens": chunk_tokens,
        "codec": {"name": codec.name, "params": codec.params()},
        "created_by": f"kvcli {__version__}",
    }
    if extra:
        meta.update(extra)
    return meta, parts


def open_codec(src: format.ByteSource, header: format.Header) -> Codec:
    try:
        codec = codec_from_header(header.codec["name"], header.codec["params"])
    except (CodecError, ValueError, TypeError, KeyError) as err:
        raise FormatError(f"{getattr(src, 'path', '<input>')}: codec: {err}") from None
    aux = {s.name: format.read_segment(src, header, s) for s in header.segments if s.kind == "aux"}
    try:
        codec.load_aux(aux)
    except (CodecError, ValueError, KeyError) as err:
        raise FormatError(f"{getattr(src, 'path', '<input>')}: codec tables: {err}") from None
    return codec


def decode(src: format.ByteSource, header: format.Header, threads: int | None = None) -> KVCache:
    """Every segment read, checksum-verified and decoded; the exact bad segment is named on failure."""
    codec = open_codec(src, header)
    dtype = format_dtype(header.dtype)
    n = header.num_tokens
    keys = [torch.empty((s.kv_heads, n - s.token_start, s.key_dim), dtype=dtype) for s in header.layers]
    values = [torch.empty((s.kv_heads, n - s.token_start, s.value_dim), dtype=dtype) for s in header.layers]
    name = getattr(src, "path", "<input>")

    def work(seg: format.Segment) -> None:
        shape = header.layers[seg.layer]
        ctx = _context(header.dtype, seg.kind, seg.layer, shape, seg.token_start, seg.token_count)
        data = format.read_segment(src, header, seg)
        try:
            out = codec.decode(data, ctx)
        except (CodecError, ValueError, RuntimeError) as err:
            raise FormatError(f"{name}: {seg.label()}: cannot decode: {err}") from None
        if tuple(out.shape) != ctx.shape or out.dtype != dtype:
            raise FormatError(f"{name}: {seg.label()}: decoded shape {tuple(out.shape)} != {ctx.shape}")
        target = keys if seg.kind == "k" else values
        lo = seg.token_start - shape.token_start
        target[seg.layer][:, lo : lo + seg.token_count, :] = out

    segs = [s for s in header.segments if s.kind != "aux"]
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        list(pool.map(work, segs))
    return KVCache(list(header.token_ids), keys, values)


def verify(src: format.ByteSource, header: format.Header) -> int:
    """Check every segment's checksum; returns how many were checked."""
    for seg in header.segments:
        format.read_segment(src, header, seg)
    return len(header.segments)


def format_dtype(name: str) -> torch.dtype:
    return {v: k for k, v in DTYPE_NAMES.items()}[name]
