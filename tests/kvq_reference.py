"""A kvq decoder written from docs/codec.md alone, to prove the spec complete. It must not import kvcli.codecs.

Plain Python for the entropy stream (one lane at a time, no batching) and numpy for the arithmetic; the
container is read with kvcli.format, which docs/format.md specifies separately. Only for small golden files.
"""

from __future__ import annotations

import bisect
import math
import struct

import numpy as np
import zstandard

from kvcli.container import format

PRECISION = 16
LOW = 1 << 16
STEPS_PER_LANE = 1024


class Invalid(Exception):
    pass


def layout(cls: int) -> tuple[int, int]:
    half = int(min(255, max(1, math.ceil(4.5 * 2.0 ** (cls / 2)))))
    for m in (4, 2, 1):
        if (2 * half + 1) ** m < 1024:
            return half, m
    return half, 1


def unzstd(frame: bytes, exact: int | None, limit: int) -> bytes:
    declared = zstandard.frame_content_size(frame)
    if declared < 0 or declared > limit or (exact is not None and declared != exact):
        raise Invalid(f"zstd frame declares {declared} bytes")
    obj = zstandard.ZstdDecompressor().decompressobj()
    out = obj.decompress(frame)
    if not obj.eof or obj.unused_data or len(out) != declared:
        raise Invalid("zstd frame is truncated or followed by bytes")
    return out


def read_tables(raw: bytes, banded: bool) -> dict:
    """class -> frequencies; banded (version 4): (class, band) -> frequencies."""
    (count,) = struct.unpack_from("<H", raw, 0)
    pos, tables, last = 2, {}, None
    for _ in range(count):
        (cls,) = struct.unpack_from("<b", raw, pos)
        pos += 1
        key = cls
        if banded:
            (band,) = struct.unpack_from("<B", raw, pos)
            pos += 1
            if band > 8:
                raise Invalid("table band")
            key = (cls, band)
        if not -12 <= cls <= 16 or (last is not None and key <= last):
            raise Invalid("table class")
        half, m = layout(cls)
        size = (2 * half + 1) ** m + 1
        freq = list(struct.unpack_from(f"<{size}H", raw, pos))
        pos += 2 * size
        if min(freq) < 1 or sum(freq) != 1 << PRECISION:
            raise Invalid("table frequencies")
        tables[key] = freq
        last = key
    if pos != len(raw):
        raise Invalid("tables trailing bytes")
    return tables


def read_plans(raw: bytes):
    (layers,) = struct.unpack_from("<I", raw, 0)
    pos, plans, freqs = 4, {}, {}
    for layer in range(layers):
        for kind in "kv":
            heads, dim, rope = struct.unpack_from("<HHB", raw, pos)
            pos += 5
            n = heads * dim
            center = np.frombuffer(raw, "<f2", n, pos).astype(np.float32).reshape(heads, dim)
            step = np.frombuffer(raw, "<f2", n, pos + 2 * n).astype(np.float32).reshape(heads, dim)
            classes = np.frombuffer(raw, np.int8, n, pos + 4 * n).reshape(heads, dim)
            pos += 5 * n
            if not (np.isfinite(step).all() and (step > 0).all() and np.isfinite(center).all()):
                raise Invalid("plan steps")
            plans[(layer, kind)] = (center, step, classes)
            if rope:
                if kind != "k":
                    raise Invalid("rope on values")
                freqs[layer] = np.frombuffer(raw, "<f4", dim // 2, pos).copy()
                pos += 2 * dim
    if pos != len(raw):
        raise Invalid("plan trailing bytes")
    return plans, freqs


def rans_decode(states: list[int], words: list[int], table_of: list[list[int]]) -> list[int]:
    """The stream of docs/codec.md: symbol i on lane i mod L at step i div L; one shared word array."""
    n, lanes = len(table_of), len(states)
    if lanes != -(-n // STEPS_PER_LANE):
        raise Invalid("lane count")
    if any(s < LOW for s in states):
        raise Invalid("initial state")
    x, p, out = list(states), 0, [0] * n
    cums = {}
    for t in range(-(-n // lanes) if lanes else 0):
        active = [j for j in range(lanes) if t * lanes + j < n]
        for j in active:
            i = t * lanes + j
            freq = table_of[i]
            cum = cums.setdefault(id(freq), [sum(freq[:s]) for s in range(len(freq) + 1)])
            slot = x[j] % (1 << PRECISION)
            s = bisect.bisect_right(cum, slot) - 1
            out[i] = s
            x[j] = freq[s] * (x[j] >> PRECISION) + slot - cum[s]
        for j in active:
            if x[j] < LOW:
                if p >= len(words):
                    raise Invalid("stream ran out of words")
                x[j] = (x[j] << 16) | words[p]
                p += 1
    if p != len(words) or any(s != LOW for s in x):
        raise Invalid("stream did not end empty in the initial states")
    return out


def read_tokens(raw: bytes, plans) -> dict[tuple[int, str], tuple[int, np.ndarray]]:
    """kvq.tokens: (layer, "k"/"v") -> (first position, int exponents (heads, tokens))."""
    if len(raw) < 4:
        raise Invalid("token weights truncated")
    (count,) = struct.unpack_from("<I", raw, 0)
    pos, out, last = 4, {}, None
    for _ in range(count):
        if pos + 15 > len(raw):
            raise Invalid("token weights truncated")
        layer, kind, heads, first, n = struct.unpack_from("<IBHII", raw, pos)
        pos += 15
        if kind > 1 or (last is not None and (layer, kind) <= last):
            raise Invalid("token weights out of order")
        last = (layer, kind)
        plan = plans.get((layer, "kv"[kind]))
        if plan is None or plan[0].shape[0] != heads:
            raise Invalid("token weights without a plan")
        if pos + heads * n > len(raw):
            raise Invalid("token weights truncated")
        e = np.frombuffer(raw, np.int8, heads * n, pos).reshape(heads, n).astype(np.int64)
        pos += heads * n
        if np.abs(e).max(initial=0) > 24:
            raise Invalid("token weights")
        out[(layer, "kv"[kind])] = (first, e)
    if pos != len(raw):
        raise Invalid("token weights trailing bytes")
    return out


def read_transforms(raw: bytes) -> dict[tuple[int, str], np.ndarray]:
    """A dictionary's transform payload: (layer, "k"/"v") -> int64 matrices (heads, dim, dim)."""
    (count,) = struct.unpack_from("<I", raw, 0)
    pos, out, last = 4, {}, None
    for _ in range(count):
        layer, kind, heads, dim = struct.unpack_from("<IBHH", raw, pos)
        pos += 9
        if kind > 1 or heads < 1 or not 1 <= dim <= 256 or (last is not None and (layer, kind) <= last):
            raise Invalid("transform entry")
        last = (layer, kind)
        n = heads * dim * dim
        if pos + 2 * n > len(raw):
            raise Invalid("transform truncated")
        out[(layer, "kv"[kind])] = np.frombuffer(raw, "<i2", n, pos).astype(np.int64).reshape(heads, dim, dim)
        pos += 2 * n
    if pos != len(raw):
        raise Invalid("transform trailing bytes")
    return out


def untransform(q: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """float32(M q) * 2^-10 per head, M q in int64 (exact: |q| < 2^30), rounded once to float32."""
    if np.abs(q).max(initial=0) >= 1 << 30:
        raise Invalid("component integer beyond 2^30")
    y = np.einsum("hij,hjt->hit", matrix, q)
    return y.astype(np.float32) * np.float32(2.0**-10)


def decode_segment(data: bytes, seg, shape, dtype: str, sinks: int, plan, tables, freq, weights,
                   banded: bool, matrix: np.ndarray | None = None) -> np.ndarray:
    """float32 (heads, tokens, dim) values before the final cast, and the raw sink bytes; with a transform's
    matrices (heads, dim, dim) the integers are components."""
    center, step, classes = plan
    heads, dim = center.shape
    tokens = seg.token_count
    skip = min(tokens, max(0, sinks - seg.token_start))
    coded = tokens - skip
    itemsize = format.DTYPES[dtype]
    flat = classes.reshape(-1)
    groups = [(int(c), [r for r in range(heads * dim) if flat[r] == c]) for c in sorted(set(flat.tolist()))]
    lo = None
    if weights is not None:
        first, e = weights
        lo = seg.token_start + skip - first
        if lo < 0 or lo + coded > e.shape[1] or e.shape[0] != heads:
            raise Invalid("token weights do not cover the segment")
    table_of, pieces = [], []
    for cls, rows in groups:
        half, m = layout(cls)
        n_tuples = -(-coded // m) if coded else 0
        for r in rows:
            for u in range(n_tuples):
                key = cls
                if banded:  # the band of the tuple's first token at the channel's head; 4 without weights
                    key = (cls, (int(e[r // dim, lo + u * m]) + 24) // 6 if lo is not None else 4)
                if key not in tables:
                    raise Invalid("no table for a symbol's class and band")
                table_of.append(tables[key])
        pieces.append((cls, rows, half, m, n_tuples))
    lanes, n_words, esc_bytes = struct.unpack_from("<III", data, 0)
    pos = 12
    states = list(struct.unpack_from(f"<{lanes}I", data, pos))
    pos += 4 * lanes
    words = list(struct.unpack_from(f"<{n_words}H", data, pos))
    pos += 2 * n_words
    esc_frame = data[pos : pos + esc_bytes]
    pos += esc_bytes
    sink_bytes = heads * skip * dim * itemsize
    if pos + sink_bytes != len(data) or n_words > len(table_of):
        raise Invalid("segment sizes")
    symbols = rans_decode(states, words, table_of)
    q = np.zeros((heads * dim, coded), dtype=np.int64)
    k, escaped_tuples = 0, []
    for cls, rows, half, m, n_tuples in pieces:
        base, esc = 2 * half + 1, (2 * half + 1) ** m
        for r in rows:
            for u in range(n_tuples):
                s = symbols[k]
                k += 1
                if s == esc:
                    escaped_tuples.append((r, u, m))
                    continue
                for j in range(m):
                    digit = (s // base ** (m - 1 - j)) % base
                    if u * m + j < coded:
                        q[r, u * m + j] = digit - half
    n_values = sum(m for *_, m in escaped_tuples)
    if bool(escaped_tuples) != bool(esc_frame):
        raise Invalid("escape frame presence")
    values = np.frombuffer(unzstd(esc_frame, 4 * n_values, 1 << 30), "<i4") if esc_frame else []
    v = 0
    for r, u, m in escaped_tuples:
        for j in range(m):
            if u * m + j < coded:
                q[r, u * m + j] = values[v]
            v += 1
    q = q.reshape(heads, dim, coded)
    w = untransform(q, matrix) if matrix is not None else q.astype(np.float32)
    x = w * step[..., None]
    if weights is not None:
        factor = np.array([np.float32(2.0 ** (k / 8)) for k in e[:, lo : lo + coded].reshape(-1)], np.float32)
        x = x * factor.reshape(heads, 1, coded)
    x = x + center[..., None]
    if freq is not None and coded:
        positions = np.arange(seg.token_start + skip, seg.token_start + tokens, dtype=np.float64)
        angles = np.outer(freq.astype(np.float64), positions)
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        a, b = x[:, : dim // 2], x[:, dim // 2 :]
        x = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1)
    return x.transpose(0, 2, 1), data[len(data) - sink_bytes :], skip


def to_dtype_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the cache dtype's bits (uint32 or uint16), rounding to nearest-even."""
    if dtype == "float32":
        return x.astype(np.float32).view(np.uint32)
    if dtype == "float16":
        return np.clip(x, -65504, 65504).astype(np.float16).view(np.uint16)
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def decode_file(data: bytes, transform: bytes | None = None) -> dict[tuple[int, str], np.ndarray]:
    """(layer, "k"/"v") -> the decoded tensor's bits, (heads, held tokens, dim), as uint32 or uint16. A file that
    names a dictionary needs its transform payload."""
    src = format.BytesSource(data)
    header = format.read_header(src)
    params = header.codec["params"]
    if header.codec["name"] != "kvq" or params.get("version") not in (2, 3, 4):
        raise Invalid("not a kvq version 2, 3 or 4 file")
    aux = {s.name: format.read_segment(src, header, s) for s in header.segments if s.kind == "aux"}
    if "kvq.tokens" in aux and params["version"] < 3:
        raise Invalid("token weights in a version 2 file")
    plans, freqs = read_plans(unzstd(aux["kvq.plan"], None, 64 << 20))
    if len(plans) != 2 * len(header.layers):
        raise Invalid("plan layer count differs from the header's")
    weights = read_tokens(unzstd(aux["kvq.tokens"], None, 64 << 20), plans) if "kvq.tokens" in aux else {}
    banded = params["version"] == 4
    matrices = {}
    if "dictionary" in params:
        if not banded or transform is None:
            raise Invalid("a dictionary named outside version 4, or not given")
        matrices = read_transforms(transform)
        for (layer, kind), m in matrices.items():
            if (layer, kind) not in plans or plans[(layer, kind)][0].shape != m.shape[:2]:
                raise Invalid("transform does not fit the plans")
    tables = read_tables(unzstd(aux["kvq.tables"], None, 64 << 20), banded)
    bits = "<u4" if header.dtype == "float32" else "<u2"
    out = {}
    for li, shape in enumerate(header.layers):
        for kind in "kv":
            dim = shape.key_dim if kind == "k" else shape.value_dim
            out[(li, kind)] = np.zeros((shape.kv_heads, header.num_tokens - shape.token_start, dim), np.dtype(bits).newbyteorder("="))
    for seg in header.segments:
        if seg.kind == "aux":
            continue
        shape = header.layers[seg.layer]
        values, sink_raw, skip = decode_segment(format.read_segment(src, header, seg), seg, shape, header.dtype,
                                                params["sinks"], plans[(seg.layer, seg.kind)], tables,
                                                freqs.get(seg.layer) if seg.kind == "k" else None,
                                                weights.get((seg.layer, seg.kind)), banded,
                                                matrices.get((seg.layer, seg.kind)))
        lo = seg.token_start - shape.token_start
        target = out[(seg.layer, seg.kind)]
        heads, dim = target.shape[0], target.shape[2]
        target[:, lo : lo + skip] = np.frombuffer(sink_raw, bits).reshape(heads, skip, dim)
        target[:, lo + skip : lo + seg.token_count] = to_dtype_bits(values, header.dtype)
    return out
