"""safetensors import and export of decoded caches (never pickle).

The export's safetensors metadata carries the cache's provenance (`kvcli.created_at`, `kvcli.source_sha256`,
`kvcli.source_bytes`), so `decode` then `encode` gives back the same header."""

from __future__ import annotations

from pathlib import Path

import torch

from . import format
from .errors import FormatError, InputError

METADATA_PREFIX = "kvcli."


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the provenance fields recorded in the file's metadata (empty when there are none)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path}: is a directory, expected a safetensors file")
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    data = p.read_bytes()
    try:
        return load(data), provenance_from_metadata(_metadata(data, path), path)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise FormatError(f"{path}: not a valid safetensors file: {err}") from None


def save_tensors(path: str, tensors: dict[str, torch.Tensor], provenance: dict | None = None) -> None:
    """Atomically to a file, or to stdout for `-`."""
    from safetensors.torch import save

    format.write_output(path, [save(tensors, metadata=metadata_from_provenance(provenance or {}))])


def metadata_from_provenance(provenance: dict) -> dict[str, str]:
    meta = {}
    if provenance.get("created_at"):
        meta[METADATA_PREFIX + "created_at"] = provenance["created_at"]
    if provenance.get("source"):
        meta[METADATA_PREFIX + "source_sha256"] = provenance["source"]["sha256"]
        meta[METADATA_PREFIX + "source_bytes"] = str(provenance["source"]["bytes"])
    return meta


def provenance_from_metadata(meta: dict, where: str) -> dict:
    out = {}
    if METADATA_PREFIX + "created_at" in meta:
        out["created_at"] = meta[METADATA_PREFIX + "created_at"]
    sha, size = meta.get(METADATA_PREFIX + "source_sha256"), meta.get(METADATA_PREFIX + "source_bytes")
    if sha is not None or size is not None:
        if not (isinstance(sha, str) and format.HEX64.match(sha) and isinstance(size, str) and size.isdigit()):
            raise FormatError(f"{where}: metadata kvcli.source_sha256 / kvcli.source_bytes are malformed")
        out["source"] = {"sha256": sha, "bytes": int(size)}
    if "created_at" in out and not format.TIMESTAMP.match(out["created_at"]):
        raise FormatError(f"{where}: metadata kvcli.created_at is malformed")
    return out


def _metadata(data: bytes, where: str) -> dict:
    """The `__metadata__` object of a safetensors file (8-byte LE header length, then a JSON header)."""
    if len(data) < 8:
        raise FormatError(f"{where}: not a valid safetensors file: shorter than 8 bytes")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise FormatError(f"{where}: not a valid safetensors file: header length {length} exceeds the file")
    header = format.parse_json(data[8 : 8 + length], f"{where}: safetensors header")
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if isinstance(meta, dict) else {}
