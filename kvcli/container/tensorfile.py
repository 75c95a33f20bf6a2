"""safetensors import and export of decoded caches (never pickle).

The export's safetensors metadata carries the cache's provenance (key `kvcli.provenance`, a JSON object with
`created_at` and `source`), so `decode` then `encode` gives back the same header."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FormatError, InputError
from . import format

PROVENANCE_KEY = "kvcli.provenance"


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
    """One metadata entry: safetensors stores metadata in a hash map whose order varies between runs, and one key
    keeps the export's bytes reproducible."""
    fields = {k: provenance[k] for k in ("created_at", "source") if provenance.get(k)}
    return {PROVENANCE_KEY: json.dumps(fields, sort_keys=True, separators=(",", ":"))} if fields else {}


def provenance_from_metadata(meta: dict, where: str) -> dict:
    if PROVENANCE_KEY not in meta:
        return {}
    doc = format.parse_json(str(meta[PROVENANCE_KEY]).encode(), f"{where}: metadata {PROVENANCE_KEY}")
    created_at, source = (doc.get("created_at"), doc.get("source")) if isinstance(doc, dict) else (None, None)
    if created_at is not None and not (isinstance(created_at, str) and format.TIMESTAMP.fullmatch(created_at)):
        raise FormatError(f"{where}: metadata {PROVENANCE_KEY}: created_at is malformed")
    if source is not None and not (isinstance(source, dict) and format.HEX64.fullmatch(str(source.get("sha256")))
                                   and isinstance(source.get("bytes"), int) and source["bytes"] >= 0):
        raise FormatError(f"{where}: metadata {PROVENANCE_KEY}: source is malformed")
    return {k: v for k, v in (("created_at", created_at), ("source", source)) if v is not None}


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
