"""Loading a stored prefix into vLLM's paged KV tensors, layer by layer, on a background thread: layer l+1 is read
and decoded while the model computes layer l, and each layer is written straight into the request's blocks.

The model identity, the layer shapes and the tokens (the file must hold exactly the prompt's first tokens) are
checked before anything is written, and each segment's CRC before its layer is. A load that fails at any point
(a damaged segment in a late layer, a store that goes down) writes no further layer and reports its blocks, which
vLLM then recomputes (overwriting the layers already written); the fault is counted by kind (stats.FAULTS).

A load under a deadline (job.deadline) goes chunk by chunk instead, every layer of a chunk at once, and plans
again before each chunk (deadline.py): the chunk from any level of the prefix, or the rest of the load given back
to vLLM, whose blocks it recomputes. Its layers are all released when the load ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FetchTimeout
from dataclasses import dataclass, field

import torch

from ...container import format, identity, kvfile
from ...container.level import QUALITY_RANK
from ...errors import FormatError, InputError, ModelMismatchError, StorageError
from ...reuse import controller
from ...storage.remote import HEAD_PREFETCH
from ...storage.store import DirStore, StoredSource
from . import deadline as plans
from . import paged
from .stats import Stats

log = logging.getLogger("kvcli.vllm")


class OtherModel(ModelMismatchError):
    """The file was made by another model (its identity differs), as opposed to shapes that do not fit."""


@dataclass(frozen=True)
class DeadlineSpec:
    """What the scheduler passes a load under a deadline."""

    deadline_at: float  # time.time() by which the first token is due
    prompt_tokens: int  # vLLM computes the tokens after the load's, up to these
    levels: tuple  # deadline.Level of every usable file of the prefix, best first
    claimed: str  # the level the scheduler chose (the job's file_key)
    latency_s: float  # the scheduler's lookup's time: the link's latency at most


@dataclass
class LoadJob:
    """Tokens [start, end) of a request, from the stored file `file_key`, into its blocks."""

    req_id: str
    file_key: str
    token_ids: list[int]  # the prompt's first `end` tokens: what the file must hold
    start: int
    end: int
    block_ids: list[int]
    layers: int
    events: list[threading.Event] = field(init=False)  # per layer: written (or never will be)
    done: threading.Event = field(default_factory=threading.Event, init=False)  # settled and counted
    fault: str | None = None
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    deadline: DeadlineSpec | None = None
    given_back: int | None = None  # a deadline load gave tokens [given_back, end) back to vLLM

    def __post_init__(self) -> None:
        self.events = [threading.Event() for _ in range(self.layers)]

    def blocks(self, block_size: int, start: int | None = None) -> set[int]:
        """The blocks the load writes from token `start` (its own start by default): vLLM recomputes them if it
        fails."""
        start = self.start if start is None else start
        return set(self.block_ids[start // block_size: -(-self.end // block_size)])

    def recompute_blocks(self, block_size: int) -> set[int]:
        """The blocks vLLM must compute after all: every one of a failed load, those given back by a deadline load."""
        if self.fault:
            return self.blocks(block_size)
        return self.blocks(block_size, self.given_back) if self.given_back is not None else set()

    def wait(self, layer: int, deadline: float) -> bool:
        return self.events[layer].wait(max(0.0, deadline - time.monotonic()))


class PagedTarget:
    """The worker's paged KV layers, in model order, and how its backend lays them out."""

    def __init__(self, layers: list[torch.Tensor], layout: str, block_size: int, kv_heads: int, key_dim: int,
                 value_dim: int, dtype: torch.dtype):
        for layer in layers:
            paged.check_shape(layer, kv_heads, key_dim, value_dim)
        self.layers, self.layout, self.block_size = layers, layout, block_size
        self.kv_heads, self.key_dim, self.value_dim, self.dtype = kv_heads, key_dim, value_dim, dtype

    def where(self, block_ids: list[int], start: int, end: int):
        return paged.slots(block_ids, self.block_size, start, end, self.layers[0].shape[2])


class Loader:
    def __init__(self, store, model_identity: dict, target: PagedTarget, stats: Stats, max_loads: int,
                 timeout_s: float, open_cache=None, backend: str = "torch", speeds: "plans.EngineSpeeds | None" = None):
        self.store, self.identity, self.target, self.stats = store, model_identity, target, stats
        self.timeout_s, self.backend = timeout_s, backend  # "triton": decoded on the paged tensors' device
        self.open_cache = open_cache or store.open
        self.speeds = speeds  # this engine's measured speeds, for loads under a deadline
        self._pool = ThreadPoolExecutor(max_workers=max_loads, thread_name_prefix="kvcli-load")
        # A deadline load's chunk reads, apart so that one given up on (a stalled store) does not hold a load thread.
        self._fetches = ThreadPoolExecutor(max_workers=2 * max_loads, thread_name_prefix="kvcli-fetch")
        self._warned = False

    def start(self, job: LoadJob) -> None:
        self._pool.submit(self._run, job)

    def wait_layer(self, job: LoadJob, layer: int, deadline: float) -> None:
        if not job.wait(layer, deadline):
            self._give_up(job, f"layer {layer} of {job.file_key} was not loaded within {self.timeout_s:g} s")

    def finish(self, job: LoadJob, deadline: float) -> None:
        """Wait for the load to settle (the model may not have asked for every layer), giving up at the deadline."""
        if not job.done.wait(max(0.0, deadline - time.monotonic())):
            self._give_up(job, f"{job.file_key} was not loaded within {self.timeout_s:g} s")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._fetches.shutdown(wait=False, cancel_futures=True)

    def _give_up(self, job: LoadJob, message: str) -> None:
        with job.lock:  # after this no layer is written: the blocks are vLLM's to recompute
            if job.cancelled or job.fault:
                return
            job.cancelled = True
            job.fault = "timeout"
        self.stats.fault("timeout", message)

    def _run(self, job: LoadJob) -> None:
        try:
            if job.deadline is not None:
                DeadlineLoad(self, job).run()
            else:
                self._load(job)
            self.stats.add("loads")
            self.stats.add("loaded_tokens", (job.end if job.given_back is None else job.given_back) - job.start)
        except Exception as err:
            kind = classify(err)
            with job.lock:
                first = not job.cancelled and job.fault is None
                job.fault = job.fault or kind
                job.cancelled = True
            if first:
                self.stats.fault(kind, f"cannot load {job.file_key} for request {job.req_id}: {err}")
        finally:
            for event in job.events:
                event.set()
            job.done.set()

    def _load(self, job: LoadJob) -> None:
        src = self.open_cache(job.file_key)
        try:
            header = format.read_header(src)
            self._check(header, job)
            reader = kvfile.PrefixReader(src, header, job.end, self.backend)  # one read of the segments it needs
            where = self.target.where(job.block_ids, job.start, job.end)
            device = self.target.layers[0].device if self.backend == "triton" else "cpu"
            for layer in range(job.layers):
                keys, values = reader.layer(layer, device)
                with job.lock:
                    if job.cancelled:
                        return
                    paged.write_tokens(self.target.layers[layer], self.target.layout, where,
                                       keys[:, job.start:job.end], values[:, job.start:job.end])
                job.events[layer].set()
        finally:
            src.close()

    def _check(self, header: format.Header, job: LoadJob, name: str | None = None) -> None:
        name = name or job.file_key
        why = identity.describe_mismatch(header.model, self.identity)
        if why:
            raise OtherModel(f"{name}: made by a different model: {why}")
        if header.token_ids[:job.end] != job.token_ids[:job.end] or header.num_tokens < job.end:
            raise FormatError(f"{name}: the file does not hold the prompt's first {job.end} tokens")
        if len(header.layers) != job.layers:
            raise ModelMismatchError(f"{name}: {len(header.layers)} layers, the engine has {job.layers}")
        t = self.target
        for i, shape in enumerate(header.layers):
            if (shape.kv_heads, shape.key_dim, shape.value_dim, shape.token_start) != (t.kv_heads, t.key_dim, t.value_dim, 0):
                raise ModelMismatchError(
                    f"{name}: layer {i} holds (kv_heads, key_dim, value_dim, first token) = "
                    f"{(shape.kv_heads, shape.key_dim, shape.value_dim, shape.token_start)}, the engine keeps "
                    f"{(t.kv_heads, t.key_dim, t.value_dim, 0)}")


def classify(err: BaseException) -> str:
    """The fault kind of a failed load (stats.FAULTS)."""
    if isinstance(err, OtherModel):
        return "model_mismatch"
    if isinstance(err, ModelMismatchError):
        return "shape_mismatch"
    if isinstance(err, FormatError):  # VersionError included
        return "corrupt"
    # InputError: the file the index named is gone from the store
    if isinstance(err, (StorageError, InputError, OSError, ConnectionError, TimeoutError)):
        return "store_unavailable"
    return "internal"


class DeadlineLoad:
    """One load under a deadline: chunk by chunk, each from the level planned for it just before, or the rest given
    back to vLLM where that is sooner than loading it (deadline.replan); a chunk read that outlasts the moment at
    which giving the rest back still meets the deadline is given up on (a stalled store), and the rest given back.
    The throughput is the probe's (the claimed level's header read) or the store's remembered one, then that of the
    last chunk reads; what the load measures is kept for the next one."""

    def __init__(self, loader: Loader, job: LoadJob):
        if loader.speeds is None:
            raise RuntimeError("a load under a deadline needs the engine's speeds")
        self.loader, self.job, self.spec = loader, job, job.deadline
        t = loader.target
        self.elements_per_token = len(t.layers) * t.kv_heads * (t.key_dim + t.value_dim)
        self.costs = plans.link_costs(loader.store.url, self.spec.latency_s, loader.speeds.snapshot(),
                                      self.elements_per_token)
        self.levels = {level.quality: level for level in self.spec.levels}
        self.order = [level.quality for level in self.spec.levels]
        self.opened: dict[str, kvfile.LevelDecoder] = {}
        self.samples: deque[tuple[int, float]] = deque(maxlen=controller.WINDOW)
        self.unmeasured = False  # no throughput known for this link yet: the first chunk measures it

    def run(self) -> None:
        job, spec, stats = self.job, self.spec, self.loader.stats
        began = time.perf_counter()
        try:
            decoder, probe = self.open(spec.claimed)
            self.opened[spec.claimed] = decoder
            self.estimate(*probe)
            header = decoder.header
            size = header.chunk_tokens
            bounds = plans.chunks_of(job.start, job.end, size)
            keys, values = self.allocate(header, -(-job.end // size) * size)
            stats.add("deadline_loads")
            for k, (lo, hi) in enumerate(bounds):
                if job.cancelled:  # the load's own timeout: vLLM recomputes every block
                    return
                budget = spec.deadline_at - time.time() - self.costs.compute_s(spec.prompt_tokens - job.end)
                give_back_s = self.costs.compute_s(spec.prompt_tokens - lo)
                rest = {q: self.rest_s(q, bounds[k:], size) for q in self.order}
                choice, meets = plans.replan(rest, give_back_s, budget, self.order)
                if k == 0 and self.unmeasured and choice != plans.GIVE_BACK:
                    choice = self.order[-1]  # the cheapest read that measures the link, and serves a chunk
                if k == 0:  # the first plan's time for the load (none for a load given back whole)
                    stats.add("deadline_predicted_ms", round(1000 * (time.perf_counter() - began + rest.get(choice, 0))))
                if not meets:
                    self.warn_once(f"a load of {job.file_key} cannot meet its deadline; taking the fastest path")
                if choice == plans.GIVE_BACK or not self.load_chunk(choice, lo // size, lo, hi, budget, give_back_s,
                                                                    keys, values):
                    job.given_back = lo
                    stats.add("deadline_chunks_given_back", len(bounds) - k)
                    return
        finally:
            for decoder in self.opened.values():
                decoder.src.close()
            if self.samples:
                controller.keep_link(self.loader.store.url, self.bytes_per_s())
            self.loader.speeds.keep()
            stats.add("deadline_actual_ms", round(1000 * (time.perf_counter() - began)))

    def open(self, quality: str) -> tuple[kvfile.LevelDecoder, tuple]:
        """The level's header read, checked, and its decoder built; and where the file is read over the link, the
        bytes and seconds of the header's read (the probe) and the seconds of opening it, a size request that
        moves no data (the latency), else Nones."""
        level = self.levels[quality]
        t0 = time.perf_counter()
        src = self.loader.open_cache(level.file_key)
        t1 = time.perf_counter()
        try:
            header = format.read_header(src)
            self.loader._check(header, self.job, level.file_key)
            for other in self.opened.values():
                if (other.header.dtype, other.header.chunk_tokens) != (header.dtype, header.chunk_tokens):
                    raise FormatError(f"{level.file_key}: cannot be mixed with {other.name}: its dtype or chunking "
                                      "differs")
            decoder = kvfile.LevelDecoder(src, header)
        except BaseException:
            src.close()
            raise
        if isinstance(src, StoredSource):
            return decoder, (min(src.size, HEAD_PREFETCH), time.perf_counter() - t1, t1 - t0)
        return decoder, (None, None, None)

    def estimate(self, nbytes: int | None, seconds: float | None, request_s: float | None) -> None:
        """The latency (this load's size request, which moves no data) and the first throughput: the assumed one
        (the store's remembered throughput, or a fast link) unless the probe (the header's read) took over STALE
        times what it predicts plus 0.25 s, or under 1/STALE of what the remembered one predicts. The probe's prediction is made with the slower of the size
        request and the scheduler's lookup: on loopback either varies by tens of milliseconds, as much as a 64 KiB
        read takes, and such a read says nothing of a fast link. Where nothing is remembered either (a remote
        store's first load), the link is unmeasured: the first chunk comes from the lowest level, and its read
        measures the link for the rest."""
        if nbytes is None:
            return
        costs = self.costs
        costs.latency_s = min(request_s, seconds)
        remembered = bool(controller.recall_link(self.loader.store.url))
        slowest = max(request_s, self.spec.latency_s) + nbytes / costs.bytes_per_s
        faster = remembered and seconds * controller.STALE < costs.latency_s + nbytes / costs.bytes_per_s
        # A busy machine pauses a read by tens of milliseconds: a slower link shows only beyond that.
        if seconds > controller.STALE * slowest + controller.STALL_FLOOR_S or faster:
            costs.bytes_per_s = nbytes / max(seconds - costs.latency_s, 0.1 * seconds, 1e-6)
        else:
            self.unmeasured = not remembered and not isinstance(self.loader.store, DirStore)

    def bytes_per_s(self) -> float:
        moving = sum(max(s - self.costs.latency_s, 0.1 * s) for _, s in self.samples)
        return sum(b for b, _ in self.samples) / max(moving, 1e-6)

    def rest_s(self, quality: str, bounds: list[tuple[int, int]], size: int) -> float:
        """Predicted seconds to load these chunks from the level: from its header where it is open, else from the
        index's figures, with the header's read."""
        decoder = self.opened.get(quality)
        if decoder is None:
            return self.costs.load_s(self.levels[quality], bounds[0][0], bounds[-1][1])
        return sum(self.costs.fetch_s(quality, decoder.spans[lo // size][1], self.chunk_tokens(decoder, lo // size))
                   for lo, _ in bounds)

    @staticmethod
    def chunk_tokens(decoder: kvfile.LevelDecoder, chunk: int) -> int:
        size = decoder.header.chunk_tokens
        return min(size, decoder.header.num_tokens - chunk * size)

    def allocate(self, header: format.Header, tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values per layer for the chunks decoded, at their places in the file (LevelDecoder writes
        there); as long as the longest level's last chunk that the load needs."""
        cover = min(tokens, max(level.file_tokens for level in self.spec.levels))
        dtype = kvfile.format_dtype(header.dtype)
        return ([torch.empty((s.kv_heads, cover, s.key_dim), dtype=dtype) for s in header.layers],
                [torch.empty((s.kv_heads, cover, s.value_dim), dtype=dtype) for s in header.layers])

    def load_chunk(self, quality: str, chunk: int, lo: int, hi: int, budget: float, give_back_s: float, keys,
                   values) -> bool:
        """Tokens [lo, hi) of `chunk` from the level into the blocks; False where its read stalled."""
        job, stats = self.job, self.loader.stats
        level = self.levels[quality]
        span = level.bytes_of(lo, hi) if quality not in self.opened else self.opened[quality].spans[chunk][1]
        predicted = self.costs.latency_s + span / self.costs.bytes_per_s
        # Given up at the last moment at which giving the rest back still meets the deadline; where it cannot, once
        # the read has taken as long as that would. Never before twice the prediction (a busy machine pauses).
        wait = budget - give_back_s if budget > give_back_s else give_back_s
        wait = min(max(wait, 2 * predicted + controller.STALL_FLOOR_S), controller.STALL_CAP_S)
        t0 = time.perf_counter()
        try:
            if quality not in self.opened:  # a level's header read stalls as a chunk's does
                self.opened[quality] = self.loader._fetches.submit(self.open, quality).result(timeout=wait)[0]
            decoder = self.opened[quality]
            offset, length = decoder.spans[chunk]
            read_at = time.perf_counter()
            future = self.loader._fetches.submit(decoder.src.read, offset, length)
            data = future.result(timeout=max(wait - (read_at - t0), 0.0))
        except FetchTimeout:
            stats.add("deadline_stalls")
            return False
        seconds = time.perf_counter() - read_at
        if isinstance(decoder.src, StoredSource) and offset + length > min(decoder.src.size, HEAD_PREFETCH):
            self.samples.append((length, seconds))
            self.costs.bytes_per_s = self.bytes_per_s()
        t1 = time.perf_counter()
        decoder.decode_chunk(chunk, decoder.split(chunk, data), keys, values)
        elements = self.chunk_tokens(decoder, chunk) * self.elements_per_token
        if elements:
            self.loader.speeds.measure(f"decode_s_per_element.{quality}", (time.perf_counter() - t1) / elements)
        where = self.loader.target.where(job.block_ids, lo, hi)
        with job.lock:
            if job.cancelled:
                return True  # the load's own timeout came first: nothing more is written, every block recomputed
            for layer, kv_layer in enumerate(self.loader.target.layers):
                paged.write_tokens(kv_layer, self.loader.target.layout, where, keys[layer][:, lo:hi],
                                   values[layer][:, lo:hi])
        stats.add(f"deadline_chunks_{quality}")
        if QUALITY_RANK[quality] < QUALITY_RANK[self.spec.claimed]:
            stats.add("deadline_chunks_degraded")
        return True

    def warn_once(self, message: str) -> None:
        if not self.loader._warned:
            self.loader._warned = True
            log.warning("kvcli connector: %s", message)
