"""kvq's decoding with backend "triton" (KvqDecoder.decode_onto): a batch of segments' bytes to cache tensors on a
device in a few launches.

The host checks every segment's sizes and cuts out its stream (KvqDecoder.split, as the CPU path does); one
transfer and one rANS launch (kernels/rans_decode.py) decode every stream of the batch; the per-segment escape
counts come back with the streams' status in one transfer, so the escape frames are checked and decompressed
exactly as the CPU path does (entropy.escape_values); torch gathers expand joint symbols and escapes; version 4's
transform, where the file has one, is one launch per run (transform_triton.py); and one fused dequantize launch
(dequantize_triton.py) per run of consecutive segments of a layer and kind writes the cache.
Symbols and values are the CPU path's, bit for bit, and every refusal is the CPU path's, naming the segment.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ...kernels import rans_decode
from .. import entropy, rans
from ..base import CodecError, SegmentContext, bytes_to_tensor
from ..transform import MAX_COMPONENT
from .dequantize_triton import dequantize_rotate
from .transform_triton import row_sum, untransform


MAX_TUPLE = 4  # the longest joint symbol (entropy.class_layout); shorter ones are padded to it


class Layout:
    """Where each symbol of a segment of one (layer, kind, non-sink token count) sits, on the device: its table,
    escape symbol, tuple length and first row in one digit table of every class (values padded to MAX_TUPLE),
    and for each of its MAX_TUPLE values the channel and token it lands on (channel -1: padding)."""

    def __init__(self, groups: list[entropy.Group], tables: entropy.ClassTables, tokens: int, device):
        ids, esc, widths, base, channel, token, digits = [], [], [], [], [], [], []
        lane = np.arange(MAX_TUPLE)
        first_row = 0
        for g in groups:
            half, m = entropy.class_layout(g.cls)
            n, per_row = g.tuples(tokens), -(-tokens // m)
            ids.append(np.full(n, tables.index(g.cls), np.int32))
            esc.append(np.full(n, (2 * half + 1) ** m, np.int32))
            widths.append(np.full(n, m, np.int32))
            base.append(np.full(n, first_row, np.int32))
            table = entropy._digits_table(half, m)
            digits.append(np.pad(table, ((0, 0), (0, MAX_TUPLE - m))))
            first_row += len(table)
            j = np.arange(n)  # to_tuples' order: each channel's tuples in token order, channels ascending
            t = (j % per_row)[:, None] * m + lane
            real = (lane < m) & (t < tokens)
            channel.append(np.where(real, g.rows[j // per_row][:, None], -1))
            token.append(np.where(real, t, 0))
        self.symbols, self.tokens = sum(len(a) for a in ids), tokens
        # The largest magnitude a symbol's values take (escapes aside): version 4's transform needs a bound on |q|.
        self.largest = max((entropy.class_layout(g.cls)[0] for g in groups), default=0)
        cat = (lambda parts, shape: np.concatenate(parts) if parts else np.zeros(shape, np.int64))
        # One transfer for the per-symbol fields, one for the destinations, one for the digits.
        packed = torch.from_numpy(np.stack([cat(a, 0).astype(np.int32) for a in (ids, esc, widths, base)]))
        packed = packed.to(device)
        self.table_ids = packed[0].to(torch.uint8 if tables.coder.count <= 256 else torch.int32)
        self.esc_code, self.widths, self.base = packed[1], packed[2], packed[3]
        dest = torch.from_numpy(np.stack([cat(channel, (0, MAX_TUPLE)), cat(token, (0, MAX_TUPLE))])).to(device)
        self.channel, self.token = dest[0], dest[1]
        self.digits = torch.from_numpy(cat(digits, (0, MAX_TUPLE)).astype(np.int32)).to(device)


class DeviceState:
    """What a file's decoder keeps on the device across batches: its rANS lookup tables and its layouts."""

    def __init__(self, decoder, device):
        self.decoder, self.device = decoder, device
        self.tables = rans_decode.DeviceTables(decoder.tables.coder, device)
        self._layouts: dict[tuple[int, int, int], Layout] = {}
        self._plans: dict[tuple[int, int], tuple] = {}
        self._transforms: dict[tuple[int, int], tuple | None] = {}
        self._lock = threading.Lock()

    def plan(self, layer: int, kind: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Centres, steps (float32 (heads, dim)) and rotary frequencies of a layer's K or V, on the device."""
        with self._lock:
            if (layer, kind) not in self._plans:
                center, step = self.decoder._tensors[(layer, kind)]
                self._plans[(layer, kind)] = (center.to(self.device), step.to(self.device),
                                              self.decoder._freq(layer, kind))
            return self._plans[(layer, kind)]

    def transform(self, layer: int, kind: int) -> tuple[torch.Tensor, int] | None:
        """Version 4's transform of a layer's K or V on the device (int16 (heads, dim, dim)) and its largest row
        sum of |M|; None where the layer and kind are coded without one."""
        with self._lock:
            if (layer, kind) not in self._transforms:
                matrix = self.decoder._matrices.get((layer, kind))
                self._transforms[(layer, kind)] = None if matrix is None else (matrix.to(self.device), row_sum(matrix))
            return self._transforms[(layer, kind)]

    def layout(self, layer: int, kind: int, tokens: int) -> Layout:
        with self._lock:
            key = (layer, kind, tokens)
            if key not in self._layouts:
                self._layouts[key] = Layout(self.decoder._groups[(layer, kind)], self.decoder.tables, tokens,
                                            self.device)
            return self._layouts[key]


def decode_onto(state: DeviceState, segments: list[tuple[SegmentContext, bytes, torch.Tensor]]) -> None:
    """Write each segment's values into its `out`, a (heads, tokens, dim) view on the state's device (CUDA, or
    the CPU under TRITON_INTERPRET=1). CodecError with `index` names the failing segment."""
    if not segments:
        return
    split = state.decoder.split([(ctx, data) for ctx, data, _ in segments])
    # Streams in (layer, kind, position) order: a layer's consecutive segments of one layout share gathers and
    # a dequantize launch.
    order = sorted(range(len(segments)), key=lambda i: (segments[i][0].layer, segments[i][0].kind,
                                                        segments[i][0].token_start))
    lay = []
    for i in order:
        ctx, skip = segments[i][0], split[i][1]
        try:
            lay.append(state.layout(ctx.layer, ("k", "v").index(ctx.kind), ctx.tokens - skip))
        except CodecError as err:
            raise CodecError(str(err), index=i) from None
    runs = _runs(order, lay, segments, split)
    symbols, is_esc, first_value, esc_all, peaks = _entropy(state, [split[i][2] for i in order], order, lay, runs,
                                                            _banded_ids(state, segments, split, order))
    for k, i in enumerate(order):  # the CPU path's check (KvqDecoder.entropy): M q must stay exact in float64
        ctx = segments[i][0]
        if peaks[k] >= MAX_COMPONENT and state.transform(ctx.layer, ("k", "v").index(ctx.kind)) is not None:
            raise CodecError("a transformed segment holds a component integer beyond +-2^30", index=i)
    pos = 0
    for run in runs:
        span = slice(pos, pos + lay[run[0]].symbols * len(run))
        pos = span.stop
        first = order[run[0]]
        ctx, skip = segments[first][0], split[first][1]
        q = _expand(lay[run[0]], len(run), symbols[span], is_esc[span], first_value[span], esc_all,
                    ctx.heads * ctx.dim)
        if q is not None:
            kind = ("k", "v").index(ctx.kind)
            center, step, freq = state.plan(ctx.layer, kind)
            weights = state.decoder.tokens.get((ctx.layer, kind))  # split() checked they cover every segment
            factor = weights.factors(ctx.token_start + skip, q.shape[1]) if weights is not None else None
            q = q.view(ctx.heads, ctx.dim, -1)
            transform = state.transform(ctx.layer, kind)
            if transform is not None:  # float32 values M q * 2^-10 take the integers' place
                largest = max([lay[run[0]].largest] + [peaks[k] for k in run])
                q = untransform(q, transform[0], largest, transform[1])
            dequantize_rotate(q, center, step, freq, ctx.token_start + skip,
                              out=_joined([segments[order[k]][2][:, skip:] for k in run]), token_factor=factor)
    for (ctx, data, out), (_, skip, coded) in zip(segments, split):
        if skip:
            sink_ctx = SegmentContext(ctx.kind, ctx.layer, ctx.token_start, ctx.heads, skip, ctx.dim, ctx.dtype)
            out[:, :skip].copy_(bytes_to_tensor(bytes(data[coded.end :]), sink_ctx))


def _banded_ids(state: DeviceState, segments, split, order: list[int]) -> torch.Tensor | None:
    """Version 4: the table of every symbol of the batch (in `order`), from its segment's token bands, computed on
    the host by the CPU decoder's own mapping (KvqDecoder._table_ids, _ans.table_ids) and sent in one transfer;
    None before version 4."""
    decoder = state.decoder
    if decoder.tables.bands is None:
        return None
    ids = []
    for i in order:
        ctx, skip = segments[i][0], split[i][1]
        try:
            lay = decoder._entropy_layout(ctx.layer, ("k", "v").index(ctx.kind), ctx.tokens - skip)
            ids.append(decoder._table_ids(ctx, skip, lay))
        except CodecError as err:
            raise CodecError(str(err), index=i) from None
    wide = torch.uint8 if decoder.tables.coder.count <= 256 else torch.int32
    return torch.from_numpy(np.concatenate(ids).astype(np.int32)).to(state.device).to(wide)


def _entropy(state: DeviceState, coded: list[entropy.Coded], order: list[int], lay: list[Layout],
             runs: list[list[int]], table_ids: torch.Tensor | None = None):
    """Decode every stream (in `order`) in one launch and check it as the CPU path does. Returns each symbol
    (int32), whether it escapes, the index of its first escape value in the batch's escape array, that array, and
    per stream the largest magnitude of its escape values (0 without). table_ids: version 4's table of every symbol
    (_banded_ids); before, each layout's.

    split_segment has checked every size against the limits that the layouts' symbol counts come from."""
    device = state.device
    counts = [la.symbols for la in lay]
    try:
        batch = rans_decode.upload(state.tables, counts, [c.stream for c in coded])
    except rans.StreamError as err:
        raise CodecError(str(err), index=order[err.index]) from None

    def per_symbol(field: str) -> torch.Tensor:
        """A layout field for every symbol of the batch: one repeat per run, one concatenation."""
        return torch.cat([getattr(lay[run[0]], field).repeat(len(run)) for run in runs])

    symbols, status = rans_decode.launch(state.tables, per_symbol("table_ids") if table_ids is None else table_ids,
                                         batch)
    symbols = symbols.to(torch.int32) & 0xFFFF
    is_esc = symbols == per_symbol("esc_code")
    width = torch.where(is_esc, per_symbol("widths"), 0).to(torch.int64)  # escape values each symbol takes
    ends = torch.cumsum(width, 0)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    at_end = torch.cat([zero, ends])[torch.tensor(np.cumsum(counts, dtype=np.int64), device=device)]
    # One transfer back: every stream's status and escape count.
    host = torch.cat([status.to(torch.int64).reshape(-1), torch.diff(at_end, prepend=zero)]).cpu().numpy()
    streams = len(order)
    try:
        rans_decode.check_status(host[: 2 * streams].reshape(-1, 2), batch.words_per_stream)
    except rans.StreamError as err:
        raise CodecError(str(err), index=order[err.index]) from None
    values = []
    for k, (i, c) in enumerate(zip(order, coded)):
        try:
            values.append(entropy.escape_values(c, int(host[2 * streams + k])))
        except CodecError as err:
            raise CodecError(str(err), index=i) from None
    esc_all = torch.from_numpy(np.concatenate(values + [np.zeros(1, np.int32)])).to(device)
    peaks = [int(np.abs(v.astype(np.int64)).max(initial=0)) for v in values]
    return symbols, is_esc, ends - width, esc_all, peaks


def _expand(la: Layout, ns: int, symbols, is_esc, first_value, esc_all, rows: int) -> torch.Tensor | None:
    """The integers (rows, ns * tokens) int32 of a run of `ns` segments of one layout, from their symbols, in a
    few whole-run operations; None for segments of sinks only."""
    if not la.tokens:
        return None
    device = symbols.device
    sym, esc, off = (t.view(ns, la.symbols) for t in (symbols, is_esc, first_value))
    lane = torch.arange(MAX_TUPLE, device=device)
    values = la.digits[sym + la.base]  # (ns, symbols, MAX_TUPLE); an escape's row is a placeholder
    at = (off[..., None] + lane).clamp_(max=len(esc_all) - 1)
    values = torch.where(esc[..., None], esc_all[at], values)
    span = ns * la.tokens
    scratch = rows * span  # padding values land here, past the integers
    dest = la.channel * span + la.token + (torch.arange(ns, device=device) * la.tokens)[:, None, None]
    dest = torch.where(la.channel >= 0, dest, scratch)
    q = torch.empty(scratch + 1, dtype=torch.int32, device=device)
    q[dest.reshape(-1)] = values.reshape(-1)
    return q[:scratch].view(rows, span)


def _runs(order, lay, segments, split) -> list[list[int]]:
    """Positions in `order` grouped into runs: one layout, consecutive tokens, adjacent outputs."""
    runs: list[list[int]] = []
    for k, i in enumerate(order):
        if runs:
            p = order[runs[-1][-1]]
            prev, cur = segments[p], segments[i]
            if (lay[runs[-1][-1]] is lay[k] and split[i][1] == 0
                    and _adjacent(prev[2][:, split[p][1]:], cur[2])):
                runs[-1].append(k)
                continue
        runs.append([k])
    return runs


def _adjacent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b's tokens follow a's in the same storage, with the same strides (one view can span both)."""
    return (a.stride() == b.stride() and a.shape[0] == b.shape[0] and a.shape[2] == b.shape[2]
            and b.data_ptr() == a.data_ptr() + a.shape[1] * a.stride(1) * a.element_size())


def _joined(views: list[torch.Tensor]) -> torch.Tensor:
    """One (heads, tokens, dim) view over adjacent views (checked by _adjacent)."""
    first = views[0]
    if len(views) == 1:
        return first
    return first.as_strided((first.shape[0], sum(v.shape[1] for v in views), first.shape[2]), first.stride())
