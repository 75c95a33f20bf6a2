"""`raw`: the tensor's bytes as they are. The baseline every other codec is measured against."""

from __future__ import annotations

import torch

from .base import Codec, SegmentContext, tensor_bytes, tensor_from_bytes


class RawCodec(Codec):
    name = "raw"
    lossless = True

    def encode(self, x: torch.Tensor, ctx: SegmentContext) -> bytes:
        return tensor_bytes(x).tobytes()

    def decode(self, data: bytes, ctx: SegmentContext) -> torch.Tensor:
        return tensor_from_bytes(data, ctx)
