"""kvcli's identity of the model vLLM loaded, from the same files, computed once per process.

The weights digest reads every tensor once and is then kept in kvcli's digest cache by file path, size, mtime
and inode (kvcli/container/identity.py), so a restarted engine reads only the safetensors headers again.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ...container import identity


@functools.cache
def model_identity(directory: str) -> dict:
    """The identity a cache of this model directory carries (docs/format.md, "Model identity"). ModelLoadError
    if the directory has no safetensors weights or a damaged file."""
    from transformers import AutoTokenizer

    path = Path(directory)
    files = identity.weight_files(path)
    if not files:
        from ...errors import ModelLoadError

        raise ModelLoadError(f"{directory}: no *.safetensors weights, so kvcli cannot identify the model")
    config = identity.read_config(path)
    return {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "name": path.name,
        "config_digest": identity.config_digest(config, str(path / "config.json")),
        "weights_digest": identity.weights_digest(files),
        "tokenizer_digest": identity.tokenizer_digest(AutoTokenizer.from_pretrained(str(path))),
    }
