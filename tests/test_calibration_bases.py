"""kvq's per-head transform learned by calibration (kvcli/calibration/bases.py, issue 20)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from kvcli.codecs.kvq import Profile

from kvcli.calibration import bases, calibrate, profiles
from kvcli.container import dictionary
from kvcli.modeling import inference

TEXT = ("Calibration measures which layers of a model are sensitive to errors in the cached keys and values. "
        "Every layer is probed on its own, with coarse quantization, and the change in the next-token "
        "distribution is recorded. ") * 6
OTHER = ("def merge(left, right):\n    out = []\n    while left and right:\n        out.append(left.pop(0) if "
         "left[0] < right[0] else right.pop(0))\n    return out + left + right\n\n") * 8


def _profile(layers: int, heads: int, dim: int, seed: int = 0, flat_keys: bool = False) -> Profile:
    rng = np.random.default_rng(seed)
    weights = None if flat_keys else [rng.uniform(0.05, 20.0, (heads, dim)) for _ in range(layers)]
    return Profile("test", rng.uniform(0.01, 1.0, (layers, 2, heads)), weights)


def _covariances(lm, profile, text, prefix=300):
    """Per (layer, kind): per head the second moment of the codec's unit-step values on `text`."""
    moments = bases.Moments()
    kv = calibrate.quality.context(lm, inference.document_ids(lm, text), prefix)[0]
    moments.add(bases.codec_for(lm, profile), kv)
    return {key: (total / moments.counts[key]).numpy() for key, total in moments.sums.items()}


def _off_diagonal(c: np.ndarray) -> float:
    """Energy off the diagonal relative to the whole, over the heads of a (heads, D, D) stack."""
    return float(sum((m**2).sum() - (np.diag(m) ** 2).sum() for m in c) / sum((m**2).sum() for m in c))


def test_unit_space_is_where_the_codec_rounds(tiny_lm):
    """The space the bases are fitted in is the encoder's: rounding it gives the codec's own integers (keys
    pre-RoPE, the profile's key weights, the token weights from attention)."""
    lm = tiny_lm("llama")
    profile = _profile(4, 2, 16)
    codec = bases.codec_for(lm, profile)
    kv = calibrate.quality.context(lm, inference.document_ids(lm, TEXT), 300)[0]
    assert kv.attention is not None
    for layer in (0, 3):
        for kind, x in enumerate((kv.keys[layer], kv.values[layer])):
            u = bases.unit_space(codec, x, layer, kind, kv.token_start(layer), kv.attention[layer])
            _, q, weights, _ = codec._fit_one(x, layer, kind, kv.token_start(layer), kv.attention[layer], tables=False)
            assert weights is not None and u.shape == q.shape and u.abs().max() > 4
            differ = torch.round(u) != q.double()
            # float64 here against the codec's float32: only values within float32 rounding of a half may differ
            assert differ.float().mean() < 1e-3 and ((u[differ].abs() % 1) - 0.5).abs().le(1e-4).all()


def test_the_space_does_not_follow_the_presets_alpha_or_cap(tiny_lm, monkeypatch):
    """The bases' space is balanced's at kvq's default alpha with every token exponent: a preset's cap or a model's
    alpha (encoder policy) must not change a profile's dictionary, or leaving a text out would no longer find it."""
    from kvcli.codecs import presets
    from kvcli.codecs.kvq import DEFAULT_TOKEN_ALPHA, TOKEN_EXPONENT_LIMIT

    lm = tiny_lm("llama")
    profile = calibrate.calibrate(lm, [("t", TEXT)], prefix=120).profile
    codec = bases.codec_for(lm, profile)
    assert codec.token_coarsest == TOKEN_EXPONENT_LIMIT and codec.token_alpha == DEFAULT_TOKEN_ALPHA
    before = bases.learn_bases(lm, profile, [("t", TEXT)])
    monkeypatch.setitem(presets.TOKEN_COARSEST, bases.PRESET, 0)
    after = bases.learn_bases(lm, profile, [("t", TEXT)])
    assert all(np.array_equal(before[key][0], after[key][0]) for key in before)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bases_are_orthonormal_by_decreasing_variance_and_decorrelate(tiny_lm, arch):
    lm = tiny_lm(arch)
    cfg = lm.model.config.get_text_config(decoder=True)
    heads, dim = cfg.num_key_value_heads, cfg.head_dim
    profile = _profile(cfg.num_hidden_layers, heads, dim)
    learned = bases.learn_bases(lm, profile, [("a", TEXT), ("b", OTHER)], prefix=300)
    assert sorted(learned) == [(layer, kind) for layer in range(cfg.num_hidden_layers) for kind in (0, 1)]
    fitted = _covariances(lm, profile, TEXT)
    other = _covariances(lm, profile, OTHER)
    shrink = []
    for key, (b, var) in learned.items():
        assert b.shape == (heads, dim, dim) and var.shape == (heads, dim) and b.dtype == var.dtype == np.float64
        assert np.allclose(b.transpose(0, 2, 1) @ b, np.eye(dim), atol=1e-10)
        assert (np.diff(var, axis=1) <= 0).all() and (var >= 0).all() and var[:, 0].min() > 0
        rows = np.abs(b).argmax(axis=1)  # each column's sign is fixed: its largest entry is positive
        assert (np.take_along_axis(b, rows[:, None, :], axis=1) > 0).all()
        # Both texts' second moments together are diagonal in the basis, with the variances on the diagonal
        # (the texts hold about as many tokens each); each text's alone is much closer to diagonal than it was
        # (measured 0.04-0.50 of the off-diagonal energy, 0.25 on average).
        rotated = b.transpose(0, 2, 1) @ ((fitted[key] + other[key]) / 2) @ b
        assert _off_diagonal(rotated) < 0.01 and np.allclose(np.diagonal(rotated, axis1=1, axis2=2), var, rtol=0.2)
        shrink += [_off_diagonal(b.transpose(0, 2, 1) @ c @ b) / _off_diagonal(c) for c in (fitted[key], other[key])]
    assert max(shrink) < 0.65 and np.mean(shrink) < 0.35


def test_bases_follow_the_profiles_key_weights(tiny_lm):
    """Key weights rescale channels, which turns the eigenvectors: a basis fitted without them leaves the
    weighted space's keys correlated, while values (no per-channel weights) get the same basis."""
    lm = tiny_lm("llama")
    weighted, flat = _profile(4, 2, 16), _profile(4, 2, 16, flat_keys=True)
    texts = [("a", TEXT)]
    mine, theirs = bases.learn_bases(lm, weighted, texts, 300), bases.learn_bases(lm, flat, texts, 300)
    cov = _covariances(lm, weighted, TEXT)
    for layer in range(4):
        keys = cov[(layer, 0)]
        right = _off_diagonal(mine[(layer, 0)][0].transpose(0, 2, 1) @ keys @ mine[(layer, 0)][0])
        wrong = _off_diagonal(theirs[(layer, 0)][0].transpose(0, 2, 1) @ keys @ theirs[(layer, 0)][0])
        assert right < 1e-12 and wrong > 1e-3, (right, wrong)
        assert np.allclose(np.abs(mine[(layer, 1)][0]), np.abs(theirs[(layer, 1)][0]), atol=1e-6)


def test_calibrate_fits_the_transform_on_its_own_caches(tiny_lm):
    """calibrate() learns the bases from the caches it prefilled, under the profile it made (as stored): the
    same numbers as learn_bases running its own prefills."""
    lm = tiny_lm("qwen2")
    texts = [("a", TEXT * 2), ("b", OTHER * 2)]
    result = calibrate.calibrate(lm, texts, prefix=300)
    again = bases.learn_bases(lm, result.profile, texts, 300)
    assert sorted(result.bases) == sorted(again)
    for key, (b, var) in result.bases.items():
        assert np.allclose(b, again[key][0], atol=1e-8) and np.allclose(var, again[key][1], rtol=1e-8)
    assert calibrate.calibrate(lm, texts[:1], prefix=300, transform=False).bases is None


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _calibrate(cli, model_dir, tmp_path, *extra):
    doc = tmp_path / "calib.txt"
    doc.write_text(TEXT * 2)
    result = cli("calibrate", "--model", model_dir, "--text", doc, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_calibrate_writes_the_dictionary_its_profile_names(cli, tiny_lm, tiny_model_dir, cache_dir, tmp_path):
    from kvcli.codecs.transform import SCALE_BITS, Transforms

    lm = tiny_lm("llama")
    summary = _calibrate(cli, tiny_model_dir("llama"), tmp_path)
    sha = summary["dictionary"]
    stored = profiles.lookup(lm.identity)
    assert stored is not None and stored.dictionary == sha and not stored.shipped
    assert json.loads(next((cache_dir / "profiles").glob("*.json")).read_text())["dictionary"] == sha
    assert [p.name for p in (cache_dir / dictionary.DICT_DIR).iterdir()] == [f"{sha}.kvd"]
    found = dictionary.find(sha, dictionary.own_places(), "test")
    dictionary.check_model(found, lm.identity, "test")
    matrices = Transforms.unpack(found.payload).matrices
    assert sorted(matrices) == [(layer, kind) for layer in range(4) for kind in (0, 1)]
    # The profile's transform: the bases learn_bases fits under it on the same text, as int16 matrices.
    learned = bases.learn_bases(lm, stored.profile, [("calib.txt", TEXT * 2)])
    for key, m in matrices.items():
        assert m.shape == (2, 16, 16) and np.abs(m / 2**SCALE_BITS - learned[key][0]).max() <= 2**-SCALE_BITS
    # Without the transform: no dictionary, and the profile names none.
    shutil.rmtree(cache_dir)
    assert _calibrate(cli, tiny_model_dir("llama"), tmp_path, "--no-transform")["dictionary"] is None
    assert profiles.lookup(lm.identity).dictionary is None and not (cache_dir / dictionary.DICT_DIR).exists()


def test_a_missing_dictionary_is_learned_again_or_refused(cli, tiny_lm, tiny_model_dir, cache_dir, tmp_path,
                                                        monkeypatch, capsys, doc_file):
    """A profile naming a dictionary that is gone: with automatic calibration on, its transform is learned again
    from the stored profile (on the bundled texts); with it off, encoding refuses, naming the dictionary and
    where it looked (exit 4)."""
    lm = tiny_lm("llama")
    sha = _calibrate(cli, tiny_model_dir("llama"), tmp_path)["dictionary"]
    path = cache_dir / dictionary.name_of(sha)
    path.unlink()
    monkeypatch.setenv("KVCLI_AUTO_CALIBRATE", "0")
    with pytest.raises(dictionary.DictionaryMissing, match=sha):
        calibrate.calibration_for(lm)
    result = cli("prefill", doc_file, "-o", tmp_path / "x.kvc", "--model", tiny_model_dir("llama"), "-q", "small")
    assert result.exit_code == 4 and not (tmp_path / "x.kvc").exists()
    assert result.stderr.startswith("Error: profile ") and sha in result.stderr
    assert str(cache_dir / dictionary.DICT_DIR) in result.stderr and "kvcli's shipped dictionaries" in result.stderr
    # A preset that codes without the transform does not need it.
    result = cli("prefill", doc_file, "-o", tmp_path / "b.kvc", "--model", tiny_model_dir("llama"), "-q", "high")
    assert result.exit_code == 0, result.stderr
    monkeypatch.setenv("KVCLI_AUTO_CALIBRATE", "1")
    capsys.readouterr()
    stored = calibrate.calibration_for(lm)
    assert "dictionary of" in capsys.readouterr().err and stored.dictionary is not None
    relearned = dictionary.find(stored.dictionary, dictionary.own_places(), "test")
    assert relearned.where.startswith(str(cache_dir))
    assert profiles.lookup(lm.identity).dictionary == stored.dictionary  # the profile names what was written
    again = calibrate.calibration_for(lm)
    assert (again.dictionary, again.where) == (stored.dictionary, stored.where)
    assert "dictionary of" not in capsys.readouterr().err  # learned once


def test_the_shipped_profile_names_its_shipped_dictionary(default_lm):
    """The default model's transform ships with kvcli (scripts/ship-dictionary.py made it from the shipped
    profile), so its files decode on any machine."""
    from kvcli.codecs.transform import Transforms

    stored = profiles.lookup(default_lm.identity)
    assert stored.shipped and stored.dictionary is not None
    found = dictionary.find(stored.dictionary, [dictionary.ShippedPlace()], "test")
    dictionary.check_model(found, default_lm.identity, "test")
    matrices = Transforms.unpack(found.payload).matrices
    assert len(matrices) == 60 and all(m.shape == (3, 64, 64) for m in matrices.values())


def test_files_coded_with_the_learned_transform_are_smaller(tiny_lm, cache_dir, tmp_path):
    """What calibration stores is what kvq version 4 codes with: a file written with the stored dictionary's
    transform names it, gets it beside itself, decodes through it, and on text like the calibration's is smaller
    at no worse KL (measured on the tiny Llama: 8% smaller at `small`, KL 0.00026 against 0.00033)."""
    from kvcli.codecs.presets import make_codec
    from kvcli.codecs.transform import Transforms
    from kvcli.container import format
    from kvcli.modeling.rope import inv_freq_per_layer
    from kvcli.reuse import pipeline

    lm = tiny_lm("llama")
    path = calibrate.store(lm, calibrate.calibrate(lm, [("a", TEXT * 2), ("b", OTHER * 2)], prefix=300))
    stored = profiles.read(path)
    found = dictionary.find(stored.dictionary, dictionary.own_places(), "test")
    ref = calibrate.quality.reference(lm, inference.document_ids(lm, OTHER * 2), prefix=300, continuation=64)
    # What every command's codec is (pipeline.codec_for): the preset through the stored profile's transform.
    coded = pipeline.codec_for("small", lm)
    assert coded.dictionary == found.sha and coded.version == 4
    assert coded.transforms.pack() == Transforms.unpack(found.payload).pack()
    plain = pipeline.codec_for("small", lm, transform=False)
    assert plain.transforms is None and plain.dictionary is None
    plain = make_codec("small", stored.profile, inv_freq_per_layer(lm.model), version=4,  # the same bands and steps
                       base_scale=stored.scale("small"))
    sizes, kls = [], []
    for name, codec in (("plain", plain), ("coded", coded)):
        out = tmp_path / "out" / f"{name}.kvc"
        out.parent.mkdir(exist_ok=True)
        sizes.append(pipeline.write_cache(str(out), ref.kv, lm.identity, codec, 256))
        with format.FileSource(out) as src:
            header = format.read_header(src)
            kls.append(calibrate.quality.compare(lm, ref, pipeline.load_cache(src, header, lm).kv).kl)
        assert header.codec["params"].get("dictionary") == (found.sha if name == "coded" else None)
    assert (tmp_path / "out" / dictionary.name_of(found.sha)).read_bytes() == found.data
    assert sizes[1] < 0.95 * sizes[0] and kls[1] < 1.2 * kls[0]


def test_heads_wider_than_the_transform_takes_are_left_out():
    """kvq's exact inverse holds up to transform.MAX_DIM: wider heads are coded without a transform, and a
    model with only those gets no dictionary."""
    from kvcli.codecs.transform import MAX_DIM, Transforms

    identity = {"architecture": "a", "name": "n", "config_digest": "c", "weights_digest": "w"}
    wide = (np.eye(MAX_DIM + 2)[None], np.ones((1, MAX_DIM + 2)))
    narrow = (np.eye(8)[None].repeat(2, 0), np.ones((2, 8)))
    found = bases.to_dictionary({(0, 0): wide, (0, 1): narrow}, identity)
    assert sorted(Transforms.unpack(found.payload).matrices) == [(0, 1)] and found.model["name"] == "n"
    assert bases.to_dictionary({(0, 0): wide}, identity) is None


def test_the_cli_writes_names_and_checks_a_files_dictionary(cli, tiny_model_dir, cache_dir, tmp_path, doc_file,
                                                            monkeypatch):
    """prefill puts the dictionary beside the file first; inspect names it; verify says where it found it, and
    elsewhere which one is missing and every place looked in (exit 4); encode --self-contained and a file written
    to stdout carry their own."""
    model = tiny_model_dir("llama")
    sha = _calibrate(cli, model, tmp_path)["dictionary"]
    out = tmp_path / "out"
    out.mkdir()
    small, high = out / "small.kvc", out / "high.kvc"
    for path, quality in ((small, "small"), (high, "high")):
        result = cli("prefill", doc_file, "-o", path, "--model", model, "-q", quality)
        assert result.exit_code == 0, result.stderr
    assert (out / dictionary.name_of(sha)).read_bytes() == (cache_dir / dictionary.name_of(sha)).read_bytes()
    info = json.loads(cli("inspect", small, "--json").stdout)
    assert info["dictionary"] == {"sha256": sha, "embedded": False, "name": f"dicts/{sha}.kvd"}
    assert f"dictionary   {sha} (dicts/{sha}.kvd, not embedded: from the file's store or directory, or a cache)\n" in cli("inspect", small).stdout
    assert json.loads(cli("inspect", high, "--json").stdout)["dictionary"] is None  # high codes without it
    assert cli("verify", small).stdout == f"{small}: ok ({info['segments']} segments, dictionary {sha[:16]}… from " \
                                          f"{out}/dicts/{sha}.kvd)\n"
    # On a machine without it, the file beside nothing: which dictionary, every place looked in, exit 4.
    (out / dictionary.name_of(sha)).unlink()
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "elsewhere"))
    result = cli("verify", small)
    assert result.exit_code == 4 and result.stdout == ""
    assert result.stderr == (f"Error: {small}: its dictionary {sha} is missing: looked in {out}/dicts, "
                             f"{tmp_path}/elsewhere/dicts, kvcli's shipped dictionaries\n")
    assert cli("verify", high).exit_code == 0  # a file that needs none stays self-contained
    # A file sent alone: encode --self-contained embeds it, and a file written to stdout always does.
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(cache_dir))
    exported = tmp_path / "x.safetensors"
    assert cli("decode", small, "-o", exported).exit_code == 0
    alone = tmp_path / "alone" / "x.kvc"
    alone.parent.mkdir()
    result = cli("encode", exported, "-o", alone, "--model", model, "-q", "small", "--self-contained")
    assert result.exit_code == 0, result.stderr
    piped = cli("prefill", doc_file, "-o", "-", "--model", model, "-q", "small").stdout_bytes
    (tmp_path / "alone" / "piped.kvc").write_bytes(piped)
    assert not (tmp_path / "alone" / "dicts").exists()
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "elsewhere"))
    for path in (alone, tmp_path / "alone" / "piped.kvc"):
        assert json.loads(cli("inspect", path, "--json").stdout)["dictionary"]["embedded"] is True
        result = cli("verify", path)
        assert result.exit_code == 0 and result.stdout.endswith(f"dictionary {sha[:16]}… from {path} (embedded))\n")
