"""kvq version 4's per-head transform for the benchmarks: learned on kvcli's calibration texts (never the corpus),
stored as a dictionary file, and the codecs that use it.

`--transform fit` learns it as bench/kvq_levers.py's `xf-head` lever did (fit_bases: the covariance of kvq's
unit-step values per (layer, K/V) on the calibration texts, prefilled in 512-token pieces with their attention;
here each head's block's eigenvectors, by decreasing variance), builds the .kvd file and saves it in the user's
cache ($KVCLI_CACHE_DIR/dicts), where decoding finds it; `--transform PATH` reads a .kvd made earlier.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch
from common import emit

from kvcli.codecs.kvq import KvqCodec
from kvcli.codecs.transform import Transforms
from kvcli.container import dictionary
from kvcli.modeling import inference


def learn(lm, codec: KvqCodec) -> Transforms:
    """Per (layer, kind) each head's eigenvectors of the unit-step covariance under `codec` (balanced's scale and
    the model's profile: the basis does not depend on the scale)."""
    from kvq_levers import fit_bases  # imported here: kvq_levers imports rate_distortion, which imports this

    cov = fit_bases(lm, codec)
    probe = inference.prefill(lm, inference.document_ids(lm, "a b c d e f g h"))
    bases = {}
    for (layer, kind), c in cov.items():
        heads = probe.keys[layer].shape[0]
        dim = c.shape[0] // heads
        blocks = []
        for h in range(heads):
            sl = slice(h * dim, (h + 1) * dim)
            blocks.append(torch.linalg.eigh(c[sl, sl])[1].flip(1).numpy())
        bases[(layer, kind)] = np.stack(blocks)
    return Transforms.from_bases(bases)


def load(lm, source: str, codec: KvqCodec, env: dict) -> dictionary.Dictionary:
    """The dictionary `source` names ("fit": learned now and saved in the cache), checked for lm's model."""
    if source == "fit":
        t0 = time.perf_counter()
        transforms = learn(lm, codec)
        found = dictionary.parse(dictionary.build(transforms.pack(), lm.identity))
        path = dictionary.save_to_cache(found)
        emit({"what": "transform_fit", "seconds": round(time.perf_counter() - t0, 1), "dictionary": str(path),
              "dictionary_bytes": len(found.data), **env})
    else:
        found = dictionary.parse(Path(source).read_bytes(), None, source)
        dictionary.save_to_cache(found)  # where decoding looks
    dictionary.check_model(found, lm.identity, source)
    return found


@functools.lru_cache(maxsize=4)
def transforms_of(payload: bytes) -> Transforms:
    """One Transforms per dictionary for the whole run: it keeps the inverses the encoder computes once."""
    return Transforms.unpack(payload)


def with_transform(codec: KvqCodec, found: dictionary.Dictionary) -> KvqCodec:
    """`codec` writing version 4 with the dictionary's transform."""
    return KvqCodec(codec.scale, codec.sinks, codec.profile, codec.inv_freq, codec.meta, codec.token_alpha, 4,
                    transforms_of(found.payload), found.sha)
