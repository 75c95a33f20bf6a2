"""Loads under a time-to-first-token deadline (`deadline` in kv_connector_extra_config; docs/vllm.md, "Deadline").

The scheduler claims, per request, a level (one of the stored files that hold the prompt's prefix, at `min_quality`
or better) and the tokens to load, from the time left until the deadline (counted from when it first saw the
request), the remembered throughput to the store (reuse/controller.py's link memory), this engine's decode and
prefill speeds, and the tokens vLLM computes after the load. The worker loads chunk by chunk and plans again
before every chunk from what its own reads measure: the rest from another level, or the remaining blocks given
back to vLLM to recompute (CacheGen's text fallback).

The cost model (the same on both sides): a level's load is one request per chunk (latency plus bytes over the
throughput) plus the chunk's decode; opening a level not opened yet costs one more request of its header; vLLM
computes the tokens not loaded at the prefill rate. Blocks given back are computed in a second step, after the
first one, whose tail tokens vLLM computes either way: giving back the rest costs the prefill of the prompt from
the first given-back token, loading it costs its fetches and decodes.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ...container.identity import read_safetensors_header, weight_files
from ...container.keys import CHUNK_TOKENS
from ...reuse import controller
from ...container.level import QUALITY_RANK
from ...reuse.controller import Speeds
from ...storage.remote import HEAD_PREFETCH

GIVE_BACK = "give_back"  # the worker's choice for the rest of a load: vLLM recomputes its blocks
STEP_TOKENS = 64  # a step that computes at least this many prompt tokens measures the prefill rate
# A store read by the scheduler's lookup alone before any load measured it: the worker plans again from its first
# read, so the first claim assumes a fast link (a directory store reads at disk speed).
UNMEASURED_BYTES_PER_S = 1e9


@dataclass(frozen=True)
class Level:
    """A stored file that holds the prompt's prefix, as the index reported it."""

    quality: str
    file_key: str
    bytes: int
    file_tokens: int

    @property
    def rank(self) -> int:
        return QUALITY_RANK[self.quality]

    def bytes_of(self, lo: int, hi: int) -> float:
        """The bytes of tokens [lo, hi), before the file's header is read: the file's share."""
        return self.bytes * (hi - lo) / max(self.file_tokens, 1)


def levels_of(hits, min_quality: str) -> list[Level]:
    """The levels a deadline load chooses among: one file per quality at min_quality or better, best first."""
    out: dict[str, Level] = {}
    for hit in hits:
        if QUALITY_RANK.get(hit.quality, -1) >= QUALITY_RANK[min_quality] and hit.quality not in out:
            out[hit.quality] = Level(hit.quality, hit.file_key, hit.bytes, hit.file_tokens)
    return sorted(out.values(), key=lambda lv: -lv.rank)


def chunks_of(start: int, end: int, size: int = CHUNK_TOKENS) -> list[tuple[int, int]]:
    """The file's chunks that hold tokens [start, end), cut to them."""
    return [(max(lo, start), min(lo + size, end)) for lo in range(start // size * size, end, size)]


@dataclass
class Costs:
    """What a load's time is predicted from: the link (measured by loads, remembered per store), this engine's
    speeds, and the K and V elements per token (all layers)."""

    bytes_per_s: float
    latency_s: float
    speeds: Speeds
    elements_per_token: int

    def compute_s(self, tokens: int) -> float:
        return max(tokens, 0) * self.speeds.prefill_s_per_token

    def decode_s(self, quality: str, tokens: int) -> float:
        return tokens * self.elements_per_token * self.speeds.get(f"decode_s_per_element.{quality}")

    def fetch_s(self, quality: str, nbytes: float, tokens: int, reads: int = 1) -> float:
        return reads * self.latency_s + nbytes / self.bytes_per_s + self.decode_s(quality, tokens)

    def open_s(self, level: Level) -> float:
        return self.latency_s + min(level.bytes, HEAD_PREFETCH) / self.bytes_per_s

    def load_s(self, level: Level, start: int, end: int) -> float:
        """Opening the level and loading tokens [start, end) from it, from the index's figures."""
        return self.open_s(level) + sum(self.fetch_s(level.quality, level.bytes_of(lo, hi), hi - lo)
                                        for lo, hi in chunks_of(start, end))


@dataclass(frozen=True)
class Claim:
    level: Level | None  # None: nothing claimed, vLLM computes the prompt (the text fallback)
    end: int  # the claim is tokens [start, end); start when nothing is claimed
    predicted_s: float  # to the end of the prompt's forward pass
    meets: bool


def choose(levels: list[Level], costs: Costs, prompt_tokens: int, start: int, end: int, left_s: float) -> Claim:
    """The scheduler's claim of tokens [start, end) (a prompt whose first `start` tokens vLLM holds): the best level
    whose load and vLLM's computing the tokens after it fit `left_s`. Nothing is claimed where computing the whole
    prompt is sooner than loading from any level: on a slow enough link the text is the fastest path (and exact).
    Where nothing fits, the fastest path. The cost of a load is linear in its tokens, so no shorter claim is sooner
    than both the whole one and none: a load is cut short only by the worker, from what it measures."""
    recompute = costs.compute_s(prompt_tokens - start)
    if end <= start or not levels:
        return Claim(None, start, recompute, recompute <= left_s)
    tail = costs.compute_s(prompt_tokens - end)
    loads = [(level, costs.load_s(level, start, end) + tail) for level in levels]
    if recompute < min(seconds for _, seconds in loads):
        return Claim(None, start, recompute, recompute <= left_s)
    for level, seconds in loads:
        if seconds <= left_s:
            return Claim(level, end, seconds, True)
    level, seconds = min(loads, key=lambda item: item[1])
    return Claim(level, end, seconds, False)


def claim(hits, store_url: str, latency_s: float, speeds: Speeds, elements_per_token: int, min_quality: str,
          prompt_tokens: int, start: int, end: int, left_s: float) -> Claim:
    """The scheduler's claim for a request whose lookup found `hits` (in latency_s): choose() over the levels at
    min_quality or better and the store's remembered throughput."""
    costs = link_costs(store_url, latency_s, speeds, elements_per_token)
    return choose(levels_of(hits, min_quality), costs, prompt_tokens, start, end, left_s)


def replan(rest: dict[str, float], give_back_s: float, budget_s: float, order: list[str]) -> tuple[str, bool]:
    """The worker's choice before a chunk: `rest` maps each usable level to its predicted time for this chunk and
    every later one, `give_back_s` is vLLM's recomputing them instead, `budget_s` the time they may take. Give the
    rest back where that is sooner than loading it from any level; else the best level (in `order`) that fits;
    else the fastest path. Returns the choice and whether it meets the deadline."""
    fastest = min(rest.values(), default=math.inf)
    if give_back_s < fastest:
        return GIVE_BACK, give_back_s <= budget_s
    for quality in order:
        if quality in rest and rest[quality] <= budget_s:
            return quality, True
    return min(rest, key=rest.get), False


# ---------------------------------------------------------------- this engine's speeds, kept between runs


def speeds_name(model_identity: dict, device: str, dtype: str) -> str:
    """vLLM's speeds are its own (its prefill is not kvcli's): kept apart from `generate --deadline`'s."""
    return f"vllm/{model_identity['weights_digest']}/{device}/{dtype}"


def recall_speeds(name: str, prefill_prior: float) -> Speeds:
    return Speeds.recall_as(name, prefill_prior)


def keep_speeds(name: str, speeds: Speeds) -> None:
    speeds.keep_as(name)


class EngineSpeeds:
    """This engine's speeds (vLLM's prefill per token, measured from its steps; kvcli's decode per element and level,
    measured by deadline loads), shared by one process's loads and steps, and kept on disk: the scheduler, which
    may run in another process, reads them there (current()), and so does the next engine."""

    def __init__(self, name: str, prefill_prior_s: float, keep_every_s: float = 1.0):
        self.name, self.prefill_prior_s, self.keep_every_s = name, prefill_prior_s, keep_every_s
        self._lock = threading.Lock()
        self._speeds = recall_speeds(name, prefill_prior_s)
        self._kept = 0.0

    def current(self) -> Speeds:
        """The speeds as last kept, by this process or another."""
        return recall_speeds(self.name, self.prefill_prior_s)

    def snapshot(self) -> Speeds:
        with self._lock:
            return Speeds(self.prefill_prior_s, measured=dict(self._speeds.measured))

    def measure(self, name: str, value: float) -> None:
        with self._lock:
            self._speeds.measure(name, value)

    def measure_step(self, seconds: float, tokens: int) -> None:
        """A forward step that computed `tokens` prompt tokens and loaded nothing: the prefill rate, kept at most
        once per keep_every_s (a step is tens of milliseconds, a write is not free)."""
        if tokens >= STEP_TOKENS and seconds > 0:
            self.measure("prefill_s_per_token", seconds / tokens)
            if time.monotonic() - self._kept >= self.keep_every_s:
                self.keep()

    def keep(self) -> None:
        with self._lock:
            measured = Speeds(self.prefill_prior_s, measured=dict(self._speeds.measured))
            self._kept = time.monotonic()
        keep_speeds(self.name, measured)


def prefill_prior(model_dir: str, config: dict, device: str) -> float:
    """Seconds per prompt token before vLLM's steps measured one: 2 FLOPs per parameter outside the embedding table
    (read from the safetensors headers) at the rate controller.Speeds assumes for the device."""
    params = 0
    for path in weight_files(Path(model_dir)):
        params += sum(math.prod(shape) for _, _, shape, _, _ in read_safetensors_header(path))
    params -= int(config.get("vocab_size") or 0) * int(config.get("hidden_size") or 0)
    rate = controller.ASSUMED_FLOPS.get(device, controller.ASSUMED_FLOPS["cpu"])
    return 2 * max(params, 1) / rate


def link_costs(store_url: str, latency_s: float, speeds: Speeds, elements_per_token: int) -> Costs:
    """Costs over the store's remembered throughput, or a fast link where no load has measured it yet."""
    remembered = controller.recall_link(store_url).get("bytes_per_s", UNMEASURED_BYTES_PER_S)
    return Costs(remembered, latency_s, speeds, elements_per_token)
