"""Calibration profiles: where they live, how they are found, and their JSON form (never pickle).

Lookup order for a model: the user's profile directory ($KVCLI_CACHE_DIR/profiles, written by
`kvcli calibrate`), then the profiles shipped inside kvcli. A profile matches a model by its config and
weights digests (docs/format.md, "Model identity"), so a re-saved or resharded copy of a model still finds its
profile. With none found, the first lossy encode calibrates the model (kvcli.calibration.calibrate.calibration_for) and
stores the result in the user's directory; with KVCLI_AUTO_CALIBRATE=0 it falls back to uniform steps instead
(docs/codec.md, "Calibration and profiles").

A profile may name a dictionary (`"dictionary"`: its SHA-256): kvq's per-head transform learned under the profile,
kept in the user's cache (kvcli/container/dictionary.py), or for a shipped profile shipped beside it in
profiles/dicts/. It may hold `"scales"`: per lossy preset, the step scale that meets the preset's rate on this
model (kvcli/calibration/scales.py); a preset it does not name uses codecs/presets.py's LOSSY_SCALES. And
`"token_alpha"`: the token weights' alpha those presets code with on this model, chosen with the scales; a profile
without it (made before alphas were chosen) codes them with kvq's DEFAULT_TOKEN_ALPHA, at which its scales were
chosen.
"""

from __future__ import annotations

import hashlib
import json
import os
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..codecs.kvq import Profile
from ..container import dictionary, identity
from ..errors import FormatError

PROFILE_FORMAT = "kvcli-profile"
PROFILE_VERSION = 1
MODEL_FIELDS = dictionary.MODEL_FIELDS  # what a profile and a dictionary record of the model they were made for
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


def to_json(profile: Profile, model_identity: dict, details: dict, dictionary: str | None = None,
            scales: dict[str, float] | None = None, token_alpha: float | None = None) -> dict:
    """The profile's JSON; `dictionary` names the SHA-256 of the dictionary holding kvq's transform learned
    under it (kvcli/calibration/bases.py), where one was; `scales` the presets' step scales for this model and
    `token_alpha` the token weights' alpha they were chosen at."""
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "name": profile.name,
        "model": {k: model_identity[k] for k in MODEL_FIELDS},
        **_numbers(profile),
        **({"dictionary": dictionary} if dictionary is not None else {}),
        **_chosen(scales, token_alpha),
        **details,
    }


def _chosen(scales: dict[str, float] | None, token_alpha: float | None) -> dict:
    """The JSON fields of what calibration chose for the presets, as stored: the ones given, rounded."""
    return {**({"scales": {k: round(float(v), 6) for k, v in sorted(scales.items())}} if scales else {}),
            **({"token_alpha": round(float(token_alpha), 6)} if token_alpha is not None else {})}


@dataclass(frozen=True)
class Stored:
    """A profile as found: its numbers, the dictionary it names (None for a profile without a transform: one
    made before transforms were learned, or with --no-transform), the presets' step scales it sets (empty for a
    profile made before they were chosen) and their token alpha (None: kvq's default), and where it was read."""

    profile: Profile
    model: dict  # MODEL_FIELDS of the model it was made for
    dictionary: str | None
    where: str
    shipped: bool = False
    scales: dict[str, float] = field(default_factory=dict)
    token_alpha: float | None = None

    def scale(self, quality: str) -> float | None:
        """The step scale this profile sets for a preset, or None (the preset's default then)."""
        return self.scales.get(quality)


def from_json(doc: dict, where: str) -> tuple[Profile, dict]:
    stored = _stored(doc, where)
    return stored.profile, stored.model


def _stored(doc: dict, where: str, shipped: bool = False) -> Stored:
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT or doc.get("version") != PROFILE_VERSION:
        raise FormatError(f"{where}: not a kvcli profile of version {PROFILE_VERSION}")
    try:
        sens = np.asarray(doc["sensitivity"], dtype=np.float64)
        weights = [np.asarray(w, dtype=np.float64) for w in doc["key_weights"]] if doc.get("key_weights") else None
        if sens.ndim not in (2, 3) or sens.shape[1] != 2 or not np.isfinite(sens).all():
            raise ValueError("sensitivity must be (layers, 2) or (layers, 2, kv_heads) and finite")
        if weights is not None and (len(weights) != sens.shape[0] or any(w.ndim != 2 for w in weights)):
            raise ValueError("key_weights must hold one (kv_heads, head_dim) array per layer")
        if not isinstance(doc["model"], dict):
            raise ValueError("model must be an object")
        profile = Profile(str(doc["name"]), sens, weights)
        scales = _scales(doc.get("scales", {}))
        alpha = _token_alpha(doc.get("token_alpha"))
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"{where}: malformed profile: {err}") from None
    sha = doc.get("dictionary")
    return Stored(profile, doc["model"], None if sha is None else dictionary.check_sha(sha, f"{where}: malformed profile"),
                  where, shipped, scales, alpha)


def _scales(doc) -> dict[str, float]:
    from ..codecs.presets import LOSSY_SCALES

    if not isinstance(doc, dict):
        raise ValueError("scales must be an object")
    for name, value in doc.items():
        if name not in LOSSY_SCALES:
            raise ValueError(f"scales names {name!r}, which is no lossy preset")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"the scale of {name} must be a finite number above 0")
    return {name: float(value) for name, value in doc.items()}


def _token_alpha(value) -> float | None:
    from ..codecs.kvq import TOKEN_ALPHA_LIMIT

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= TOKEN_ALPHA_LIMIT:
        raise ValueError(f"token_alpha must be a number in [0, {TOKEN_ALPHA_LIMIT}]")
    return float(value)


def save(profile: Profile, model_identity: dict, details: dict, path: Path | None = None,
         dictionary: str | None = None, scales: dict[str, float] | None = None,
         token_alpha: float | None = None) -> Path:
    from ..container.format import atomic_write

    path = path or user_dir() / f"{profile_key(model_identity)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = to_json(profile, model_identity, details, dictionary, scales, token_alpha)
    atomic_write(str(path), [json.dumps(doc, separators=(",", ":")).encode()])
    return path


def update(path: Path, dictionary: str | None = None, scales: dict[str, float] | None = None,
           rate: dict | None = None, token_alpha: float | None = None) -> None:
    """Rewrite a stored profile with another dictionary (its transform learned again) or the presets' scales (and
    what choosing them measured, and the token alpha they were chosen at), the rest kept as it is."""
    from ..container.format import atomic_write
    from ..container import dictionary as dictionary_

    doc = json.loads(Path(path).read_text())
    if dictionary is not None:
        doc["dictionary"] = dictionary_.check_sha(dictionary, str(path))
    doc.update(_chosen(scales, token_alpha))
    if rate is not None:
        doc["rate"] = rate
    atomic_write(str(path), [json.dumps(doc, separators=(",", ":")).encode()])


def read(path: Path) -> Stored:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise FormatError(f"{path}: cannot read profile: {err}") from None
    return _stored(doc, str(path))


def load(path: Path) -> Profile:
    return read(path).profile


def _candidates():
    """(entry, shipped) for every profile, the user's first."""
    if user_dir().is_dir():
        for path in sorted(user_dir().glob("*.json")):
            yield path, False
    for entry in sorted(shipped_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            yield entry, True


def shipped_dir():
    """The profiles shipped inside kvcli; their dictionaries lie in its dictionary.DICT_DIR (ShippedPlace)."""
    return resources.files("kvcli.calibration") / "profiles"


def lookup(model_identity: dict) -> Stored | None:
    """The profile made for exactly this model (same config and weights digests), with the dictionary it
    names, or None."""
    wanted = (model_identity["config_digest"], model_identity["weights_digest"])
    for entry, shipped in _candidates():
        try:
            doc = json.loads(entry.read_text())
            model = doc["model"]
            found = (model["config_digest"], model["weights_digest"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FormatError(f"{entry}: cannot read profile ({err}); delete it or rerun kvcli calibrate") from None
        if found == wanted:
            return _stored(doc, str(entry), shipped)
    return None


def find(model_identity: dict) -> Profile | None:
    """The profile made for exactly this model, or None."""
    stored = lookup(model_identity)
    return None if stored is None else stored.profile
