"""kvq version 4's per-head transform for the benchmarks: learned on kvcli's calibration texts (never the corpus),
stored as a dictionary file, and the codecs that use it.

`--transform fit` learns it as `kvcli calibrate` does (kvcli/calibration/bases.py) under the codec's profile, builds
the .kvd file and saves it in the user's cache ($KVCLI_CACHE_DIR/dicts), where decoding finds it; `--transform
PATH` reads a .kvd made earlier.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from common import emit

from kvcli.codecs.kvq import KvqCodec
from kvcli.codecs.transform import Transforms
from kvcli.container import dictionary


def learn(lm, codec: KvqCodec) -> dictionary.Dictionary:
    """The transform `kvcli calibrate` learns (kvcli/calibration/bases.py) under `codec`'s profile."""
    from kvcli.calibration import bases
    from kvcli.calibration.calibrate import default_texts

    return bases.to_dictionary(bases.learn_bases(lm, codec.profile, default_texts()), lm.identity)


def load(lm, source: str, codec: KvqCodec, env: dict) -> dictionary.Dictionary:
    """The dictionary `source` names ("fit": learned now and saved in the cache), checked for lm's model."""
    if source == "fit":
        t0 = time.perf_counter()
        found = learn(lm, codec)
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
