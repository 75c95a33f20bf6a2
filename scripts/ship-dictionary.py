"""Learn the default model's kvq transform from its shipped profile and ship it beside the profile.

    .venv/bin/python scripts/ship-dictionary.py [--check]

Reads kvcli/calibration/profiles/PROFILE.json for the bundled model, learns the per-head transform under it on
the calibration texts (kvcli.calibration.bases.learn_bases, as `kvcli calibrate` does), writes the dictionary to
kvcli/calibration/profiles/dicts/SHA.kvd (where kvcli.container.dictionary.ShippedPlace reads it), removes the
dictionaries it replaces there, and names the new one in the profile (its other fields kept as they are). With
--check it writes nothing and exits 1 unless the shipped files are what it would write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kvcli.calibration import bases, calibrate, profiles
from kvcli.container import dictionary
from kvcli.modeling import models

PROFILES = Path(__file__).resolve().parent.parent / "kvcli" / "calibration" / "profiles"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare with the shipped files")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = models.load(None, "float32")
    digests = ("config_digest", "weights_digest")
    matches = [p for p in sorted(PROFILES.glob("*.json"))
               if all(profiles.read(p).model.get(k) == lm.identity[k] for k in digests)]
    if len(matches) != 1:
        print(f"expected one shipped profile for {lm.name}, found {len(matches)}", file=sys.stderr)
        return 1
    path = matches[0]
    stored = profiles.read(path)
    found = bases.to_dictionary(bases.learn_bases(lm, stored.profile, calibrate.default_texts()), lm.identity)
    if args.check:
        shipped = dictionary.ShippedPlace().read(found.sha)
        ok = stored.dictionary == found.sha and shipped == found.data
        print(f"{'up to date' if ok else 'differs'}: learned {found.sha}, the profile names {stored.dictionary}")
        return 0 if ok else 1
    written = dictionary.save(found, PROFILES)
    for old in (PROFILES / dictionary.DICT_DIR).glob(f"*{dictionary.SUFFIX}"):
        if old != written:
            old.unlink()
    profiles.set_dictionary(path, found.sha)
    print(f"wrote {written} ({len(found.data):,} bytes) and named it in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
