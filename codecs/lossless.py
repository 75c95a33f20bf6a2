"""`zstd`: bit-exact compression. Bytes are regrouped by significance before zstd.

Float exponents and high mantissa bytes of neighbouring elements are alike while the low mantissa bytes are
noise; putting byte plane 0 of every element first, then plane 1, and so on, lets zstd find the redundancy.
`byte_planes: false` files hold the little-endian elements in order; both decode. `level` is informational.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from .base import (ITEMSIZE, Codec, CodecError, Decoder, Encoder, SegmentContext, bytes_to_tensor, check_backend,
                   reject_aux, tensor_bytes, unzstd)

DEFAULT_LEVEL = 3


class ZstdCodec(Codec, Encoder, Decoder):
    """Stateless per file, so one object is the configuration, the encoder and the decoder."""

    name = "zstd"
    lossless = True
    # Real caches compress 1.1-1.6x; 64x leaves a wide margin. A writer refuses data beyond it (all zeros, say).
    max_expansion = 64.0
    PARAMS = {"level": ((int,), False), "byte_planes": ((bool,), False)}

    def __init__(self, level: int = DEFAULT_LEVEL, byte_planes: bool = True):
        if not 1 <= level <= 22:
            raise CodecError(f"zstd level {level} is outside [1, 22]")
        self.level = level
        self.byte_planes = byte_planes

    def params(self) -> dict:
        return {"level": self.level, "byte_planes": self.byte_planes}

    @classmethod
    def _from_checked(cls, params: dict) -> "ZstdCodec":
        # A decoder never needs the level: record it, whatever it is.
        codec = cls(DEFAULT_LEVEL, params.get("byte_planes", True))
        codec.level = params.get("level", DEFAULT_LEVEL)
        return codec

    def fit(self, keys, values, token_starts, attention=None, backend: str = "torch") -> "ZstdCodec":
        check_backend(backend)  # no kernels: every backend codes alike
        return self

    def open(self, aux: dict[str, bytes], layers: int, backend: str = "torch") -> "ZstdCodec":
        check_backend(backend)
        reject_aux(self.name, aux)
        return self

    def encode(self, x: torch.Tensor, ctx: SegmentContext) -> bytes:
        items = tensor_bytes(x)
        raw = np.ascontiguousarray(items.T if self.byte_planes else items)
        return zstandard.ZstdCompressor(level=self.level).compress(raw.tobytes())

    def entropy(self, segments: list[tuple[SegmentContext, bytes]]) -> list[np.ndarray]:
        out = []
        for i, (ctx, data) in enumerate(segments):
            try:
                out.append(np.frombuffer(unzstd(data, ctx.nbytes), np.uint8))
            except CodecError as err:
                raise CodecError(str(err), index=i) from None
            if out[-1].size != ctx.nbytes:
                raise CodecError(f"zstd: decoded {out[-1].size} bytes, expected {ctx.nbytes}", index=i)
        return out

    def reconstruct(self, ctx, data, symbols, out) -> None:
        if self.byte_planes:
            symbols = np.ascontiguousarray(symbols.reshape(ITEMSIZE[ctx.dtype], -1).T)
        out.copy_(bytes_to_tensor(symbols, ctx))
