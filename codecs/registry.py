"""Every codec this build reads, by the name a header records."""

from __future__ import annotations

from typing import Any

from .base import Codec, CodecError
from .kvq import KvqCodec
from .lossless import ZstdCodec
from .raw import RawCodec

REGISTRY: dict[str, type[Codec]] = {cls.name: cls for cls in (RawCodec, ZstdCodec, KvqCodec)}


def codec_from_header(name: Any, params: Any) -> Codec:
    """Rebuild the codec a file was written with, from the name and params in its header."""
    cls = REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CodecError(f"unknown codec {name!r}; this build reads {', '.join(sorted(REGISTRY))}")
    return cls.from_params(params)
