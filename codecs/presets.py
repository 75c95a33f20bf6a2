"""The --quality presets: one name, one codec with its settings."""

from __future__ import annotations

import numpy as np

from .base import Codec
from .kvq import DEFAULT_SINKS, DEFAULT_TOKEN_ALPHA, FORMAT_VERSION, KvqCodec, Profile
from .transform import Transforms
from .lossless import ZstdCodec
from .raw import RawCodec

# Step size relative to a layer's RMS at the geometric-mean sensitivity. Set on calibration text, never on
# the benchmark corpus (docs/codec.md, "Presets").
LOSSY_SCALES = {"high": 0.24, "balanced": 0.75, "small": 1.55, "tiny": 2.6}
# Each preset's codec class: what callers ask (`lossless`, say) before the codec is built.
PRESET_CODECS: dict[str, type[Codec]] = {"lossless": ZstdCodec, **dict.fromkeys(LOSSY_SCALES, KvqCodec),
                                         "raw": RawCodec}
QUALITIES = tuple(PRESET_CODECS)
# The lossy presets that code through the model's per-head transform where its profile names a dictionary, in the
# bitstream version that has it. Below about 1.5 bits per element it moves the frontier (SmolLM2 `small`: KL x0.47
# at equal bits); at `balanced` it only moves along it (KL x0.97 at 8% fewer bits) and costs decoding time
# (docs/codec.md, "Version 4 with the per-head transform, measured").
TRANSFORM_PRESETS = frozenset({"small", "tiny"})
TRANSFORM_VERSION = 4
DEFAULT_QUALITY = "balanced"


def make_codec(quality: str, profile: Profile | None = None, inv_freq: list[np.ndarray | None] | None = None,
               step_scale: float = 1.0, sinks: int = DEFAULT_SINKS, version: int = FORMAT_VERSION,
               transforms: Transforms | None = None, dictionary: str | None = None) -> Codec:
    """The preset's codec; a lossy one writes kvq bitstream `version` (kvq.WRITABLE_VERSIONS), or with the
    model's `transforms` (named by their `dictionary`'s SHA-256) version 4 with them."""
    cls = PRESET_CODECS.get(quality)
    if cls is None:
        raise ValueError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    if cls.lossless:  # nothing to set: no steps, no profile
        return cls()
    meta = {"quality": quality, "step_scale": step_scale, "profile": f"{profile.name}:{profile.digest()}" if profile else "none",
            "token_alpha": DEFAULT_TOKEN_ALPHA}
    if transforms is not None:
        version = TRANSFORM_VERSION
    return KvqCodec(LOSSY_SCALES[quality] * step_scale, sinks, profile, inv_freq, meta, DEFAULT_TOKEN_ALPHA, version,
                    transforms, dictionary)
