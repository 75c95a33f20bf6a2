"""Regenerate the golden kvq files: python tests/golden/make_golden_kvq.py

One file per lossy preset, from a deterministic synthetic cache shaped like a tiny model (3 layers, one of them
sliding-window, 2 KV heads, head_dim 8, RoPE on keys, 259 tokens in chunks of 64 so the last segment holds 3
tokens), with the things that stress a decoder: a 25-sigma outlier token, a constant channel, channels of very
different spread. The values come from integer arithmetic only, so every platform builds the same cache.
Run it only for a deliberate change of the kvq bitstream; tests/test_kvq_bitstream.py pins these bytes. The
version 2 files (`v2-tiny-kvq-*.kvc`, no token weights) were written by kvcli before version 3 and stay as they
are: readers must keep decoding them. `tiny-kvq-*.kvc` are version 3, `v4-tiny-kvq-*.kvc` the same caches in
version 4 (tables per class and token-exponent band): the encoder writes both. `xf-tiny-kvq-*.kvc` are version 4
with a per-head transform on every layer and kind but layer 1's K and layer 2's V, which stay without one; their
dictionary, `dicts/SHA.kvd` beside them (where a reader looks), holds Householder reflections built from the same
integer noise with float64 operations only (no library routine), so every platform builds the same one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from kvcli.codecs.kvq import TOKEN_EXPONENT_LIMIT, KvqCodec
from kvcli.codecs.presets import make_codec
from kvcli.codecs.transform import Transforms

from kvcli.container import dictionary, format, kvfile
from kvcli.modeling.kvcache import KVCache

HERE = Path(__file__).parent
IDENTITY = {"architecture": "LlamaForCausalLM", "name": "golden-kvq", "config_digest": "c" * 64,
            "weights_digest": "e" * 64, "tokenizer_digest": "f" * 64}
LAYERS, HEADS, DIM, TOKENS, WINDOW, CHUNK = 3, 2, 8, 259, 40, 64
PRESETS = {"high": ("float32", 4), "balanced": ("float16", 1), "small": ("bfloat16", 0)}  # dtype, sinks


def noise(seed: int, n: int) -> np.ndarray:
    """About standard normal (Irwin-Hall of 4 uniforms), from a 32-bit LCG: exact on every platform."""
    state = (seed * 2654435761 + 12345) % 2**32
    out = np.empty(4 * n, dtype=np.float64)
    for i in range(4 * n):
        state = (1664525 * state + 1013904223) % 2**32
        out[i] = state / 2**32
    return (out.reshape(n, 4).sum(axis=1) - 2.0) * np.sqrt(3.0)


def golden_cache(dtype: str) -> KVCache:
    keys, values = [], []
    for layer in range(LAYERS):
        held = TOKENS if layer != 1 else WINDOW - 1
        for kind, bucket in ((0, keys), (1, values)):
            x = noise(100 * layer + kind, HEADS * held * DIM).reshape(HEADS, held, DIM)
            x *= (2.0 ** np.arange(-3, DIM - 3))[None, None, :] / 4  # channels from 1/32 to 8
            x += np.arange(DIM)[None, None, :] - 3  # channel means
            x[0, :, 2] = 1.5  # a constant channel
            x[:, -1, :] += 25 * x.std(axis=1)  # the last token sits 25 sigma out
            bucket.append(torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype)))
    # Attention received (version 3's token weights): a few tokens take most, as in real prefills.
    attention = []
    for layer, k in enumerate(keys):
        a = 2.0 ** (3 * noise(900 + layer, HEADS * k.shape[1]).reshape(HEADS, k.shape[1]))
        attention.append(torch.from_numpy(a.astype(np.float32)))
    return KVCache(list(range(1000, 1000 + TOKENS)), keys, values, attention)


def inv_freq() -> list[np.ndarray]:
    return [(1.0 / 10000 ** (np.arange(0, DIM, 2) / DIM)).astype(np.float32) for _ in range(LAYERS)]


VERSIONS = {3: "tiny-kvq-{}.kvc", 4: "v4-tiny-kvq-{}.kvc"}
TRANSFORMED = "xf-tiny-kvq-{}.kvc"
PLAIN = {(1, 0), (2, 1)}  # (layer, kind) without a transform in the transformed files


def golden_transforms() -> Transforms:
    """Per (layer, kind, head) a Householder reflection I - 2 v v^T / (v . v), v from the integer noise: each
    element is a few correctly rounded float64 operations in a fixed order, the same on every platform."""
    bases = {}
    for layer in range(LAYERS):
        for kind in range(2):
            if (layer, kind) in PLAIN:
                continue
            heads = []
            for head in range(HEADS):
                v = noise(500 + 10 * layer + 2 * head + kind, DIM)
                norm = 0.0
                for x in v.tolist():
                    norm += x * x
                heads.append(np.eye(DIM) - np.outer(v, v) * (2.0 / norm))
            bases[(layer, kind)] = np.stack(heads)
    return Transforms.from_bases(bases)


def golden_dictionary() -> bytes:
    return dictionary.build(golden_transforms().pack(), IDENTITY)


def golden_bytes(preset: str, version: int, transformed: bool = False) -> bytes:
    dtype, sinks = PRESETS[preset]
    # Every token exponent the format allows, whatever cap the preset's encoder keeps (codecs/presets.py
    # TOKEN_COARSEST, a policy within the format): the golden files cover the whole range.
    codec = make_codec(preset, None, inv_freq(), 1.0, sinks, version, token_coarsest=TOKEN_EXPONENT_LIMIT)
    if transformed:
        data = golden_dictionary()
        codec = KvqCodec(codec.scale, codec.sinks, codec.profile, codec.inv_freq, codec.meta, codec.token_alpha, 4,
                         golden_transforms(), dictionary.sha_of(data))
    meta, parts = kvfile.encode(golden_cache(dtype), IDENTITY, codec, CHUNK)
    meta["created_by"] = "kvcli golden"  # independent of the package version
    meta["created_at"] = "2026-01-01T00:00:00Z"
    return format.build_header(meta, parts) + b"".join(p.data for p in parts)


def main() -> None:
    for preset in PRESETS:
        for version, name in VERSIONS.items():
            (HERE / name.format(preset)).write_bytes(golden_bytes(preset, version))
        (HERE / TRANSFORMED.format(preset)).write_bytes(golden_bytes(preset, 4, True))
    data = golden_dictionary()
    (HERE / dictionary.name_of(dictionary.sha_of(data))).parent.mkdir(exist_ok=True)
    (HERE / dictionary.name_of(dictionary.sha_of(data))).write_bytes(data)


if __name__ == "__main__":
    main()
