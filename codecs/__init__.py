"""Codecs for KV tensors. Installed as `kvcli.codecs`. Importing this package registers every codec."""

from __future__ import annotations

from .base import REGISTRY, Codec, CodecError, Decoder, Encoder, SegmentContext, codec_from_header
from .kvq import KvqCodec, Profile
from .lossless import ZstdCodec
from .raw import RawCodec

__all__ = ["REGISTRY", "Codec", "CodecError", "Decoder", "Encoder", "SegmentContext", "RawCodec", "ZstdCodec",
           "KvqCodec", "Profile", "codec_from_header"]
