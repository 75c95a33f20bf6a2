"""KV caches to and from .kvc containers: chunking, codec calls, bounds, and decoding in file order."""

from __future__ import annotations

import os
import zlib
from collections import deque
from itertools import accumulate
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import __version__
from ..codecs.base import ITEMSIZE, Codec, CodecError, Decoder, SegmentContext
from ..codecs.registry import codec_from_header
from ..errors import FormatError
from ..kernels.placement import resolve
from ..modeling.kvcache import KVCache
from . import dictionary, format

DEFAULT_CHUNK_TOKENS = 256
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# CPU decoding splits a cache into at least this many batches per thread, so that no thread is left with the
# last large batch while the others idle (with one batch per thread, three batches on two threads took the
# time of two).
BATCHES_PER_THREAD = 4
MEMORY_SHARE = 0.9  # a decoded cache may take at most this share of the memory available when decoding starts


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


def decoded_bytes(layers: list[format.LayerShape], num_tokens: int, dtype: str) -> int:
    """Bytes of every layer's K and V once decoded."""
    return sum(s.kv_heads * (num_tokens - s.token_start) * (s.key_dim + s.value_dim) for s in layers) * ITEMSIZE[dtype]


def check_expansion(codec: type[Codec] | Codec, decoded: int, stored: int) -> None:
    """Bound (a): no valid file of this codec decodes to more than max_expansion times its data bytes.

    The writer calls it too, so it never writes a file its reader refuses.
    """
    if decoded > codec.max_expansion * stored:
        raise CodecError(f"{decoded} decoded bytes from {stored} stored bytes exceeds codec {codec.name}'s "
                         f"maximum expansion of {codec.max_expansion:g}x")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for the decoded cache: MemAvailable on CPU, free device memory on CUDA; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_decoded_size(header: format.Header, codec: Codec, name: str, available: int | None) -> None:
    """Refuse, before allocating anything, a file whose decoded size breaks either bound (docs/codec.md)."""
    decoded = decoded_bytes(header.layers, header.num_tokens, header.dtype)
    try:
        check_expansion(codec, decoded, header.data_bytes())
    except CodecError as err:
        raise FormatError(f"{name}: {err}") from None
    if available is not None and decoded > MEMORY_SHARE * available:
        raise FormatError(f"{name}: the decoded cache needs {decoded} bytes, more than {MEMORY_SHARE:.0%} of the "
                          f"{available} bytes of memory available")


def encode(kv: KVCache, model_identity: dict, codec: Codec, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
           extra: dict | None = None, backend: str = "torch") -> tuple[dict, list[format.SegmentData]]:
    """Header fields and segment bytes for `kv`; hand both to format.write_kvc. CodecError if `kv` cannot be
    coded (non-finite values for a lossy codec, say).

    The codec fits its tables on the CPU; backend "triton" quantizes segments where `kv` lives, with the
    codec's kernels where it has them (the file's bytes are the same either way)."""
    if type(chunk_tokens) is not int or not 1 <= chunk_tokens <= format.MAX_TOKENS:
        # 0 divided by zero and a negative length never ended; a reader would refuse either value
        raise ValueError(f"chunk_tokens must be an integer in [1, {format.MAX_TOKENS}], not {chunk_tokens!r}")
    dtype = DTYPE_NAMES[kv.dtype]
    shapes = layer_shapes(kv)
    # With triton the fit gets copies even on the CPU, so the segments are quantized by the kernel on every
    # device alike rather than taken from the fit's integers (which it keeps for the tensors it saw).
    triton = backend == "triton"
    host = KVCache(kv.token_ids, [k.to("cpu", copy=triton) for k in kv.keys],
                   [v.to("cpu", copy=triton) for v in kv.values])
    encoder = codec.fit(host.keys, host.values, [s.token_start for s in shapes], kv.attention, backend)
    if not triton:
        kv = host
    jobs = []
    for c_start, c_end in _chunks(0, kv.num_tokens, chunk_tokens):
        for li, shape in enumerate(shapes):
            lo = max(c_start, shape.token_start)
            if lo >= c_end:
                continue
            for kind, tensors in (("k", kv.keys), ("v", kv.values)):
                ctx = _context(dtype, kind, li, shape, lo, c_end - lo)
                local = slice(lo - shape.token_start, c_end - shape.token_start)
                jobs.append((tensors[li][:, local, :], ctx))
    blobs = encoder.encode_many(jobs)
    parts = [format.SegmentData("aux", -1, 0, 0, data, name) for name, data in sorted(encoder.aux().items())]
    parts += [format.SegmentData(ctx.kind, ctx.layer, ctx.token_start, ctx.tokens, blob) for (_, ctx), blob in zip(jobs, blobs)]
    check_expansion(codec, decoded_bytes(shapes, kv.num_tokens, dtype), sum(len(p.data) for p in parts))
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


def open_decoder(src: format.ByteSource, header: format.Header, backend: str = "torch") -> tuple[Codec, Decoder]:
    """The file's codec, validated, and its decoder for `backend` built from the aux segments (checksums
    verified), with the dictionary the file names attached (DictionaryMissing, a FormatError, where none is found)."""
    codec, decoder, _ = _open(src, header, backend, reread=False)
    return codec, decoder


def _open(src: format.ByteSource, header: format.Header, backend: str = "torch",
          reread: bool = True) -> tuple[Codec, Decoder, dictionary.Dictionary | None]:
    name = getattr(src, "path", "<input>")
    try:
        codec = codec_from_header(header.codec.get("name"), header.codec.get("params"))
    except CodecError as err:
        raise FormatError(f"{name}: codec: {err}") from None
    aux = {s.name: format.read_segment(src, header, s) for s in header.segments
           if s.kind == "aux" and s.name != dictionary.AUX_NAME}
    carried = dictionary.carried(src, header, name)
    needed = getattr(codec, "dictionary", None)
    found = attach_dictionary(codec, needed, carried, src, header, name, reread) if needed is not None else None
    try:
        return codec, codec.open(aux, len(header.layers), backend), found
    except CodecError as err:
        raise FormatError(f"{name}: codec tables: {err}") from None


def attach_dictionary(codec: Codec, sha: str, carried: dictionary.Dictionary | None, src: format.ByteSource,
                      header: format.Header, name: str, reread: bool = True) -> dictionary.Dictionary:
    """The dictionary the file names, the one it carries (checked already) or else found where its source's
    readers look (`reread`: dictionary.find's) and checked against its model, with its transforms handed to the
    codec."""
    from ..codecs.transform import Transforms

    found = carried if carried is not None else dictionary.resolve(sha, header, name, dictionary.places_for(src),
                                                                   reread=reread)
    try:
        transforms = found.derived.get("transforms")
        if transforms is None:
            transforms = found.derived["transforms"] = Transforms.unpack(found.payload)
        codec.attach(transforms)
    except CodecError as err:
        raise FormatError(f"{name}: dictionary {sha[:16]}…: {err}") from None
    return found


def _batches(segs: list[format.Segment], ctxs: list[SegmentContext], target: int) -> list[list[int]]:
    """Consecutive runs of segments, in file order, of about `target` elements each."""
    batches, current, size = [], [], 0
    for i, ctx in enumerate(ctxs):
        current.append(i)
        size += ctx.heads * ctx.tokens * ctx.dim
        if size >= target:
            batches.append(current)
            current, size = [], 0
    return batches + ([current] if current else [])


def _segments(header: format.Header) -> tuple[list[format.Segment], list[SegmentContext]]:
    segs = [s for s in header.segments if s.kind != "aux"]
    return segs, [_context(header.dtype, s.kind, s.layer, header.layers[s.layer], s.token_start, s.token_count)
                  for s in segs]


def _named(err: CodecError, name: str, segs: list[format.Segment], batch: list[int]) -> FormatError:
    """A codec's refusal within a batch as the format error that names the file and the segment."""
    where = segs[batch[err.index]].label() if err.index is not None else "segments " + ", ".join(
        segs[i].label() for i in batch)
    return FormatError(f"{name}: {where}: cannot decode: {err}")


def _entropy(decoder: Decoder, name: str, segs, batch: list[int], ctxs, datas: list[bytes]) -> list:
    try:
        return decoder.entropy([(ctxs[i], data) for i, data in zip(batch, datas)])
    except CodecError as err:
        raise _named(err, name, segs, batch) from None


def decode(src: format.ByteSource, header: format.Header, threads: int | None = None,
           device: str | torch.device = "cpu", backend: str | None = None) -> KVCache:
    """Every segment read in file order, checksum-verified and decoded onto `device`; the exact bad segment is
    named on failure.

    Segments are read batch by batch while earlier batches decode on `threads` threads, so a source that
    downloads ahead overlaps download and decode. backend "torch", "triton" or None (kernels.placement.resolve's
    auto: triton on CUDA). With "triton", a decoder that has `decode_onto` (kvq) decodes large batches on the
    device from this thread while another reads and checksums the next batch; other codecs decode as with torch.
    """
    device = torch.device(device)
    backend = resolve(device.type, backend or "auto").backend
    name = getattr(src, "path", "<input>")
    codec, decoder = open_decoder(src, header, backend)
    check_decoded_size(header, codec, name, available_memory(device))
    keys, values = _allocate(header, device, decoder.channel_major)
    segs, ctxs = _segments(header)
    on_device = decoder.on_device
    threads = threads or usable_cores()
    total = sum(c.heads * c.tokens * c.dim for c in ctxs)
    target = (decoder.device_batch_elements if on_device
              else min(decoder.batch_elements, -(-total // (threads * BATCHES_PER_THREAD))))
    batches = _batches(segs, ctxs, max(1, target))

    def out_of(i: int) -> torch.Tensor:
        seg = segs[i]
        lo = seg.token_start - header.layers[seg.layer].token_start
        return (keys if seg.kind == "k" else values)[seg.layer][:, lo : lo + seg.token_count]

    def read(batch: list[int]) -> list[bytes]:
        return [format.read_segment(src, header, segs[i]) for i in batch]

    if on_device:  # launches from this thread; one thread reads and checksums the next batch meanwhile
        with ThreadPoolExecutor(max_workers=1) as reader:
            ahead = reader.submit(read, batches[0]) if batches else None
            for k, batch in enumerate(batches):
                datas = ahead.result()
                ahead = reader.submit(read, batches[k + 1]) if k + 1 < len(batches) else None
                try:
                    decoder.decode_onto([(ctxs[i], data, out_of(i)) for i, data in zip(batch, datas)])
                except CodecError as err:
                    raise _named(err, name, segs, batch) from None
        return KVCache(list(header.token_ids), keys, values)

    def work(batch: list[int], datas: list[bytes]) -> None:
        symbols = _entropy(decoder, name, segs, batch, ctxs, datas)
        for i, data, sym in zip(batch, datas, symbols):
            try:
                decoder.reconstruct(ctxs[i], data, sym, out_of(i))
            except CodecError as err:
                raise FormatError(f"{name}: {segs[i].label()}: cannot decode: {err}") from None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(work, batch, read(batch)))
            while len(pending) > threads:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    return KVCache(list(header.token_ids), keys, values)


class SpanSource(format.Source):
    """A source whose bytes [offset, offset + len(data)) were read ahead in one request; other reads pass through."""

    def __init__(self, src: format.ByteSource, offset: int, data: bytes):
        self.src, self.offset, self.data = src, offset, data
        self.size = src.size
        self.path = getattr(src, "path", "<input>")

    def read(self, offset: int, length: int) -> bytes:
        lo = offset - self.offset
        if 0 <= lo and lo + length <= len(self.data):
            return self.data[lo : lo + length]
        return self.src.read(offset, length)


class PrefixReader:
    """Tokens [0, tokens) of a file, decoded layer by layer: what a loader that computes layer l while layer l+1
    loads asks for. Opening it reads, in one read, the codec tables and every segment that holds those tokens
    (files are chunk-major: the tables, then chunk by chunk, so they are the start of the data section), and
    nothing after them; over a store, open the file with store.open_ranged, which fetches only what is read.

        reader = PrefixReader(src, header, 512)
        k, v = reader.layer(0)          # (kv_heads, 512, key_dim), (kv_heads, 512, value_dim)
        kv = reader.cache()             # every layer, as a KVCache of the first 512 tokens

    backend "torch" decodes with the C decoder (onto the CPU; torch elsewhere); "triton" decodes each layer on the
    output's device with the codec's kernels where it has them (kvq's decode_onto), as decode() does.
    """

    def __init__(self, src: format.ByteSource, header: format.Header, tokens: int, backend: str = "torch"):
        name = getattr(src, "path", "<input>")
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be torch or triton, not {backend!r}")
        if type(tokens) is not int or not 0 < tokens <= header.num_tokens:
            raise ValueError(f"{name}: a prefix of 1 to {header.num_tokens} tokens, not {tokens!r}")
        if tokens < header.num_tokens and any(s.token_start for s in header.layers):
            raise FormatError(f"{name}: a layer holds only the document's last tokens (a sliding window), so the "
                              f"file has no prefix of {tokens} tokens")
        self.header, self.tokens, self.name = header, tokens, name
        segs, ctxs = _segments(header)
        wanted = [i for i, seg in enumerate(segs) if seg.token_start < tokens]
        needed = [s for s in header.segments if s.kind == "aux"] + [segs[i] for i in wanted]
        if needed:
            start = header.data_offset + min(s.offset for s in needed)
            end = header.data_offset + max(s.offset + s.length for s in needed)
            src = SpanSource(src, start, src.read(start, end - start))
        self._src = src
        self.codec, self.decoder = open_decoder(src, header, backend)
        check_decoded_size(header, self.codec, name, None)
        self._on_device = self.decoder.on_device
        self._by_layer: dict[tuple[int, str], list[int]] = {}
        for i in wanted:
            self._by_layer.setdefault((segs[i].layer, segs[i].kind), []).append(i)
        self._segs, self._ctxs = segs, ctxs

    def layer(self, layer: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V for tokens [0, tokens), as (kv_heads, tokens, dim) tensors of the file's dtype;
        every segment checksum-verified, a bad one named."""
        shape = self.header.layers[layer]
        return (self._decode(layer, "k", shape.key_dim, device), self._decode(layer, "v", shape.value_dim, device))

    def cache(self, device: str | torch.device = "cpu") -> KVCache:
        layers = [self.layer(i, device) for i in range(len(self.header.layers))]
        return KVCache(list(self.header.token_ids[: self.tokens]), [k for k, _ in layers], [v for _, v in layers])

    def _decode(self, layer: int, kind: str, dim: int, device) -> torch.Tensor:
        batch = self._by_layer.get((layer, kind), [])
        covered = sum(self._ctxs[i].tokens for i in batch)
        if covered < self.tokens or [self._segs[i].token_start for i in batch] != list(accumulate(
                [0] + [self._ctxs[i].tokens for i in batch[:-1]])):
            raise FormatError(f"{self.name}: layer {layer} {kind.upper()} has no segments for all of tokens "
                              f"[0, {self.tokens})")
        heads = self.header.layers[layer].kv_heads
        dtype = format_dtype(self.header.dtype)
        if self.decoder.channel_major:
            out = torch.empty((heads, dim, covered), dtype=dtype, device=device).transpose(1, 2)
        else:
            out = torch.empty((heads, covered, dim), dtype=dtype, device=device)
        datas = [format.read_segment(self._src, self.header, self._segs[i]) for i in batch]
        starts = list(accumulate([0] + [self._ctxs[i].tokens for i in batch]))
        if self._on_device:
            try:
                self.decoder.decode_onto([(self._ctxs[i], data, out[:, pos : pos + self._ctxs[i].tokens])
                                          for i, data, pos in zip(batch, datas, starts)])
            except CodecError as err:
                raise _named(err, self.name, self._segs, batch) from None
            return out[:, : self.tokens]
        symbols = _entropy(self.decoder, self.name, self._segs, batch, self._ctxs, datas)
        pos = 0
        for i, data, sym in zip(batch, datas, symbols):
            ctx = self._ctxs[i]
            try:
                self.decoder.reconstruct(ctx, data, sym, out[:, pos : pos + ctx.tokens])
            except CodecError as err:
                raise FormatError(f"{self.name}: {self._segs[i].label()}: cannot decode: {err}") from None
            pos += ctx.tokens
        return out[:, : self.tokens]


def _allocate(header: format.Header, device: torch.device, channel_major: bool):
    """Empty (heads, tokens, dim) keys and values per layer; views of (heads, dim, tokens) storage if asked."""
    dtype, n = format_dtype(header.dtype), header.num_tokens
    out = []
    for dim_of in (lambda s: s.key_dim, lambda s: s.value_dim):
        if channel_major:
            out.append([torch.empty((s.kv_heads, dim_of(s), n - s.token_start), dtype=dtype, device=device).transpose(1, 2)
                        for s in header.layers])
        else:
            out.append([torch.empty((s.kv_heads, n - s.token_start, dim_of(s)), dtype=dtype, device=device)
                         for s in header.layers])
    return out


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which taskset and containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def verify(src: format.ByteSource, header: format.Header) -> dict:
    """Everything a reader checks short of loading a model: codec name and params, aux tables, every checksum,
    the decoded-size bounds, and every segment's entropy stage (sizes, stream, escape counts)."""
    name = getattr(src, "path", "<input>")
    codec, decoder, found = _open(src, header)
    check_decoded_size(header, codec, name, None)
    segs, ctxs = _segments(header)
    for batch in _batches(segs, ctxs, decoder.batch_elements):
        _entropy(decoder, name, segs, batch, ctxs, [format.read_segment(src, header, segs[i]) for i in batch])
    return {"ok": True, "codec": codec.name, "segments": len(header.segments), "tensor_segments": len(segs),
            "decoded_bytes": decoded_bytes(header.layers, header.num_tokens, header.dtype),
            "dictionary": {"sha256": found.sha, "found_in": found.where} if found is not None else None}


def format_dtype(name: str) -> torch.dtype:
    return {v: k for k, v in DTYPE_NAMES.items()}[name]


# ---------------------------------------------------------------- mixed-level decoding (docs/format.md)


MIXED_FIELDS = ("dtype", "token_ids", "layers", "chunk_tokens")


def check_mixable(headers: list[format.Header], names: list[str]) -> None:
    """Files whose chunks may be mixed into one cache: the same model (its identity less the informational name),
    dtype, tokens, layer shapes and chunking. Codecs may differ: each chunk is decoded with its own file's."""
    first, where = headers[0], names[0]
    for header, name in zip(headers[1:], names[1:]):
        for field in ("model",) + MIXED_FIELDS:
            a, b = getattr(first, field), getattr(header, field)
            if field == "model":
                a, b = ({k: v for k, v in m.items() if k != "name"} for m in (a, b))
            if a != b:
                raise FormatError(f"{name}: cannot be mixed with {where}: its {field} differs")


def chunk_segments(header: format.Header, name: str) -> list[list[int]]:
    """Per chunk (tokens [i·chunk_tokens, (i+1)·chunk_tokens)), the indexes into the file's tensor segments of
    those holding its tokens, in file order. A segment that crosses a chunk boundary makes the file unmixable."""
    segs = [s for s in header.segments if s.kind != "aux"]
    size = header.chunk_tokens
    chunks: list[list[int]] = [[] for _ in range(-(-header.num_tokens // size))]
    for i, seg in enumerate(segs):
        first = seg.token_start // size
        if (seg.token_start + seg.token_count - 1) // size != first:
            raise FormatError(f"{name}: {seg.label()} crosses a boundary of its {size}-token chunks, so its chunks "
                              "cannot be mixed with another file's")
        chunks[first].append(i)
    return chunks


def chunk_spans(header: format.Header, chunks: list[list[int]]) -> list[tuple[int, int]]:
    """Per chunk, the offset and length in the file of the bytes from its first segment to the end of its last:
    one range read (writers put a chunk's segments together)."""
    segs = [s for s in header.segments if s.kind != "aux"]
    spans = []
    for members in chunks:
        if not members:  # every layer a sliding window that starts after this chunk
            spans.append((header.data_offset, 0))
            continue
        lo = min(segs[i].offset for i in members)
        hi = max(segs[i].offset + segs[i].length for i in members)
        spans.append((header.data_offset + lo, hi - lo))
    return spans


def chunk_elements(header: format.Header) -> list[int]:
    """Per chunk, the K and V elements it decodes to over all layers."""
    size, n = header.chunk_tokens, header.num_tokens
    out = []
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        out.append(sum(s.kv_heads * max(0, hi - max(lo, s.token_start)) * (s.key_dim + s.value_dim)
                       for s in header.layers))
    return out


class LevelDecoder:
    """One file of a mixed-level decode: its codec's decoder (built from its own aux segments) and its chunks,
    decoded one at a time into tensors shared with the other files of the same cache."""

    def __init__(self, src: format.ByteSource, header: format.Header):
        self.src, self.header = src, header
        self.name = getattr(src, "path", "<input>")
        self.codec, self.decoder = open_decoder(src, header)
        check_decoded_size(header, self.codec, self.name, None)
        self.segs, self.ctxs = _segments(header)
        self.chunks = chunk_segments(header, self.name)
        self.spans = chunk_spans(header, self.chunks)

    def split(self, chunk: int, data: bytes) -> list[bytes]:
        """The chunk's segments cut from the bytes of spans[chunk], each checksum verified (FormatError naming it)."""
        start = self.spans[chunk][0] - self.header.data_offset
        out = []
        for i in self.chunks[chunk]:
            seg = self.segs[i]
            part = data[seg.offset - start : seg.offset - start + seg.length]
            if len(part) != seg.length:
                raise FormatError(f"{self.name}: {seg.label()} is truncated")
            if zlib.crc32(part) != seg.crc32:
                raise FormatError(f"{self.name}: {seg.label()}: checksum mismatch (file is corrupt)")
            out.append(part)
        return out

    def decode_chunk(self, chunk: int, datas: list[bytes], keys: list[torch.Tensor],
                     values: list[torch.Tensor]) -> None:
        """The chunk's segments decoded into `keys` and `values` (allocate()'s tensors)."""
        batch = self.chunks[chunk]
        symbols = _entropy(self.decoder, self.name, self.segs, batch, self.ctxs, datas)
        for i, data, sym in zip(batch, datas, symbols):
            seg = self.segs[i]
            lo = seg.token_start - self.header.layers[seg.layer].token_start
            out = (keys if seg.kind == "k" else values)[seg.layer][:, lo : lo + seg.token_count]
            try:
                self.decoder.reconstruct(self.ctxs[i], data, sym, out)
            except CodecError as err:
                raise FormatError(f"{self.name}: {seg.label()}: cannot decode: {err}") from None


def allocate(header: format.Header, device: str | torch.device = "cpu") -> tuple[list, list]:
    """Empty keys and values per layer for the header's cache, to decode chunks into."""
    return _allocate(header, torch.device(device), False)


def decode_mixed(levels: list[tuple[format.ByteSource, format.Header]], picks: list[int],
                 device: str | torch.device = "cpu") -> KVCache:
    """The cache with chunk i decoded from levels[picks[i]]: the reference a streaming reader's result equals."""
    headers = [h for _, h in levels]
    check_mixable(headers, [getattr(src, "path", "<input>") for src, _ in levels])
    decoders = {p: LevelDecoder(*levels[p]) for p in sorted(set(picks))}
    chunks = len(next(iter(decoders.values())).chunks)
    if len(picks) != chunks:
        raise ValueError(f"{len(picks)} picks for {chunks} chunks")
    keys, values = allocate(headers[0], device)
    for chunk, pick in enumerate(picks):
        level = decoders[pick]
        offset, length = level.spans[chunk]
        level.decode_chunk(chunk, level.split(chunk, level.src.read(offset, length)), keys, values)
    return KVCache(list(headers[0].token_ids), keys, values)
