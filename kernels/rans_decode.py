"""kvq's entropy stage on the GPU: kvcli's interleaved rANS streams (docs/codec.md, "Entropy stream").

Reference: codecs/rans.py (decode_streams), the CPU path; this decoder returns exactly its symbols and refuses
exactly the streams it refuses. One program decodes one stream with one thread per lane. At each step every lane
decodes its symbol through the slot lookup tables, and the lanes that fell below 2^16 read one word each from
the stream's word array, in ascending lane order: a lane's word index is the stream's word pointer plus an
exclusive prefix sum of the renormalizing lanes before it.

All 32-bit unsigned quantities travel as int32 tensors (torch has no usable uint32) and are bitcast in the
kernel; symbols and words, 16-bit unsigned, travel as int16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ..codecs import rans

_STATUS_FIELDS = 2  # per stream: words read, lanes not back at STATE_LOW


@triton.jit
def rans_decode_kernel(states_ptr, words_ptr, tables_ptr, sym_lut_ptr, step_lut_ptr, out_ptr, status_ptr,
                       lane_first_ptr, lane_count_ptr, sym_first_ptr, sym_count_ptr, word_first_ptr, word_count_ptr,
                       LANES: tl.constexpr):
    s = tl.program_id(0)
    lanes = tl.load(lane_count_ptr + s)
    n = tl.load(sym_count_ptr + s)
    sym0 = tl.load(sym_first_ptr + s)
    word0 = tl.load(word_first_ptr + s)
    n_words = tl.load(word_count_ptr + s)
    j = tl.arange(0, LANES)
    live = j < lanes
    x = tl.load(states_ptr + tl.load(lane_first_ptr + s) + j, mask=live, other=1 << 16).to(tl.uint32, bitcast=True)
    ptr = 0
    steps = tl.cdiv(n, tl.maximum(lanes, 1))
    for t in range(0, steps):
        i = t * lanes + j
        active = live & (i < n)
        table = tl.load(tables_ptr + sym0 + i, mask=active, other=0).to(tl.int64)
        slot = x & 0xFFFF
        row = table * 65536 + slot.to(tl.int64)
        e = tl.load(step_lut_ptr + row, mask=active, other=0).to(tl.uint32, bitcast=True)
        sym = tl.load(sym_lut_ptr + row, mask=active, other=0)
        tl.store(out_ptr + sym0 + i, sym, mask=active)
        decoded = ((e >> 16) + 1) * (x >> 16) + (e & 0xFFFF)
        x = tl.where(active, decoded, x)
        need = active & (x < 65536)
        need_i = need.to(tl.int32)
        before = tl.cumsum(need_i, 0) - need_i
        pos = ptr + before
        # A read past the stream's own words is refused below (words read != words stored); it reads 0 here.
        ok = need & (pos < n_words)
        w = tl.load(words_ptr + word0 + pos, mask=ok, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        x = tl.where(need, (x << 16) | w, x)
        ptr += tl.sum(need_i, 0)
    tl.store(status_ptr + s * 2, ptr)
    tl.store(status_ptr + s * 2 + 1, tl.sum((live & (x != 65536)).to(tl.int32), 0))


class DeviceTables:
    """A file's slot lookup tables (the arrays of rans.Tables.lookup, bit for bit), built on the device from the
    frequencies: a few vector operations instead of a host build and a 6-bytes-per-slot upload per file."""

    def __init__(self, tables: rans.Tables, device: torch.device | str):
        if rans.TOTAL != 1 << 16:
            raise ValueError("the kernel implements 16-bit precision tables (docs/codec.md)")
        self.count = tables.count
        total = 1 << 16
        freq = torch.from_numpy(np.concatenate(tables.freqs + [np.array([total], np.uint32)]).astype(np.int64))
        freq = freq.to(device)
        sizes = torch.tensor([len(f) for f in tables.freqs] + [1], device=freq.device)
        first = torch.cumsum(sizes, 0) - sizes  # each table's first symbol in the concatenation
        table_of = torch.repeat_interleave(torch.arange(len(sizes), device=freq.device), sizes)
        cum = torch.cumsum(freq, 0) - freq - total * table_of  # within its table: every table sums to 2^16
        owner = torch.repeat_interleave(torch.arange(len(freq), device=freq.device), freq)  # slot -> symbol
        slot = torch.arange(len(owner), device=freq.device) % total
        # The identity row: symbol 0, slot | (2^16 - 1) << 16, which leaves a lane unchanged.
        self.sym_lut = (owner - first[table_of[owner]]).to(torch.int16)
        step = (slot - cum[owner]) | ((freq[owner] - 1) << 16)
        self.step_lut = torch.where(step >= 1 << 31, step - (1 << 32), step).to(torch.int32)


def check_streams(streams: list[tuple[np.ndarray, rans.Stream]]) -> None:
    """The sizes rans.decode_streams asserts. They are the caller's to guarantee (entropy.split_segment checks them
    against the segment's limits), so a wrong size is a ValueError; states, which are data, are upload's."""
    for k, (tid, st) in enumerate(streams):
        lanes = rans.lanes_for(len(tid))
        if len(st.states) != lanes or len(st.words) > len(tid):
            raise ValueError(f"stream {k}: {len(st.states)} lanes and {len(st.words)} words for {len(tid)} symbols "
                             f"(the rule gives {lanes} lanes, at most one word per symbol)")


def _offsets(sizes: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64)


def decode_streams(tables: DeviceTables, streams: list[tuple[np.ndarray, rans.Stream]]) -> torch.Tensor:
    """Decode each (table index per symbol, stream) on tables' device, one program per stream.

    Returns every stream's symbols concatenated in order, int16 holding uint16 bits (stream k's symbols start at
    the sum of the earlier streams' symbol counts). Raises rans.StreamError with the failing stream's index where
    rans.decode_streams would.
    """
    check_streams(streams)
    for tid, _ in streams:
        if len(tid) and int(tid.max()) >= tables.count:
            raise ValueError(f"table index {int(tid.max())} of {tables.count} tables")
    table_dtype = np.uint8 if tables.count <= 256 else np.int32  # a byte per symbol is the common case
    ids = np.concatenate([t for t, _ in streams]).astype(table_dtype) if streams else np.zeros(0, table_dtype)
    return decode_checked(tables, torch.from_numpy(ids).to(tables.sym_lut.device), [len(t) for t, _ in streams],
                          [st for _, st in streams])


def decode_checked(tables: DeviceTables, table_ids: torch.Tensor, counts: list[int],
                   streams: list[rans.Stream]) -> torch.Tensor:
    """decode_streams for a caller that has run check_streams and built the table ids on the device (uint8 or
    int32, every stream's ids concatenated, values below tables.count), as a GPU file decoder does."""
    batch = upload(tables, counts, streams)
    out, status = launch(tables, table_ids, batch)
    check_status(status.cpu().numpy(), batch.words_per_stream)
    return out


@dataclass(frozen=True)
class Batch:
    """A batch of streams on the device, laid out for one launch: views into one buffer, copied in one transfer."""

    states: torch.Tensor  # int32 bits of every lane's initial state
    words: torch.Tensor  # int16 bits of every stream's words, one spare word at the end
    meta: torch.Tensor  # int32 (6, streams): first lane, lanes, first symbol, symbols, first word, words
    words_per_stream: list[int]
    symbols: int
    block: int  # lanes of a program, a power of two


def upload(tables: DeviceTables, counts: list[int], streams: list[rans.Stream]) -> Batch:
    """Meta, states and words of every stream packed into one int32 host array and copied to the device once.
    Refuses (StreamError naming the stream) an initial state below 2^16; sizes are the caller's (check_streams)."""
    lanes = [len(st.states) for st in streams]
    n_words = [len(st.words) for st in streams]
    total = sum(counts)
    meta = np.stack([_offsets(lanes), lanes, _offsets(counts), counts, _offsets(n_words), n_words]).astype(np.int64)
    if meta.size and (meta.max() >= 1 << 31 or total + sum(n_words) >= 1 << 31):
        raise ValueError("a batch of streams must stay below 2^31 symbols, words and lanes")
    n_meta, n_lanes, n_all = meta.size, sum(lanes), sum(n_words) + 1  # the spare word keeps the last gather in bounds
    buf = np.zeros(n_meta + n_lanes + (n_all + 1) // 2, dtype=np.int32)
    buf[:n_meta] = meta.reshape(-1)
    if streams:
        np.concatenate([st.states for st in streams], out=buf[n_meta : n_meta + n_lanes].view(np.uint32),
                       casting="unsafe")
        words = buf[n_meta + n_lanes :].view(np.uint16)
        np.concatenate([st.words for st in streams], out=words[: n_all - 1], casting="unsafe")
    states = buf[n_meta : n_meta + n_lanes].view(np.uint32)
    if n_lanes and int(states.min()) < rans.STATE_LOW:
        lane = int(np.argmax(states < rans.STATE_LOW))
        raise rans.StreamError("a lane's initial state is below 2^16", int(np.searchsorted(meta[0], lane, "right")) - 1)
    dev = torch.from_numpy(buf).to(tables.sym_lut.device)
    return Batch(dev[n_meta : n_meta + n_lanes], dev[n_meta + n_lanes :].view(torch.int16)[:n_all],
                 dev[:n_meta].view(6, len(streams)), n_words, total,
                 max(16, triton.next_power_of_2(max(lanes, default=1))))


def launch(tables: DeviceTables, table_ids: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The symbols (int16 bits) and per-stream status (words read, lanes not back at 2^16), not yet checked."""
    if int(table_ids.numel()) != batch.symbols:
        raise ValueError(f"{table_ids.numel()} table ids for {batch.symbols} symbols")
    device = tables.sym_lut.device
    out = torch.empty(batch.symbols, dtype=torch.int16, device=device)
    streams = len(batch.words_per_stream)
    status = torch.zeros((streams, _STATUS_FIELDS), dtype=torch.int32, device=device)
    if batch.symbols:
        rans_decode_kernel[(streams,)](batch.states, batch.words, table_ids, tables.sym_lut, tables.step_lut, out,
                                       status, *batch.meta, LANES=batch.block,
                                       num_warps=max(1, min(8, batch.block // 32)))
    return out, status


def check_status(status: np.ndarray, words_per_stream: list[int]) -> None:
    """Every stream read exactly its words and ended with every lane at 2^16, or StreamError names the first.
    `status`: launch's, on the host."""
    for k, ((read, unfinished), expected) in enumerate(zip(status, words_per_stream)):
        if read != expected:
            raise rans.StreamError(f"the entropy decoder read {read} of {expected} words", k)
        if unfinished:
            raise rans.StreamError("a lane of the entropy decoder did not end in its initial state", k)
