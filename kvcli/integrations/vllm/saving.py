"""Saving a prefix vLLM computed: a copy taken during the forward step, then encoded and written by one background
thread, so the step waits for nothing but the copy.

With several levels (`quality: "high,balanced,small"`), the one copy is encoded once per level, each level its own
content-addressed file with its own index entries. The queue is bounded in prefixes (copies), not files: when it is
full, the save is skipped and counted (the prefix is simply not stored, a later request computes and offers it
again). A level whose key is already in the store is not encoded again.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from ...codecs.base import Codec
from ...codecs.presets import PRESET_CODECS, make_codec
from ...container import format, keys, kvfile
from ...modeling.kvcache import KVCache
from .stats import Stats


@dataclass
class SaveJob:
    token_ids: list[int]
    keys: list[torch.Tensor]  # per layer (kv_heads, tokens, key_dim), on the CPU
    values: list[torch.Tensor]


def rope_inv_freq(config: dict, layers: int):
    """The rotate-half RoPE frequencies of a plain (unscaled) rotary config, one array per layer; None otherwise.
    The lossy codec only uses them to compress keys better: a missing frequency costs size, never correctness."""
    import numpy as np

    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", config.get("rope_theta"))
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    if rope_type != "default" or not theta or not head_dim or config.get("partial_rotary_factor", 1.0) != 1.0:
        return None
    freq = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return [freq.numpy().astype(np.float32) for _ in range(layers)]


def save_codec(quality: str, model_identity: dict, config: dict, layers: int) -> Codec:
    """The preset's codec for this model: its calibration profile if kvcli has one (none is measured inside vLLM:
    `kvcli calibrate --model DIR` once does it), and its rotary frequencies."""
    from ...calibration import profiles

    if PRESET_CODECS[quality].lossless:
        return make_codec(quality)
    return make_codec(quality, profiles.find(model_identity), rope_inv_freq(config, layers))


class Saver:
    """codecs: {quality: codec} of every level saved, in the order they are encoded."""

    def __init__(self, store, codecs: dict[str, Codec], model_identity: dict, dtype: str, stats: Stats,
                 max_pending: int, chunk_tokens: int = kvfile.DEFAULT_CHUNK_TOKENS, settled=None):
        if not codecs:
            raise ValueError("a saver needs at least one level")
        self.store, self.codecs, self.identity, self.dtype = store, dict(codecs), model_identity, dtype
        self.stats, self.chunk_tokens = stats, chunk_tokens
        # called after each save settles: an idle engine takes no more steps, so nothing else would publish it
        self.settled = settled or (lambda: None)
        self._carried: set[str] = set()  # dictionaries put in the store by this saver
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="kvcli-saver", daemon=True)
        self._thread.start()

    def key_of(self, token_ids: list[int], quality: str) -> str:
        codec = self.codecs[quality]
        return keys.derive_key(self.identity, self.dtype, {"name": codec.name, "params": codec.params()}, token_ids)

    def submit(self, job: SaveJob) -> bool:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.add("saves_skipped_queue_full")
            return False
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Finish the queued saves (within `timeout`), then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self.save(job)
            except Exception as err:  # a failed save is a missing cache later, never the engine's failure
                self.stats.add("save_failures")
                self.stats.fault("save", f"a save of {len(job.token_ids)} tokens failed: {type(err).__name__}: {err}")
            self.settled()

    def save(self, job: SaveJob) -> dict[str, str]:
        """Every level of the prefix stored: {quality: key}. Counted per prefix (`saves`, or `saves_already_stored`
        when every level was there) and per file (`saved_files_QUALITY`, `saved_bytes`)."""
        kv = KVCache(list(job.token_ids), job.keys, job.values)
        stored, written = {}, 0
        for quality, codec in self.codecs.items():
            key = stored[quality] = self.key_of(job.token_ids, quality)
            if self.store.exists(key):
                continue
            meta, parts = kvfile.encode(kv, self.identity, codec, self.chunk_tokens, {"created_at": _now()})
            data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
            self._carry_dictionary(codec)
            self.store.put(key, data)
            written += 1
            self.stats.add(f"saved_files_{quality}")
            self.stats.add("saved_bytes", len(data))
        if written:
            self.stats.add("saves")
            self.stats.add("saved_tokens", len(job.token_ids))
        else:
            self.stats.add("saves_already_stored")
        return stored


    def _carry_dictionary(self, codec: Codec) -> None:
        """The dictionary a level's files name, put in the store before its first file (once per saver)."""
        sha = getattr(codec, "dictionary", None)
        if sha is None or sha in self._carried:
            return
        from ...reuse.pipeline import codec_dictionary

        self.store.put_dictionary(codec_dictionary(codec))
        self._carried.add(sha)


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
