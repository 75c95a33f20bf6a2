"""safetensors import and export of decoded caches (never pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import format
from .errors import FormatError, InputError


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return load(p.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise FormatError(f"{path}: not a valid safetensors file: {err}") from None


def save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    format.atomic_write(path, [save(tensors)])
