"""Composed caches: keys moved exactly, one BOS, full recomputation equal to a prefill of the concatenation, and
refusals of what cannot be composed."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, byte_tokenizer, config_for

from kvcli.errors import InputError, ModelMismatchError, UsageError
from kvcli.modeling import inference, models
from kvcli.modeling.rope import shift_keys
from kvcli.reuse import compose

DOCS = ("The harbour town of Velmora sits between two cliffs, and its lighthouse is older than the town.",
        "Trains leave the valley station every hour; the last one goes at eleven.",
        "Owls nest in the clock tower.")
PROMPT = " Where do the owls nest?"
FULL_ATTENTION = ("llama", "qwen2", "mistral")


def parts(lm):
    """Each document's own cache, and the tokens of their concatenation with the leading BOS of all but the first
    removed: what the composed cache must hold."""
    ids = [inference.document_ids(lm, t) for t in DOCS]
    bos = compose.leading_bos(lm)
    joined = ids[0] + [t for doc in ids[1:] for t in (doc[1:] if bos is not None else doc)]
    return [inference.prefill(lm, i) for i in ids], joined


def composed(lm):
    caches, joined = parts(lm)
    return compose.compose_caches(lm, caches, [f"doc{j}" for j in range(len(caches))]), joined


def max_error(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.keys + a.values, b.keys + b.values))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_composition_places_every_token_as_a_prefill_of_the_concatenation(arch, tiny_lm):
    """Layer 0 sees no other token, so there the composed cache must equal the prefill of the concatenation; later
    layers must equal it for the first document, which saw exactly its own context."""
    lm = tiny_lm(arch)
    kv, joined = composed(lm)
    ref = inference.prefill(lm, joined)
    assert kv.token_ids == joined
    assert [k.shape for k in kv.keys] == [k.shape for k in ref.keys]
    assert [kv.token_start(i) for i in range(kv.num_layers)] == [ref.token_start(i) for i in range(ref.num_layers)]
    assert torch.allclose(kv.keys[0], ref.keys[0], atol=1e-5, rtol=0)
    assert torch.allclose(kv.values[0], ref.values[0], atol=1e-5, rtol=0)
    first = len(inference.document_ids(lm, DOCS[0]))
    for i in range(kv.num_layers):
        if kv.token_start(i) == 0:
            assert torch.allclose(kv.keys[i][:, :first], ref.keys[i][:, :first], atol=1e-5, rtol=0)


@pytest.mark.parametrize("texts", [(DOCS[0], "Hi.", "Yes"), ("Hi.", DOCS[0], DOCS[1])])
def test_sliding_window_across_documents(texts, tiny_lm):
    """The window reaches back over last documents shorter than it, whose own sliding layers hold their BOS, and
    covers only the last document when that one is longer, whose sliding layers do not hold its BOS: layer 0
    (sliding) equals the prefill of the concatenation either way."""
    lm = tiny_lm("gemma3")
    ids = [inference.document_ids(lm, t) for t in texts]
    kv = compose.compose_caches(lm, [inference.prefill(lm, i) for i in ids], ["a", "b", "c"])
    ref = inference.prefill(lm, ids[0] + ids[1][1:] + ids[2][1:])
    assert kv.keys[0].shape == ref.keys[0].shape and kv.token_start(0) == ref.token_start(0) > 0
    assert torch.allclose(kv.keys[0], ref.keys[0], atol=1e-5, rtol=0)
    assert torch.allclose(kv.values[0], ref.values[0], atol=1e-5, rtol=0)


def test_composition_keeps_one_bos(tiny_lm):
    lm = tiny_lm("llama")
    kv, _ = composed(lm)
    assert compose.leading_bos(lm) == 0
    assert kv.token_ids.count(0) == 1 and kv.token_ids[0] == 0
    assert compose.leading_bos(tiny_lm("qwen2")) is None


def test_cross_document_attention_is_the_loss(tiny_lm):
    """Guards the tests above: past layer 0 the later documents differ from the prefill of the concatenation."""
    lm = tiny_lm("llama")
    kv, joined = composed(lm)
    ref = inference.prefill(lm, joined)
    assert (kv.keys[-1] - ref.keys[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", FULL_ATTENTION)
def test_full_recomputation_equals_prefill_of_the_concatenation(arch, tiny_lm):
    lm = tiny_lm(arch)
    kv, joined = composed(lm)
    blend = compose.recompute_tokens(lm, kv, 1.0)
    ref = inference.prefill(lm, joined)
    assert blend.recomputed == list(range(len(joined)))
    assert max_error(blend.kv, ref) < 1e-4
    prompt = inference.prompt_ids(lm, PROMPT)
    logits = inference.logits_after(lm, blend.kv, prompt)
    assert torch.allclose(logits, inference.logits_after(lm, None, joined + prompt)[len(joined):], atol=1e-4, rtol=0)


def test_no_recomputation_is_plain_composition(tiny_lm):
    lm = tiny_lm("llama")
    kv, _ = composed(lm)
    blend = compose.recompute_tokens(lm, kv, 0.0)
    assert blend.recomputed == [] and blend.kv is kv


def test_partial_recomputation_picks_later_documents_and_closes_part_of_the_gap(tiny_lm):
    """The first document's keys are exact, so the tokens picked lie after it; recomputing them brings the last
    layer closer to the prefill of the concatenation."""
    lm = tiny_lm("llama")
    kv, joined = composed(lm)
    ref = inference.prefill(lm, joined)
    blend = compose.recompute_tokens(lm, kv, 0.3)
    first = len(inference.document_ids(lm, DOCS[0]))
    assert len(blend.recomputed) == -(-3 * len(joined) // 10)
    assert min(blend.recomputed) >= first
    assert blend.recomputed == sorted(set(blend.recomputed))
    assert torch.equal(blend.kv.keys[0], ref.keys[0])  # layer 0 is recomputed for every token
    rows = torch.tensor(blend.recomputed)
    untouched = torch.ones(len(joined), dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(blend.kv.values[2][:, untouched], kv.values[2][:, untouched])
    before = (kv.keys[-1] - ref.keys[-1]).abs().mean()
    after = (blend.kv.keys[-1] - ref.keys[-1]).abs().mean()
    assert after < 0.8 * before
    assert compose.recompute_tokens(lm, kv, 0.3).recomputed == blend.recomputed  # deterministic


def test_fraction_outside_zero_to_one_is_refused(tiny_lm):
    lm = tiny_lm("llama")
    kv, _ = composed(lm)
    for fraction in (-0.1, 1.5):
        with pytest.raises(UsageError, match="between 0 and 1"):
            compose.recompute_tokens(lm, kv, fraction)


def test_recomputation_is_refused_for_sliding_window_layers(tiny_lm):
    lm = tiny_lm("gemma3")
    kv, _ = composed(lm)
    with pytest.raises(UsageError, match="sliding-window layers"):
        compose.recompute_tokens(lm, kv, 0.15)


def test_recomputation_needs_a_masked_attention(tiny_model_dir):
    lm = models.load(str(tiny_model_dir("llama")), "float32")
    lm.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UsageError, match="needs sdpa or eager"):
        compose.check_recomputable(lm)


def test_shift_keys_composes_and_inverts():
    torch.manual_seed(0)
    keys = torch.randn(2, 5, 16)
    freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert shift_keys(keys, freq, 0) is keys
    assert torch.allclose(shift_keys(shift_keys(keys, freq, 300), freq, -300), keys, atol=1e-5)
    assert torch.allclose(shift_keys(shift_keys(keys, freq, 100), freq, 200), shift_keys(keys, freq, 300), atol=1e-5)
    half = shift_keys(keys.to(torch.bfloat16), freq, 7)
    assert half.dtype == torch.bfloat16


def model_dir(tmp_path, config, add_bos=True):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    byte_tokenizer(add_bos=add_bos).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_scaled_rope_is_moved_exactly(rope, tmp_path):
    config = config_for("llama")
    config.rope_parameters = {"rope_theta": 10000.0, **rope}
    lm = models.load(model_dir(tmp_path, config), "float32")
    kv, joined = composed(lm)
    assert torch.allclose(kv.keys[0], inference.prefill(lm, joined).keys[0], atol=1e-5, rtol=0)


def test_context_dependent_rope_is_refused(tmp_path):
    config = config_for("llama")
    config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0}
    lm = models.load(model_dir(tmp_path, config), "float32")
    with pytest.raises(ModelMismatchError, match="rope scaling 'dynamic'"):
        composed(lm)


def test_partial_rotary_is_refused(tmp_path):
    from transformers import PhiConfig

    config = PhiConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5)
    lm = models.load(model_dir(tmp_path, config, add_bos=False), "float32")
    with pytest.raises(ModelMismatchError, match="rotates 8 of 16 key dimensions"):
        compose.rope_frequencies(lm)


def test_unknown_rope_layout_is_refused(tmp_path):
    from transformers import CohereConfig

    config = CohereConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    lm = models.load(model_dir(tmp_path, config, add_bos=False), "float32")
    with pytest.raises(ModelMismatchError, match="this is a cohere model"):
        compose.rope_frequencies(lm)


def test_composed_length_is_checked(tiny_lm):
    lm = tiny_lm("llama")
    ids = inference.document_ids(lm, "x" * 300)
    with pytest.raises(InputError, match="the context composed of 2 caches is 601 tokens, longer than the "
                                         "model's context of 512"):
        compose.plan_composition(lm, [ids, ids], ["a", "b"])


def test_a_bos_alone_is_refused(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(InputError, match="b: holds only a BOS token"):
        compose.plan_composition(lm, [[0, 70], [0]], ["a", "b"])


# The command line.

def prefill_docs(cli, model, tmp_path, quality="lossless", docs=DOCS):
    paths = []
    for j, text in enumerate(docs):
        doc = tmp_path / f"doc{j}.txt"
        doc.write_text(text)
        out = tmp_path / f"doc{j}.kvc"
        result = cli("prefill", doc, "-o", out, "--model", model, "-q", quality, "--chunk-tokens", "16")
        assert result.exit_code == 0, result.stderr
        paths.append(out)
    return paths


def cache_args(paths):
    return [arg for p in paths for arg in ("--cache", p)]


def one_line_error(result, code: int, fragment: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr


def test_cli_full_recomputation_answers_as_the_concatenated_document(cli, llama, tmp_path):
    """With a byte tokenizer, the concatenated text tokenizes to the concatenated tokens: the reference."""
    paths = prefill_docs(cli, llama, tmp_path)
    joined = tmp_path / "joined.txt"
    joined.write_text("".join(DOCS))
    full = cli("generate", "--document", joined, "--model", llama, "-n", "12", PROMPT)
    blended = cli("generate", *cache_args(paths), "--recompute-fraction", "1", "-n", "12", "--model", llama, PROMPT)
    assert full.exit_code == 0 and blended.exit_code == 0, blended.stderr
    assert blended.stdout == full.stdout and full.stdout.strip()
    plain = cli("generate", *cache_args(paths), "-n", "12", "--model", llama, "--json", PROMPT)
    assert plain.exit_code == 0, plain.stderr
    assert __import__("json").loads(plain.stdout)["context_tokens"] == len(joined.read_bytes()) + 1


def test_cli_composes_lossy_caches(cli, llama, tmp_path):
    paths = prefill_docs(cli, llama, tmp_path, quality="balanced")
    result = cli("generate", *cache_args(paths), "--recompute-fraction", "0.15", "-n", "4", "--model", llama, PROMPT)
    assert result.exit_code == 0, result.stderr


def test_cli_refuses_a_cache_of_another_model(cli, llama, tiny_model_dir, tmp_path):
    ours = prefill_docs(cli, llama, tmp_path)[:1]
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    theirs = prefill_docs(cli, str(tiny_model_dir("llama", seed=1)), other_dir)[1:2]
    one_line_error(cli("generate", *cache_args(ours + theirs), "--model", llama, PROMPT), 6,
                   f"{theirs[0]}: made by a different model")


def test_cli_refuses_a_model_without_rope(cli, tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=258, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                        eos_token_id=1)
    gpt2 = model_dir(tmp_path / "gpt2", config, add_bos=False)
    paths = prefill_docs(cli, gpt2, tmp_path)
    one_line_error(cli("generate", *cache_args(paths), "--model", gpt2, PROMPT), 6,
                   "no rotary position embedding (RoPE)")
    assert cli("generate", *cache_args(paths[:1]), "--model", gpt2, "-n", "2", PROMPT).exit_code == 0


def test_cli_recompute_fraction_is_checked(cli, llama, tmp_path):
    paths = prefill_docs(cli, llama, tmp_path, docs=DOCS[:1])
    assert cli("generate", *cache_args(paths), "--recompute-fraction", "1.5", "--model", llama, PROMPT).exit_code == 2
    one_line_error(cli("generate", "--document", tmp_path / "doc0.txt", "--recompute-fraction", "0.1",
                       "--model", llama, PROMPT), 2, "--recompute-fraction applies to --cache")


def test_cli_recomputation_refused_for_sliding_window_models(cli, tiny_model_dir, tmp_path):
    gemma = str(tiny_model_dir("gemma3"))
    paths = prefill_docs(cli, gemma, tmp_path)
    assert cli("generate", *cache_args(paths), "--model", gemma, "-n", "2", PROMPT).exit_code == 0
    data = bytearray(paths[1].read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF  # refused before this damage is found
    paths[1].write_bytes(bytes(data))
    one_line_error(cli("generate", *cache_args(paths), "--recompute-fraction", "0.15", "--model", gemma, PROMPT),
                   2, "sliding-window layers")


# The default model.

NEEDLE = " The access code for the archive room is 7341."
QUESTION = "\nQuestion: What is the access code for the archive room?\nAnswer: The access code is"


@pytest.mark.slow
def test_needle_in_one_of_four_composed_documents(default_lm):
    """Four 150-token chunks of the corpus, a fact planted at the end of the third: the composed cache answers
    the question, with and without recomputation, as the prefill of the concatenation does."""
    from pathlib import Path

    lm = default_lm
    corpus = sorted((Path(__file__).parents[2] / "shared" / "corpus").glob("*.txt"))
    if len(corpus) < 4:
        pytest.skip("../shared/corpus/ is not here")
    texts = [lm.tokenizer.decode(inference.document_ids(lm, p.read_text())[:150]) for p in corpus[:4]]
    texts[2] = texts[2].rsplit(".", 1)[0] + "." + NEEDLE + "\n"
    caches = [inference.prefill(lm, inference.document_ids(lm, t)) for t in texts]
    kv = compose.compose_caches(lm, caches, ["a", "b", "c", "d"])
    question = inference.prompt_ids(lm, QUESTION)
    assert "7341" in lm.tokenizer.decode(inference.greedy(lm, None, kv.token_ids + question, 6))
    for fraction in (0.0, 0.15):
        blend = compose.recompute_tokens(lm, kv, fraction)
        assert "7341" in lm.tokenizer.decode(inference.greedy(lm, blend.kv, question, 6))


def test_composition_is_planned_once_and_the_model_probed_once(cli, llama, tmp_path, monkeypatch):
    """load_composed plans from the headers and composes by that plan; the layout checks of every file and the
    plan share one probe of the model's cache shapes, which a second load does not repeat."""
    import contextlib

    from kvcli.reuse import pipeline

    paths = prefill_docs(cli, llama, tmp_path)
    lm = models.load(llama, "float32")
    passes, calls = [], []
    lm.model.register_forward_hook(lambda *_: passes.append(1))
    for name in ("plan_composition", "rope_frequencies"):
        real = getattr(compose, name)
        monkeypatch.setattr(compose, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))

    def load():
        with contextlib.ExitStack() as stack:
            opened = []
            for path in paths:
                src, header = pipeline.read_header(str(path))
                opened.append((stack.enter_context(src), header))
            return pipeline.load_composed(opened, lm)

    kv = load()
    assert len(passes) == 1 and sorted(calls) == ["plan_composition", "rope_frequencies"]
    again = load()
    assert len(passes) == 1 and len(calls) == 4
    caches = [inference.prefill(lm, inference.document_ids(lm, t)) for t in DOCS]
    direct = compose.compose_caches(lm, caches, ["a", "b", "c"])
    assert kv.token_ids == again.token_ids == direct.token_ids
    assert max_error(kv, direct) == 0 and max_error(kv, again) == 0


def test_a_plan_for_other_caches_is_refused(tiny_lm):
    lm = tiny_lm("llama")
    caches, _ = parts(lm)
    names = ["a", "b", "c"]
    plan = compose.plan_composition(lm, [c.token_ids for c in caches], names)
    assert compose.compose_caches(lm, caches, names, plan).token_ids == plan.token_ids
    for other in (caches[::-1], caches[:2]):
        with pytest.raises(ValueError, match="the plan was made for other caches"):
            compose.compose_caches(lm, other, names[: len(other)], plan)


def test_compose_does_not_import_pipeline():
    """pipeline uses compose; compose needs nothing of pipeline (the two imported each other)."""
    import subprocess
    import sys

    code = "import sys, kvcli.reuse.compose; print('kvcli.reuse.pipeline' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr


def test_cli_checks_every_file_before_decoding_any(cli, llama, tiny_model_dir, tmp_path):
    """The model is checked before the length, and the length before any segment is decoded."""
    long_docs = ("y" * 300, "z" * 300)
    paths = prefill_docs(cli, llama, tmp_path, docs=long_docs)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    theirs = prefill_docs(cli, str(tiny_model_dir("llama", seed=1)), other_dir, docs=long_docs)
    one_line_error(cli("generate", *cache_args(paths[:1] + theirs[1:]), "--model", llama, PROMPT), 6,
                   "made by a different model")
    data = bytearray(paths[1].read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF  # inside a segment: only decoding finds it
    paths[1].write_bytes(bytes(data))
    assert cli("generate", *cache_args(paths[1:]), "--model", llama, PROMPT).exit_code == 4
    one_line_error(cli("generate", *cache_args(paths), "--model", llama, PROMPT), 3,
                   "the context composed of 2 caches is 601 tokens")
