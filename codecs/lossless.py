"""`zstd`: bit-exact compression. Bytes are regrouped by significance before zstd.

Float exponents and high mantissa bytes of neighbouring elements are alike while the low mantissa bytes are
noise; putting byte plane 0 of every element first, then plane 1, and so on, lets zstd find the redundancy.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from .base import Codec, CodecError, SegmentContext, tensor_bytes, tensor_from_bytes, unzstd

DEFAULT_LEVEL = 3


class ZstdCodec(Codec):
    name = "zstd"
    lossless = True

    def __init__(self, level: int = DEFAULT_LEVEL):
        if not 1 <= level <= 19:
            raise ValueError(f"zstd level {level} is outside [1, 19]")
        self.level = level

    def params(self) -> dict:
        return {"level": self.level, "byte_planes": True}

    @classmethod
    def from_params(cls, params: dict) -> "ZstdCodec":
        return cls(int(params.get("level", DEFAULT_LEVEL)))

    def encode(self, x: torch.Tensor, ctx: SegmentContext) -> bytes:
        planes = np.ascontiguousarray(tensor_bytes(x).T)
        return zstandard.ZstdCompressor(level=self.level).compress(planes.tobytes())

    def decode(self, data: bytes, ctx: SegmentContext) -> torch.Tensor:
        itemsize = torch.empty((), dtype=ctx.torch_dtype).element_size()
        expected = ctx.heads * ctx.tokens * ctx.dim * itemsize
        raw = unzstd(data, expected)
        if len(raw) != expected:
            raise CodecError(f"zstd: decoded {len(raw)} bytes, expected {expected}")
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1)
        return tensor_from_bytes(np.ascontiguousarray(planes.T), ctx)
