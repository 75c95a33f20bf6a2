"""Model identity: the facts a cache must share with the model that reads it.

A cache is only valid for the exact model that produced it. The identity recorded in a .kvc header is the
architecture plus three digests (docs/format.md, "Model identity"):

- config digest: SHA-256 of the canonical JSON of the model config, less fields that do not change the
  computation (versions, paths, the load dtype, the quantization wrapper of a GGUF source);
- weights digest: SHA-256 over a fixed sample of the weight files' bytes (sampled_file_digest), so a 16 GB
  checkpoint costs a few megabytes of reads, while any fine-tune, which rewrites nearly every tensor, changes it;
- tokenizer digest: SHA-256 of the tokenizer's full serialized definition (vocabulary, merges, normalizer,
  pre-tokenizer and post-processor, which decides whether a BOS token is added).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Fields of a transformers config that describe how it was saved or loaded, not what the model computes.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "use_cache",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

HEAD_BYTES = 1 << 20
SAMPLE_BLOCKS = 1024
BLOCK_BYTES = 4096


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_digest(config_dict: dict) -> str:
    clean = {k: v for k, v in config_dict.items() if k not in VOLATILE_CONFIG_KEYS}
    return sha256_hex(json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str).encode())


def sampled_file_digest(paths: list[Path]) -> str:
    """SHA-256 over each file's name, size, first MiB and 1,024 evenly spaced 4 KiB blocks.

    The first MiB holds the safetensors or GGUF header (names, shapes, dtypes, offsets). The blocks land in
    tensor data all over the file, so a change that touches more than about 1/1024 of the bytes is seen
    with near certainty. Reads are bounded (about 5 MiB per file), whatever the checkpoint's size.
    """
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        size = path.stat().st_size
        h.update(path.name.encode() + b"\0" + size.to_bytes(8, "little"))
        with open(path, "rb") as fh:
            h.update(fh.read(HEAD_BYTES))
            span = size - HEAD_BYTES - BLOCK_BYTES
            if span <= 0:
                h.update(fh.read())
                continue
            for i in range(SAMPLE_BLOCKS):
                fh.seek(HEAD_BYTES + span * i // (SAMPLE_BLOCKS - 1))
                h.update(fh.read(BLOCK_BYTES))
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return sha256_hex(backend.to_str().encode())
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return sha256_hex(vocab.encode() + type(tokenizer).__name__.encode())


def weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    return files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def describe_mismatch(cache_model: dict, model: dict) -> str | None:
    """The first identity field that differs, phrased for an error message; None when they match."""
    if cache_model.get("architecture") != model.get("architecture"):
        return f"architecture {cache_model.get('architecture')} != {model.get('architecture')}"
    for field, label in (("config_digest", "config"), ("weights_digest", "weights"), ("tokenizer_digest", "tokenizer")):
        if cache_model.get(field) != model.get(field):
            return f"{label} differ ({cache_model.get(field, '?')[:12]} in the cache, {model.get(field, '?')[:12]} loaded)"
    return None


def cache_root() -> Path:
    """Where kvcli keeps converted models and profiles: $KVCLI_CACHE_DIR, else $XDG_CACHE_HOME/kvcli."""
    explicit = os.environ.get("KVCLI_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvcli"
