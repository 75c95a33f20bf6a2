"""Loading a stored prefix into vLLM's paged KV tensors, layer by layer, on a background thread: layer l+1 is read
and decoded while the model computes layer l, and each layer is written straight into the request's blocks.

The model identity, the layer shapes and the tokens (the file must hold exactly the prompt's first tokens) are
checked before anything is written, and each segment's CRC before its layer is. A load that fails at any point
(a damaged segment in a late layer, a store that goes down) writes no further layer and reports its blocks, which
vLLM then recomputes (overwriting the layers already written); the fault is counted by kind (stats.FAULTS).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ...container import format, identity, kvfile
from ...errors import FormatError, InputError, ModelMismatchError, StorageError
from . import paged
from .stats import Stats


class OtherModel(ModelMismatchError):
    """The file was made by another model (its identity differs), as opposed to shapes that do not fit."""


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

    def __post_init__(self) -> None:
        self.events = [threading.Event() for _ in range(self.layers)]

    def blocks(self, block_size: int) -> set[int]:
        """The blocks the load writes: vLLM recomputes them if it fails."""
        return set(self.block_ids[self.start // block_size: -(-self.end // block_size)])

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
                 timeout_s: float, open_cache=None, backend: str = "torch"):
        self.store, self.identity, self.target, self.stats = store, model_identity, target, stats
        self.timeout_s, self.backend = timeout_s, backend  # "triton": decoded on the paged tensors' device
        self.open_cache = open_cache or store.open
        self._pool = ThreadPoolExecutor(max_workers=max_loads, thread_name_prefix="kvcli-load")

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

    def _give_up(self, job: LoadJob, message: str) -> None:
        with job.lock:  # after this no layer is written: the blocks are vLLM's to recompute
            if job.cancelled or job.fault:
                return
            job.cancelled = True
            job.fault = "timeout"
        self.stats.fault("timeout", message)

    def _run(self, job: LoadJob) -> None:
        try:
            self._load(job)
            self.stats.add("loads")
            self.stats.add("loaded_tokens", job.end - job.start)
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

    def _check(self, header: format.Header, job: LoadJob) -> None:
        name = job.file_key
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
