"""The --quality presets: one name, one codec with its settings."""

from __future__ import annotations

import numpy as np

from .base import Codec
from .kvq import DEFAULT_SINKS, DEFAULT_TOKEN_ALPHA, FORMAT_VERSION, TOKEN_EXPONENT_LIMIT, KvqCodec, Profile
from .transform import Transforms
from .lossless import ZstdCodec
from .raw import RawCodec

# Step size relative to a layer's RMS at the geometric-mean sensitivity. Set on calibration text, never on
# the benchmark corpus (docs/codec.md, "Presets"). A model's profile may set its own scale per preset (chosen for the
# preset's rate by kvcli/calibration/scales.py); these are the scales where it sets none.
LOSSY_SCALES = {"high": 0.24, "balanced": 0.75, "small": 1.55, "tiny": 2.6}
# The presets that name a rate: bits per element that calibration meets on its texts by the model's own scale (issue
# 20's caps, 2.5 / 1.5 / 1 bits, less 4% for documents that code larger than the calibration texts). `high` names a
# step instead: it keeps its scale on every model.
TARGET_BITS = {"balanced": 2.4, "small": 1.44, "tiny": 0.96}
# The largest token exponent a preset's encoder writes (KvqCodec's token_coarsest), where it is not
# TOKEN_EXPONENT_LIMIT: at `tiny`'s coarse steps a fact the prefill's last queries ignored, coded up to 8x coarser,
# could not be read back (SmolLM2 lost the needle's last digits); capped at 2^(4/8) it can, at no cost in KL at equal
# bits. At a model's larger token alpha (Gemma 3's 0.45, SmolLM2's 0.35) `small` and `balanced` lost them too;
# capped at 2^(8/8) they keep them (docs/codec.md, "Presets").
TOKEN_COARSEST = {"balanced": 8, "small": 8, "tiny": 4}
# Each preset's codec class: what callers ask (`lossless`, say) before the codec is built.
PRESET_CODECS: dict[str, type[Codec]] = {"lossless": ZstdCodec, **dict.fromkeys(LOSSY_SCALES, KvqCodec),
                                         "raw": RawCodec}
QUALITIES = tuple(PRESET_CODECS)
# The lossy presets that code through the model's per-head transform where its profile names a dictionary, in the
# bitstream version that has it: at equal bits it cut the KL on both models, at every rate from `tiny`'s to
# `balanced`'s (SmolLM2 near 2.4 bits: x0.64; docs/codec.md, "Version 4 with the per-head transform, measured").
# `high` keeps version 3: its steps are fine enough that the transform's decoding time is not worth it.
TRANSFORM_PRESETS = frozenset({"balanced", "small", "tiny"})
TRANSFORM_VERSION = 4
DEFAULT_QUALITY = "balanced"


def make_codec(quality: str, profile: Profile | None = None, inv_freq: list[np.ndarray | None] | None = None,
               step_scale: float = 1.0, sinks: int = DEFAULT_SINKS, version: int = FORMAT_VERSION,
               transforms: Transforms | None = None, dictionary: str | None = None,
               base_scale: float | None = None, token_alpha: float | None = None,
               token_coarsest: int | None = None) -> Codec:
    """The preset's codec; a lossy one writes kvq bitstream `version` (kvq.WRITABLE_VERSIONS), or with the
    model's `transforms` (named by their `dictionary`'s SHA-256) version 4 with them. Its step scale is
    `base_scale` (the model's profile's for the preset) or else LOSSY_SCALES', times `step_scale`; its token
    weights' alpha `token_alpha` (the model's profile's) or else kvq's default; its largest token exponent
    `token_coarsest` or else the preset's (TOKEN_COARSEST)."""
    cls = PRESET_CODECS.get(quality)
    if cls is None:
        raise ValueError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    if cls.lossless:  # nothing to set: no steps, no profile
        return cls()
    alpha = DEFAULT_TOKEN_ALPHA if token_alpha is None else token_alpha
    meta = {"quality": quality, "step_scale": step_scale, "profile": f"{profile.name}:{profile.digest()}" if profile else "none",
            "token_alpha": alpha}
    if transforms is not None:
        version = TRANSFORM_VERSION
    return KvqCodec((LOSSY_SCALES[quality] if base_scale is None else base_scale) * step_scale, sinks, profile, inv_freq, meta, alpha, version,
                    transforms, dictionary,
                    TOKEN_COARSEST.get(quality, TOKEN_EXPONENT_LIMIT) if token_coarsest is None else token_coarsest)
