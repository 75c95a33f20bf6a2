"""The codec interface: a configuration (what the header records), a fitted encoder and a per-file decoder.

- `Codec` is the configuration: name, params, how to rebuild it from a header (`from_params`, validated against
  the class's declared PARAMS), and the two factories `fit` (whole cache -> Encoder) and `open` (aux blobs and
  the header's layer count -> Decoder). `registry.codec_from_header` rebuilds one from a file's header.
- Both factories take the backend, the one choice of where the codec's hot paths run (BACKENDS); it is made
  there, once, and never changes.
- `Encoder` and `Decoder` are immutable once built, so threads may share them.
- Decoding is two declared stages, in this order: `entropy` turns a batch of segments' bytes into symbols (on
  the CPU; a GPU entropy decoder may replace it), and `reconstruct` writes one segment's values into a
  caller-given output tensor, on that tensor's device. The caller (kvfile) knows nothing else.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import zstandard

# Where a codec's hot paths run: "torch" (in C for CPU tensors where the codec has it, torch elsewhere) or
# "triton" (the codec's Triton kernels where it has them, on the tensors' device). The bytes are the same either way.
BACKENDS = ("torch", "triton")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


class CodecError(Exception):
    """Bytes or params that do not decode under their context. `index`: the failing segment within a batch."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


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

    @property
    def nbytes(self) -> int:
        return self.heads * self.tokens * self.dim * ITEMSIZE[self.dtype]


class Codec(ABC):
    """A codec's configuration. Subclasses declare `name`, `lossless`, `max_expansion` and PARAMS."""

    name: ClassVar[str]
    lossless: ClassVar[bool]
    # Decoded bytes per stored data byte (segments and aux together) that no valid file exceeds; a reader
    # refuses a file that claims more before allocating anything.
    max_expansion: ClassVar[float]
    # Header params: name -> (accepted types, required). Unknown names are refused.
    PARAMS: ClassVar[dict[str, tuple[tuple[type, ...], bool]]] = {}

    def params(self) -> dict:
        """What the header records so that a decoder can rebuild this codec exactly."""
        return {}

    @classmethod
    def from_params(cls, params: Any) -> "Codec":
        """The codec a header describes; CodecError for unknown, missing or mistyped params."""
        if not isinstance(params, dict):
            raise CodecError(f"codec {cls.name}: params must be an object")
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            raise CodecError(f"codec {cls.name}: unknown params {unknown}")
        for key, (types, required) in cls.PARAMS.items():
            if key not in params:
                if required:
                    raise CodecError(f"codec {cls.name}: missing param {key!r}")
                continue
            value = params[key]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise CodecError(f"codec {cls.name}: param {key!r} has the wrong type ({type(value).__name__})")
        return cls._from_checked(params)

    @classmethod
    def _from_checked(cls, params: dict) -> "Codec":
        return cls(**params)

    @abstractmethod
    def fit(self, keys: list[torch.Tensor], values: list[torch.Tensor], token_starts: list[int],
            attention: list[torch.Tensor] | None = None, backend: str = "torch") -> "Encoder":
        """An encoder for this cache (it may fit shared tables on all of it) that codes segments with `backend`
        (check_backend). `attention`, per layer (kv_heads, held), is what each token received during prefill
        (kvcli/modeling/importance.py), where measured; lossy codecs may spend fewer bits on tokens that received
        little."""

    @abstractmethod
    def open(self, aux: dict[str, bytes], layers: int, backend: str = "torch") -> "Decoder":
        """A decoder for one file of `layers` layers (the header's count), from the aux blobs its encoder wrote,
        that decodes with `backend` (check_backend)."""


class Encoder(ABC):
    def aux(self) -> dict[str, bytes]:
        """Blobs shared by all segments (entropy tables, say), stored once per file."""
        return {}

    @abstractmethod
    def encode(self, x: torch.Tensor, ctx: SegmentContext) -> bytes: ...

    def encode_many(self, jobs: list[tuple[torch.Tensor, SegmentContext]]) -> list[bytes]:
        """Several segments at once; codecs that batch their entropy coder override it."""
        return [self.encode(x, ctx) for x, ctx in jobs]


class Decoder(ABC):
    # Elements per entropy() call that amortize its fixed costs; the caller batches segments up to this.
    batch_elements: ClassVar[int] = 1 << 20
    # Whether reconstruct writes fastest into channel-major storage: the caller then allocates each layer as
    # (heads, dim, tokens) and hands reconstruct (heads, tokens, dim) views of it.
    channel_major: ClassVar[bool] = False
    # Whether decode_onto decodes whole batches straight into tensors on their device: a codec with kernels
    # opened with backend "triton". Other decoders run entropy() then reconstruct() there as on the CPU.
    on_device: bool = False
    device_batch_elements: ClassVar[int] = 1 << 26

    @abstractmethod
    def entropy(self, segments: list[tuple[SegmentContext, bytes]]) -> list[Any]:
        """Stage 1: each segment's symbols (an array whose meaning only this decoder knows).

        Checks every size, count and stream invariant; CodecError with `index` naming the failing segment.
        """

    @abstractmethod
    def reconstruct(self, ctx: SegmentContext, data: bytes, symbols: Any, out: torch.Tensor) -> None:
        """Stage 2: write the segment's values into `out`, a (heads, tokens, dim) tensor of the cache dtype on
        any device (kvq: in C for CPU outputs of the file's dtype, in torch otherwise)."""

    def decode_onto(self, segments: list[tuple[SegmentContext, bytes, torch.Tensor]]) -> None:
        """Both stages for a batch of (context, bytes, out) on out's device with the codec's kernels; only for
        decoders whose on_device is true. CodecError with `index` naming the failing segment."""
        raise NotImplementedError(f"{type(self).__name__} has no device path")


def check_backend(backend: str) -> None:
    """ValueError for a backend outside BACKENDS: kernels.placement.resolve has turned --backend into one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")


def reject_aux(codec: str, aux: dict[str, bytes]) -> None:
    if aux:
        raise CodecError(f"codec {codec} takes no aux segments, found {sorted(aux)}")


def tensor_bytes(x: torch.Tensor) -> np.ndarray:
    """The little-endian bytes of a tensor as a (elements, itemsize) uint8 array."""
    flat = x.contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().reshape(flat.numel(), flat.element_size())
    return raw[:, ::-1] if sys.byteorder == "big" else raw


def bytes_to_tensor(raw: bytes | np.ndarray, ctx: SegmentContext) -> torch.Tensor:
    """Little-endian bytes of exactly ctx's elements -> a (heads, tokens, dim) tensor of ctx's dtype."""
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw.reshape(-1)
    if buf.size != ctx.nbytes:
        raise CodecError(f"decoded {buf.size} bytes, expected {ctx.nbytes}")
    items = buf.reshape(-1, ITEMSIZE[ctx.dtype])
    if sys.byteorder == "big":
        items = items[:, ::-1]
    items = np.ascontiguousarray(items)
    if not items.flags.writeable:  # torch refuses to wrap read-only memory (the segment's bytes)
        items = items.copy()
    return torch.from_numpy(items).view(ctx.torch_dtype).reshape(ctx.shape)


def unzstd(data: bytes, limit: int) -> bytes:
    """Exactly one zstd frame, nothing after it, refusing before allocation a frame that declares more than
    `limit` bytes or does not declare its size."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared < 0:
            raise CodecError("zstd frame does not declare its size")
        if declared > limit:
            raise CodecError(f"zstd frame declares {declared} bytes, more than the {limit} allowed")
        obj = zstandard.ZstdDecompressor().decompressobj()
        out = obj.decompress(data)
        if not obj.eof or obj.unused_data:
            raise CodecError("zstd frame is truncated" if not obj.eof else "bytes after the zstd frame")
    except zstandard.ZstdError as err:
        raise CodecError(f"zstd: {err}") from None
    if len(out) != declared:
        raise CodecError(f"zstd frame declares {declared} bytes but holds {len(out)}")
    return out

