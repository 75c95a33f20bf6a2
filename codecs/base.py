"""The interface every codec implements: one segment (kv_heads, tokens, dim) at a time, in either direction."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import zstandard

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SegmentContext:
    kind: str  # "k" or "v"
    layer: int
    token_start: int  # absolute position of the segment's first token
    heads: int
    tokens: int
    dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.heads, self.tokens, self.dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]


class CodecError(ValueError):
    """A segment's bytes do not decode under its context; the caller names the segment."""


class Codec(ABC):
    name: ClassVar[str]
    lossless: ClassVar[bool]

    def params(self) -> dict:
        """What the header records so that a decoder can rebuild this codec exactly."""
        return {}

    def fit(self, keys: list[torch.Tensor], values: list[torch.Tensor], token_starts: list[int]) -> None:
        """Look at the whole cache before any segment is encoded (to fit shared tables). Default: nothing."""

    def aux(self) -> dict[str, bytes]:
        """Blobs shared by all segments (entropy tables, say), stored once per file."""
        return {}

    def load_aux(self, blobs: dict[str, bytes]) -> None:
        """Take the blobs aux() wrote, before any segment is decoded."""
        if blobs:
            raise CodecError(f"codec {self.name} takes no aux segments, found {sorted(blobs)}")

    @abstractmethod
    def encode(self, x: torch.Tensor, ctx: SegmentContext) -> bytes: ...

    @abstractmethod
    def decode(self, data: bytes, ctx: SegmentContext) -> torch.Tensor: ...


def tensor_bytes(x: torch.Tensor) -> np.ndarray:
    """The little-endian bytes of a contiguous tensor as a (elements, itemsize) uint8 array, without copying."""
    flat = x.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().reshape(flat.numel(), flat.element_size())


def tensor_from_bytes(raw: bytes | np.ndarray, ctx: SegmentContext) -> torch.Tensor:
    itemsize = torch.empty((), dtype=ctx.torch_dtype).element_size()
    expected = ctx.heads * ctx.tokens * ctx.dim * itemsize
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw.reshape(-1)
    if buf.size != expected:
        raise CodecError(f"decoded {buf.size} bytes, expected {expected}")
    return torch.from_numpy(buf.copy()).view(ctx.torch_dtype).reshape(ctx.shape)


def unzstd(data: bytes, limit: int) -> bytes:
    """One zstd frame, refusing before allocation any frame that declares more than `limit` bytes."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit:
            raise CodecError(f"zstd frame declares {declared} bytes, more than the {limit} allowed")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as err:
        raise CodecError(f"zstd: {err}") from None
