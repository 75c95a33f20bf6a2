"""Calibration profiles: where they live, how they are found, and their JSON form (never pickle).

Lookup order for a model: the user's profile directory ($KVCLI_CACHE_DIR/profiles, written by
`kvcli calibrate`), then the profiles shipped inside kvcli. A profile matches a model by its config and
weights digests (docs/format.md, "Model identity"), so a re-saved or resharded copy of a model still finds its
profile. With none found, the first lossy encode calibrates the model (kvcli.calibration.calibrate.find_or_calibrate) and
stores the result in the user's directory; with KVCLI_AUTO_CALIBRATE=0 it falls back to uniform steps instead
(docs/codec.md, "Calibration and profiles").
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np

from ..codecs.kvq import Profile
from ..container import identity
from ..errors import FormatError

PROFILE_FORMAT = "kvcli-profile"
PROFILE_VERSION = 1
AUTO_CALIBRATE_ENV = "KVCLI_AUTO_CALIBRATE"


def profile_key(model_identity: dict) -> str:
    return hashlib.sha256((model_identity["config_digest"] + model_identity["weights_digest"]).encode()).hexdigest()[:24]


def auto_calibrate() -> bool:
    """Whether a lossy encode for a model without a profile may calibrate it first (on unless set to 0)."""
    return os.environ.get(AUTO_CALIBRATE_ENV, "1").strip() != "0"


def user_dir() -> Path:
    return identity.cache_root() / "profiles"


def _numbers(profile: Profile) -> dict:
    """The profile's numbers as JSON stores them: rounded."""
    return {"sensitivity": np.round(profile.sensitivity, 9).tolist(),
            "key_weights": [np.round(w, 6).tolist() for w in profile.key_weights] if profile.key_weights else None}


def as_stored(profile: Profile) -> Profile:
    """The profile as a later run will read it back from its JSON (what its digest and a transform fitted under
    it must describe)."""
    numbers = _numbers(profile)
    return Profile(profile.name, np.asarray(numbers["sensitivity"], dtype=np.float64),
                   [np.asarray(w, dtype=np.float64) for w in numbers["key_weights"]] if numbers["key_weights"] else None)


def to_json(profile: Profile, model_identity: dict, details: dict) -> dict:
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "name": profile.name,
        "model": {k: model_identity[k] for k in ("architecture", "name", "config_digest", "weights_digest")},
        **_numbers(profile),
        **details,
    }


def from_json(doc: dict, where: str) -> tuple[Profile, dict]:
    if doc.get("format") != PROFILE_FORMAT or doc.get("version") != PROFILE_VERSION:
        raise FormatError(f"{where}: not a kvcli profile of version {PROFILE_VERSION}")
    try:
        sens = np.asarray(doc["sensitivity"], dtype=np.float64)
        weights = [np.asarray(w, dtype=np.float64) for w in doc["key_weights"]] if doc.get("key_weights") else None
        if sens.ndim not in (2, 3) or sens.shape[1] != 2 or not np.isfinite(sens).all():
            raise ValueError("sensitivity must be (layers, 2) or (layers, 2, kv_heads) and finite")
        if weights is not None and (len(weights) != sens.shape[0] or any(w.ndim != 2 for w in weights)):
            raise ValueError("key_weights must hold one (kv_heads, head_dim) array per layer")
        return Profile(str(doc["name"]), sens, weights), doc["model"]
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"{where}: malformed profile: {err}") from None


def save(profile: Profile, model_identity: dict, details: dict, path: Path | None = None) -> Path:
    from ..container.format import atomic_write

    path = path or user_dir() / f"{profile_key(model_identity)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(path), [json.dumps(to_json(profile, model_identity, details), separators=(",", ":")).encode()])
    return path


def load(path: Path) -> Profile:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise FormatError(f"{path}: cannot read profile: {err}") from None
    return from_json(doc, str(path))[0]


def _candidates():
    if user_dir().is_dir():
        yield from sorted(user_dir().glob("*.json"))
    shipped = resources.files("kvcli.calibration") / "profiles"
    for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            yield entry


def find(model_identity: dict) -> Profile | None:
    """The profile made for exactly this model (same config and weights digests), or None."""
    wanted = (model_identity["config_digest"], model_identity["weights_digest"])
    for entry in _candidates():
        try:
            doc = json.loads(entry.read_text())
            model = doc["model"]
            found = (model["config_digest"], model["weights_digest"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FormatError(f"{entry}: cannot read profile ({err}); delete it or rerun kvcli calibrate") from None
        if found == wanted:
            return from_json(doc, str(entry))[0]
    return None
