"""`raw`: the tensor's bytes as they are, little-endian on every host. The baseline for every other codec."""

from __future__ import annotations

import numpy as np
import torch

from .base import (Codec, CodecError, Decoder, Encoder, SegmentContext, bytes_to_tensor, check_backend, reject_aux,
                   tensor_bytes)


class RawCodec(Codec, Encoder, Decoder):
    """Stateless, so one object is the configuration, the encoder and the decoder."""

    name = "raw"
    lossless = True
    max_expansion = 1.0

    def fit(self, keys, values, token_starts, attention=None, backend: str = "torch") -> "RawCodec":
        check_backend(backend)  # no kernels: every backend codes alike
        return self

    def open(self, aux: dict[str, bytes], layers: int, backend: str = "torch") -> "RawCodec":
        check_backend(backend)
        reject_aux(self.name, aux)
        return self

    def encode(self, x: torch.Tensor, ctx: SegmentContext) -> bytes:
        return tensor_bytes(x).tobytes()

    def entropy(self, segments: list[tuple[SegmentContext, bytes]]) -> list[np.ndarray]:
        """The bytes as they are, each segment exactly its elements' size (so verify, which runs only this
        stage, refuses what reconstruct would)."""
        for i, (ctx, data) in enumerate(segments):
            if len(data) != ctx.nbytes:
                raise CodecError(f"raw: {len(data)} bytes, expected {ctx.nbytes}", index=i)
        return [np.frombuffer(data, np.uint8) for _, data in segments]

    def reconstruct(self, ctx, data, symbols, out) -> None:
        out.copy_(bytes_to_tensor(symbols, ctx))
