"""The --quality presets: one name, one codec with its settings."""

from __future__ import annotations

from .base import Codec
from .lossless import ZstdCodec
from .raw import RawCodec

QUALITIES = ("lossless", "raw")


def make_codec(quality: str, **options) -> Codec:
    if quality == "lossless":
        return ZstdCodec(**options)
    if quality == "raw":
        return RawCodec()
    raise ValueError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
