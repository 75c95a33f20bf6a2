"""Codecs for KV tensors. Installed as `kvcli.codecs`; this is the only package that imports constriction."""

from __future__ import annotations

from .base import Codec, CodecError, SegmentContext
from .kvq import KvqCodec, Profile
from .lossless import ZstdCodec
from .raw import RawCodec


def codec_from_header(name: str, params: dict) -> Codec:
    """Rebuild the codec a file was written with, from the name and params in its header."""
    if name == RawCodec.name:
        return RawCodec()
    if name == ZstdCodec.name:
        return ZstdCodec.from_params(params)
    if name == KvqCodec.name:
        return KvqCodec.from_params(params)
    raise CodecError(f"unknown codec {name!r}")


__all__ = ["Codec", "CodecError", "SegmentContext", "RawCodec", "ZstdCodec", "KvqCodec", "Profile", "codec_from_header"]
