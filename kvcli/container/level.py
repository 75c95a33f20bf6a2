"""A file's quality level: the `--quality` preset its header's codec names (docs/streaming.md, "Levels").

Read from the header alone, so the storage layer can use it without importing a codec. A kvq file written with a
`--step-scale` other than 1 is no preset's: it is not a level.
"""

from __future__ import annotations

# Worst to best. raw and lossless hold the model's values exactly, as a recomputed chunk does.
QUALITY_RANK = {"tiny": 0, "small": 1, "balanced": 2, "high": 3, "lossless": 4, "raw": 4}
EXACT = QUALITY_RANK["lossless"]
# The presets of codecs whose params do not name one (codecs/presets.py: "lossless" is zstd, "raw" is raw).
PRESET_OF_CODEC = {"zstd": "lossless", "raw": "raw"}


def quality_of(codec: dict) -> str | None:
    """The preset a file's codec (its header's `codec` object) was written with, or None where no preset wrote it."""
    name, params = codec.get("name"), codec.get("params") or {}
    if name in PRESET_OF_CODEC:
        return PRESET_OF_CODEC[name]
    if name == "kvq" and isinstance(params, dict) and params.get("step_scale", 1.0) == 1.0 \
            and params.get("quality") in QUALITY_RANK:
        return params["quality"]
    return None


def label_of(codec: dict) -> str:
    """What listings and prefix hits call a file's quality: its preset, else its codec's name."""
    return quality_of(codec) or str(codec.get("name", ""))
