"""Each lossy preset's step scale chosen per model for the preset's rate (kvcli/calibration/scales.py, issue 20)."""

from __future__ import annotations

import json
import math

import pytest

from kvcli.calibration import bases, calibrate, profiles, scales
from kvcli.codecs.presets import LOSSY_SCALES, TARGET_BITS
from kvcli.errors import FormatError
from kvcli.reuse import pipeline

TEXT = ("Calibration measures which layers of a model are sensitive to errors in the cached keys and values. "
        "Every layer is probed on its own, with coarse quantization, and the change in the next-token "
        "distribution is recorded. ") * 6
OTHER = ("def merge(left, right):\n    out = []\n    while left and right:\n        out.append(left.pop(0) if "
         "left[0] < right[0] else right.pop(0))\n    return out + left + right\n\n") * 8
TEXTS = [("a", TEXT * 2), ("b", OTHER * 2)]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _caches_and_moments(lm, profile, prefix=300):
    from kvcli.calibration import quality
    from kvcli.modeling import inference

    caches = [quality.context(lm, inference.document_ids(lm, text), prefix)[0] for _, text in TEXTS]
    codec = bases.codec_for(lm, profile)
    moments = []
    for kv in caches:
        moments.append(bases.Moments())
        moments[-1].add(codec, kv)
    return caches, moments


def test_each_text_is_coded_with_the_transform_learned_on_the_others(tiny_lm):
    """Leave one out: the dictionary learned on a text codes it smaller than any other document, so its bits would
    set the scale too fine."""
    lm = tiny_lm("llama")
    result = calibrate.calibrate(lm, TEXTS, prefix=300)
    caches, moments = _caches_and_moments(lm, result.profile)
    held = scales.held_out(lm, moments)
    only_b = bases.to_dictionary(moments[1].bases(), lm.identity)
    only_a = bases.to_dictionary(moments[0].bases(), lm.identity)
    both = bases.to_dictionary(bases.Moments.merged(moments).bases(), lm.identity)
    assert [sha for _, sha in held] == [only_b.sha, only_a.sha] and both.sha not in (only_a.sha, only_b.sha)
    assert both.sha == bases.to_dictionary(result.bases, lm.identity).sha  # calibrate's own, from both texts
    # What leaving out buys, on this model: coded with its own text's transform a text looks smaller.
    full = [(t, s) for t, s in scales.held_out(lm, [bases.Moments.merged(moments)])] * 2
    own = scales.bits_per_element(lm, result.profile, "small", 1.5, caches, full)
    assert own < scales.bits_per_element(lm, result.profile, "small", 1.5, caches, held)
    # A single text has no other: it is coded with its own.
    assert [sha for _, sha in scales.held_out(lm, moments[:1])] == [only_a.sha]


def test_merged_moments_are_the_moments_of_every_cache(tiny_lm):
    lm = tiny_lm("qwen2")
    result = calibrate.calibrate(lm, TEXTS, prefix=300)
    caches, moments = _caches_and_moments(lm, result.profile)
    together = bases.Moments()
    for kv in caches:
        together.add(bases.codec_for(lm, result.profile), kv)
    merged = bases.Moments.merged(moments)
    assert merged.counts == together.counts
    assert all((merged.sums[k] - together.sums[k]).abs().max() <= 1e-9 * together.sums[k].abs().max()
               for k in together.sums)
    assert moments[0].counts != merged.counts  # merging copied: the parts are unchanged


@pytest.mark.parametrize("exponent, target", [(0.7, 1.44), (0.3, 0.96), (1.4, 2.4)])
def test_solve_finds_the_scale_of_a_rate(exponent, target):
    calls = []

    def bits(scale):
        calls.append(scale)
        return 2.0 * scale ** -exponent + 0.05

    scale, reached = scales.solve(bits, 1.0, target)
    assert abs(reached / target - 1) <= scales.TOLERANCE and bits(scale) == reached
    assert len(calls) <= scales.MAX_TRIES + 1


def test_solve_returns_the_closest_try_where_the_rate_cannot_be_reached():
    tried = []

    def bits(scale):  # never under 1.2 bits, whatever the step
        tried.append(scale)
        return 1.2 + 1.0 / (1.0 + scale)

    scale, reached = scales.solve(bits, 1.0, 0.5)
    assert len(tried) == scales.MAX_TRIES and reached == min(1.2 + 1.0 / (1.0 + s) for s in tried)


def test_calibration_chooses_each_rated_presets_scale(cli, tiny_lm, tiny_model_dir, cache_dir, tmp_path):
    """`kvcli calibrate` stores per rated preset the scale at which the texts' held-out files come to the preset's
    rate; encoders use it (`high` keeps its own); `--step-scale` multiplies it."""
    lm = tiny_lm("llama")
    paths = []
    for name, text in TEXTS:
        paths += ["--text", tmp_path / f"{name}.txt"]
        paths[-1].write_text(text)
    result = cli("calibrate", "--model", tiny_model_dir("llama"), *paths, "--json")
    assert result.exit_code == 0, result.stderr
    stored = profiles.lookup(lm.identity)
    doc = json.loads(next((cache_dir / "profiles").glob("*.json")).read_text())
    assert sorted(stored.scales) == sorted(TARGET_BITS) and doc["rate"]["held_out"] is True
    ordered = [LOSSY_SCALES["high"]] + [stored.scales[q] for q in ("balanced", "small", "tiny")]
    assert ordered == sorted(ordered)  # finer presets keep finer steps
    # The chosen scales give the rates on the held-out texts (what the profile records they gave).
    caches, moments = _caches_and_moments(lm, stored.profile, calibrate.quality.PREFIX_TOKENS)
    held = scales.held_out(lm, moments)
    for quality, target in TARGET_BITS.items():
        bits = scales.bits_per_element(lm, stored.profile, quality, stored.scales[quality], caches, held,
                                       stored.token_alpha)
        assert abs(bits / target - 1) <= 2 * scales.TOLERANCE, (quality, bits)
        assert math.isclose(bits, doc["rate"]["calibration_bits"][quality], rel_tol=2e-3)
    for quality in TARGET_BITS:
        assert pipeline.codec_for(quality, lm).params()["scale"] == pytest.approx(stored.scales[quality], rel=1e-12)
        assert pipeline.codec_for(quality, lm, 0.5).params()["scale"] == pytest.approx(stored.scales[quality] / 2)
    assert pipeline.codec_for("high", lm).params()["scale"] == LOSSY_SCALES["high"]


def test_calibration_chooses_the_token_alpha_with_the_least_kl_at_the_rate(cli, tiny_lm, tiny_model_dir, cache_dir,
                                                                            tmp_path):
    """Each of ALPHAS is tried at ALPHA_PRESET's rate (its own scale), the least KL kept; the rated presets code
    with it, `high` with kvq's default."""
    from kvcli.calibration import quality
    from kvcli.codecs.kvq import DEFAULT_TOKEN_ALPHA
    from kvcli.modeling import inference

    lm = tiny_lm("llama", seed=3)
    paths = []
    for name, text in TEXTS:
        paths += ["--text", tmp_path / f"{name}.txt"]
        paths[-1].write_text(text)
    result = cli("calibrate", "--model", tiny_model_dir("llama", seed=3), *paths, "--json")
    assert result.exit_code == 0, result.stderr
    stored = profiles.lookup(lm.identity)
    summary = json.loads(result.stdout)
    assert summary["token_alpha"] == stored.token_alpha and summary["scales"] == stored.scales
    tried = json.loads(next((cache_dir / "profiles").glob("*.json")).read_text())["rate"]["alpha_kl"]
    assert sorted(map(float, tried)) == sorted(scales.ALPHAS)
    assert stored.token_alpha == min(scales.ALPHAS, key=lambda a: tried[f"{a:g}"])
    # What the profile records is what those alphas give: recomputed for two of them.
    contexts = [quality.context(lm, inference.document_ids(lm, text)) for _, text in TEXTS]
    caches, moments = _caches_and_moments(lm, stored.profile, quality.PREFIX_TOKENS)
    held = scales.held_out(lm, moments)
    refs = [quality.Reference(kv, feed, targets, inference.logits_after(lm, kv, feed).float())
            for kv, feed, targets in contexts]
    for alpha in scales.ALPHAS[:2]:
        scale, _ = scales.solve(lambda s: scales.bits_per_element(lm, stored.profile, scales.ALPHA_PRESET, s, caches,
                                                                  held, alpha),
                                LOSSY_SCALES[scales.ALPHA_PRESET], TARGET_BITS[scales.ALPHA_PRESET])
        found = scales.kl(lm, stored.profile, scales.ALPHA_PRESET, scale, alpha, refs, held)
        assert math.isclose(found, tried[f"{alpha:g}"], rel_tol=1e-4)
    for quality_ in TARGET_BITS:
        assert pipeline.codec_for(quality_, lm).token_alpha == stored.token_alpha
    assert pipeline.codec_for("high", lm).token_alpha == DEFAULT_TOKEN_ALPHA


def test_a_profile_without_a_token_alpha_codes_at_the_default(tiny_lm, cache_dir, monkeypatch):
    """One made before alphas were chosen has its scales chosen at kvq's default alpha: it keeps coding at it."""
    from kvcli.codecs.kvq import DEFAULT_TOKEN_ALPHA

    monkeypatch.setenv("KVCLI_AUTO_CALIBRATE", "1")
    lm = tiny_lm("llama", seed=4)
    path = calibrate.store(lm, calibrate.calibrate(lm, TEXTS, prefix=300))
    doc = json.loads(path.read_text())
    doc["token_alpha"] = max(scales.ALPHAS)
    path.write_text(json.dumps(doc))
    assert pipeline.codec_for("small", lm).token_alpha == max(scales.ALPHAS)
    del doc["token_alpha"]
    path.write_text(json.dumps(doc))
    codec = pipeline.codec_for("small", lm)
    assert codec.token_alpha == DEFAULT_TOKEN_ALPHA and codec.params()["token_alpha"] == DEFAULT_TOKEN_ALPHA
    assert "token_alpha" not in json.loads(path.read_text())  # its scales are kept: nothing to choose again


def test_a_profile_without_scales_gets_them_once(tiny_lm, cache_dir, monkeypatch, capsys):
    """A user's profile made before the scales were chosen: the first encode chooses them on the bundled texts and
    stores them in it; with automatic calibration off its presets keep kvcli's default scales."""
    monkeypatch.setenv("KVCLI_AUTO_CALIBRATE", "1")
    lm = tiny_lm("llama", seed=5)
    path = calibrate.store(lm, calibrate.calibrate(lm, calibrate.default_texts()))
    wanted = profiles.read(path).scales
    alpha = profiles.read(path).token_alpha
    doc = json.loads(path.read_text())
    del doc["scales"], doc["rate"], doc["token_alpha"]
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("KVCLI_AUTO_CALIBRATE", "0")
    assert pipeline.codec_for("small", lm).params()["scale"] == LOSSY_SCALES["small"]
    assert "scales" not in json.loads(path.read_text())
    monkeypatch.setenv("KVCLI_AUTO_CALIBRATE", "1")
    capsys.readouterr()
    assert pipeline.codec_for("small", lm).params()["scale"] == pytest.approx(wanted["small"], rel=1e-12)
    assert capsys.readouterr().err.count("chose the presets' token alpha and scales") == 1
    assert profiles.read(path).scales == wanted and profiles.read(path).token_alpha == alpha
    pipeline.codec_for("tiny", lm)
    assert "chose" not in capsys.readouterr().err  # once


def test_a_profile_learned_on_other_texts_gets_scales_from_the_bundled_ones(tiny_lm, cache_dir, monkeypatch, capsys):
    """Its transform never saw the bundled texts: they are held out already, and are coded with it."""
    from kvcli.calibration import quality
    from kvcli.codecs.transform import Transforms
    from kvcli.container import dictionary
    from kvcli.modeling import inference

    monkeypatch.setenv("KVCLI_AUTO_CALIBRATE", "1")
    lm = tiny_lm("llama", seed=6)
    path = calibrate.store(lm, calibrate.calibrate(lm, TEXTS, prefix=300))
    stored = profiles.read(path)
    doc = json.loads(path.read_text())
    del doc["scales"], doc["rate"], doc["token_alpha"]
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    pipeline.codec_for("balanced", lm)
    assert capsys.readouterr().err.count("chose the presets' token alpha and scales") == 1
    again = profiles.read(path)
    assert again.dictionary == stored.dictionary and json.loads(path.read_text())["rate"]["held_out"] is True
    own = dictionary.find(stored.dictionary, dictionary.own_places(), "test")
    caches = [quality.context(lm, inference.document_ids(lm, t))[0] for _, t in calibrate.default_texts()]
    coded = [(Transforms.unpack(own.payload), own.sha)] * len(caches)
    for q, target in TARGET_BITS.items():
        bits = scales.bits_per_element(lm, again.profile, q, again.scales[q], caches, coded, again.token_alpha)
        assert abs(bits / target - 1) <= 2 * scales.TOLERANCE, (q, bits)


def test_the_shipped_profile_sets_every_rated_presets_scale(default_lm):
    stored = profiles.lookup(default_lm.identity)
    assert stored.shipped and sorted(stored.scales) == sorted(TARGET_BITS)
    assert pipeline.codec_for("small", default_lm).params()["scale"] == stored.scales["small"]


@pytest.mark.parametrize("value, message", [
    ({"medium": 1.0}, "scales names 'medium', which is no lossy preset"),
    ({"small": -1.0}, "the scale of small must be a finite number above 0"),
    ({"small": True}, "the scale of small must be a finite number above 0"),
    ({"small": "1.5"}, "the scale of small must be a finite number above 0"),
    ([1.0], "scales must be an object"),
])
def test_malformed_scales_are_refused(value, message):
    doc = {"format": "kvcli-profile", "version": 1, "name": "x", "model": {}, "sensitivity": [[1.0, 2.0]],
           "key_weights": None, "scales": value}
    with pytest.raises(FormatError, match=f"p.json: malformed profile: {message}"):
        profiles.from_json(doc, "p.json")
    doc["scales"] = {"small": 1.25}
    assert profiles._stored(doc, "p.json").scales == {"small": 1.25}


@pytest.mark.parametrize("value", [-0.1, 4.5, True, "0.3", [0.3], float("nan")])
def test_a_malformed_token_alpha_is_refused(value):
    doc = {"format": "kvcli-profile", "version": 1, "name": "x", "model": {}, "sensitivity": [[1.0, 2.0]],
           "key_weights": None, "token_alpha": value}
    with pytest.raises(FormatError, match=r"p.json: malformed profile: token_alpha must be a number in \[0, 4\]"):
        profiles.from_json(doc, "p.json")
    doc["token_alpha"] = 0.45
    assert profiles._stored(doc, "p.json").token_alpha == 0.45
