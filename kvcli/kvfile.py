"""KV caches to and from .kvc containers: chunking, codec calls, parallel decode."""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import torch

from . import __version__, format, parallel
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


def decode(src: format.ByteSource, header: format.Header, threads: int | None = None,
           device: str | torch.device = "cpu", kernel: bool | None = None) -> KVCache:
    """Every segment read, checksum-verified and decoded; the exact bad segment is named on failure.

    With a CUDA `device`, kvq's tensor stage runs there as a Triton kernel (kernel=None picks it for CUDA;
    kernel=True forces it, which on CPU needs TRITON_INTERPRET=1). Other codecs decode on CPU and move.
    """
    device = torch.device(device)
    kernel = device.type == "cuda" if kernel is None else kernel
    codec = open_codec(src, header)
    dtype = format_dtype(header.dtype)
    n = header.num_tokens
    name = getattr(src, "path", "<input>")
    segs = [s for s in header.segments if s.kind != "aux"]
    ctxs = [_context(header.dtype, s.kind, s.layer, header.layers[s.layer], s.token_start, s.token_count) for s in segs]
    threads = threads or os.cpu_count() or 1
    fork = threads > 1 and len(segs) >= 8 and parallel.fork_available()

    def guarded(i: int, fn):
        try:
            return fn()
        except (CodecError, ValueError, RuntimeError) as err:
            raise FormatError(f"{name}: {segs[i].label()}: cannot decode: {err}") from None

    if hasattr(codec, "decode_symbols") and (kernel or device.type != "cpu" or fork):
        # Channel-major storage: segments land without a transpose; the cache holds transposed views, which
        # injection copies into the model's layout anyway.
        stores = {(li, kind): torch.empty((s.kv_heads, s.key_dim if kind == "k" else s.value_dim, n - s.token_start),
                                          dtype=dtype, device=device)
                  for li, s in enumerate(header.layers) for kind in ("k", "v")}
        keys = [stores[(li, "k")].transpose(1, 2) for li in range(len(header.layers))]
        values = [stores[(li, "v")].transpose(1, 2) for li in range(len(header.layers))]

        def place_channel_major(i: int, out: torch.Tensor) -> None:
            seg, ctx = segs[i], ctxs[i]
            if tuple(out.shape) != (ctx.heads, ctx.dim, ctx.tokens):
                raise FormatError(f"{name}: {seg.label()}: decoded shape {tuple(out.shape)} != {ctx.shape}")
            lo = seg.token_start - header.layers[seg.layer].token_start
            stores[(seg.layer, seg.kind)][:, :, lo : lo + seg.token_count] = out

        _decode_two_stage(src, header, codec, segs, ctxs, place_channel_major, guarded, threads, fork, kernel, device)
    else:
        keys = [torch.empty((s.kv_heads, n - s.token_start, s.key_dim), dtype=dtype) for s in header.layers]
        values = [torch.empty((s.kv_heads, n - s.token_start, s.value_dim), dtype=dtype) for s in header.layers]

        def place(i: int, out: torch.Tensor) -> None:
            seg, ctx = segs[i], ctxs[i]
            if tuple(out.shape) != ctx.shape or out.dtype != dtype:
                raise FormatError(f"{name}: {seg.label()}: decoded shape {tuple(out.shape)} != {ctx.shape}")
            lo = seg.token_start - header.layers[seg.layer].token_start
            (keys if seg.kind == "k" else values)[seg.layer][:, lo : lo + seg.token_count, :] = out

        def work(i: int) -> None:
            data = format.read_segment(src, header, segs[i])
            place(i, guarded(i, lambda: codec.decode(data, ctxs[i])))

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, range(len(segs))))
        if device.type != "cpu":
            keys, values = [k.to(device) for k in keys], [v.to(device) for v in values]
    return KVCache(list(header.token_ids), keys, values)


def _decode_two_stage(src, header, codec, segs, ctxs, place, guarded, threads, fork, kernel, device) -> None:
    """Entropy-decode into shared memory on two processes, then rebuild tensors on threads."""
    datas = [format.read_segment(src, header, s) for s in segs]  # checksums are verified before any decoding
    shapes = [guarded(i, lambda i=i: codec.symbol_shape(ctxs[i])) for i in range(len(segs))]
    sizes = [int(np.prod(shape)) for shape in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    shared = mmap.mmap(-1, max(4 * int(offsets[-1]), 4))
    try:
        symbols = np.frombuffer(shared, dtype=np.int32, count=int(offsets[-1]))

        def view(i: int) -> np.ndarray:
            return symbols[offsets[i] : offsets[i + 1]].reshape(shapes[i])

        def entropy_stage(i: int) -> None:
            guarded(i, lambda: codec.decode_symbols(datas[i], ctxs[i], view(i)))

        if fork:
            try:
                parallel.split_run(segs, entropy_stage, [len(d) for d in datas])
            except parallel.WorkerError as err:
                raise (FormatError if err.kind == "FormatError" else RuntimeError)(str(err)) from None
        else:
            for i in range(len(segs)):
                entropy_stage(i)

        def rebuild(i: int) -> None:
            place(i, guarded(i, lambda: codec.reconstruct(datas[i], ctxs[i], view(i), kernel, device)))

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(rebuild, range(len(segs))))
        del symbols
    finally:
        try:
            shared.close()
        except BufferError:  # a tensor still views the buffer; the OS frees it with the last reference
            pass


def verify(src: format.ByteSource, header: format.Header) -> int:
    """Check every segment's checksum; returns how many were checked."""
    for seg in header.segments:
        format.read_segment(src, header, seg)
    return len(header.segments)


def format_dtype(name: str) -> torch.dtype:
    return {v: k for k, v in DTYPE_NAMES.items()}[name]
