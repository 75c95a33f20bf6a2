"""Regenerate the golden .kvc files: python tests/golden/make_golden.py

Run it only for a deliberate format change; the tests pin these bytes so an accidental one fails.
"""

from __future__ import annotations

from pathlib import Path

import torch
from kvcli.codecs.lossless import ZstdCodec
from kvcli.codecs.raw import RawCodec

from kvcli.container import format, kvfile
from kvcli.modeling.kvcache import KVCache

HERE = Path(__file__).parent
IDENTITY = {
    "architecture": "LlamaForCausalLM",
    "name": "golden",
    "config_digest": "c" * 64,
    "weights_digest": "e" * 64,
    "tokenizer_digest": "f" * 64,
}
CHUNK = 3


def golden_cache() -> KVCache:
    """2 layers, 2 kv heads, 5 tokens, head_dim 4, float16; layer 1 holds a sliding window of 3 tokens."""
    base = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(2, 5, 4) / 7 - 3
    keys = [base.half(), (base[:, 2:] * 0.5).half()]
    values = [(-base).half(), (base[:, 2:] + 1).half()]
    return KVCache([11, 12, 13, 14, 15], keys, values)


def golden_bytes(codec) -> bytes:
    meta, parts = kvfile.encode(golden_cache(), IDENTITY, codec, CHUNK)
    meta["created_by"] = "kvcli golden"  # independent of the package version
    meta["created_at"] = "2026-01-01T00:00:00Z"
    return format.build_header(meta, parts) + b"".join(p.data for p in parts)


def main() -> None:
    (HERE / "tiny-raw.kvc").write_bytes(golden_bytes(RawCodec()))
    (HERE / "tiny-zstd.kvc").write_bytes(golden_bytes(ZstdCodec()))


if __name__ == "__main__":
    main()
