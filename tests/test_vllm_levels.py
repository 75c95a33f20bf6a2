"""The connector's several levels, without vLLM: `quality: "high,balanced,small"` checked at engine start, and one
copy of a prefix saved as one file per level (each content-addressed, each in the prefix index), idempotent by key
per level."""

from __future__ import annotations

import pytest

from kvcli.codecs.presets import make_codec
from kvcli.container import format
from kvcli.integrations.vllm.saving import Saver, SaveJob
from kvcli.integrations.vllm.settings import Settings
from kvcli.integrations.vllm.stats import Stats
from kvcli.container.level import quality_of
from kvcli.storage.store import DirStore
from servers import MODEL
from test_vllm_transfer import random_cache

LEVELS = ("high", "balanced", "small")


@pytest.mark.parametrize("quality", ["high,bogus", "high,high", "none,small", "", "high,", 3])
def test_a_bad_list_of_levels_stops_the_engine_at_start(quality):
    with pytest.raises(ValueError, match="quality must be none, or one or more of"):
        Settings.from_extra({"store": "/x", "quality": quality})


def test_a_list_of_levels_is_read_in_order():
    assert Settings.from_extra({"store": "/x", "quality": "high, balanced,small"}).qualities == LEVELS
    assert Settings.from_extra({"store": "/x"}).qualities == ("balanced",)
    assert Settings.from_extra({"store": "/x", "quality": "none"}).qualities == ()


def test_one_copy_is_saved_as_one_file_per_level_each_indexed_once(tmp_path):
    store, stats = DirStore(tmp_path, create=True), Stats()
    saver = Saver(store, {q: make_codec(q) for q in LEVELS}, MODEL, "float32", stats, max_pending=2)
    kv = random_cache(tokens=600, seed=7)
    job = SaveJob(kv.token_ids, kv.keys, kv.values)
    stored = saver.save(job)
    assert list(stored) == list(LEVELS) and len(set(stored.values())) == 3
    for quality, key in stored.items():  # each level its own file, written at its preset
        src = format.open_source(store.path_of(key))
        assert quality_of(format.read_header(src).codec) == quality
        src.close()
    hits = store.prefix_hits(MODEL, "float32", kv.token_ids + [1])
    assert sorted((h.quality, h.file_key, h.tokens) for h in hits) == sorted((q, k, 512) for q, k in stored.items())
    counts = stats.snapshot()
    assert counts["saves"] == 1 and counts["saved_tokens"] == 600
    assert {q: counts[f"saved_files_{q}"] for q in LEVELS} == dict.fromkeys(LEVELS, 1)
    assert counts["saved_bytes"] == sum(store.size(k) for k in stored.values())
    # idempotent per level: saved again, nothing is encoded; with one level gone, only it is encoded again
    assert saver.save(job) == stored and stats.snapshot()["saves_already_stored"] == 1
    store.delete(stored["balanced"])
    assert saver.save(job) == stored and store.exists(stored["balanced"])
    counts = stats.snapshot()
    assert counts["saves"] == 2 and counts["saved_files_balanced"] == 2 and counts["saved_files_high"] == 1
