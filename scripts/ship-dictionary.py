"""Learn the default model's kvq transform and its presets' scales from its shipped profile and ship them.

    .venv/bin/python scripts/ship-dictionary.py [--check]

Reads kvcli/calibration/profiles/PROFILE.json for the bundled model, learns the per-head transform under it on
the calibration texts (kvcli.calibration.bases.learn_bases, as `kvcli calibrate` does), writes the dictionary to
kvcli/calibration/profiles/dicts/SHA.kvd (where kvcli.container.dictionary.ShippedPlace reads it), removes the
dictionaries it replaces there, then chooses the presets' token alpha and scales for the model as `kvcli calibrate`
does (kvcli/calibration/scales.py) and writes them into the profile (its other fields kept as they are). With --check it
writes nothing and exits 1 unless the shipped files are what it would write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kvcli.calibration import bases, calibrate, profiles, quality
from kvcli.container import dictionary
from kvcli.modeling import inference, models

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
    contexts = [quality.context(lm, inference.document_ids(lm, text)) for _, text in calibrate.default_texts()]
    learned, scales, alpha, rate = calibrate.transform_and_scales(lm, stored.profile, contexts, transform=True)
    found = bases.to_dictionary(learned, lm.identity)
    if args.check:
        shipped = dictionary.ShippedPlace().read(found.sha) if stored.dictionary == found.sha else None
        stored_scales = profiles.to_json(stored.profile, lm.identity, {}, scales=scales)["scales"]
        ok = shipped == found.data and stored.scales == stored_scales and stored.token_alpha == alpha
        print(f"{'up to date' if ok else 'differs'}: learned {found.sha}, scales {stored_scales} and token alpha "
              f"{alpha}, the profile names {stored.dictionary}, {stored.scales} and {stored.token_alpha}")
        return 0 if ok else 1
    written = dictionary.save(found, PROFILES)
    for old in (PROFILES / dictionary.DICT_DIR).glob(f"*{dictionary.SUFFIX}"):
        if old != written:
            old.unlink()
    profiles.update(path, dictionary=found.sha, scales=scales, rate=rate, token_alpha=alpha)
    print(f"wrote {written} ({len(found.data):,} bytes) and named it in {path} with the scales {scales} and token "
          f"alpha {alpha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
