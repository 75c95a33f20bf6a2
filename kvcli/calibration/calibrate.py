"""`kvcli calibrate`: measure where a model is sensitive to cache loss, once, and keep it as a profile.

Every measurement runs on calibration text with the quality protocol (docs/codec.md, "Calibration"):
- key channel weights: the mean squared pre-RoPE query per channel, averaged over the query heads that share
  a KV head and over both channels of a rotary pair. A key error in channel c moves attention scores by
  q_c * error, so the codec gives channel c a step proportional to weight ** -1/2.
- sensitivity per (layer, K/V, head): the KL divergence of the continuation when only that head of that
  layer's K or V is quantized coarsely (step = the head's RMS). Steps are then set proportional to
  sensitivity ** -1/2, which equalizes each place's marginal cost in KL per bit.

Two methods measure the sensitivity. `probes` quantizes each head on its own and runs the continuation: exact,
and one pass per (layer, K/V, head). `fisher` (the default) predicts every head's KL from the empirical Fisher
information of the continuation (squared gradients of its log-likelihood, next tokens sampled from the model,
one backward pass), times the coarse quantization's squared error. That local estimate ranks heads well but
misses how nonlinear the model's response is, most of all for keys (the softmax): on the default model it puts
layer 0's keys 10x too low, which alone doubles the KL at `balanced`. So the real KL is measured for the first
layers' keys one by one, for blocks of the other layers' keys and for blocks of values (all heads at once), and
the predictions are scaled to it. A probe that changes layers l and up starts its pass at layer l, from the
hidden states the exact continuation left there (docs/codec.md, "Calibration and profiles", for the costs). The
Fisher method's forward pass is that exact continuation: it gives the reference logits and those hidden states,
so no separate reference pass runs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..codecs.kvq import DEFAULT_TOKEN_ALPHA, KvqCodec, Profile
from ..container import dictionary
from ..modeling import inference
from ..modeling.kvcache import KVCache, to_model_cache
from ..modeling.models import LoadedModel
from ..modeling.rope import inv_freq_per_layer
from ..stdio import write_stderr_text
from . import bases as bases_
from . import profiles, quality
from . import scales as scales_

COARSE_SCALE = 1.0
METHODS = ("fisher", "probes")
# Backward passes per text, each over its share of the continuation's positions. One pass (about a tenth of the
# run each) made profiles within the 4-document scatter of 4 passes' on both models, over two seeds (docs/codec.md,
# "Calibration time"): KL -11% to +33% at `balanced`, -20% to +12% at `small`, no mean trend beyond the scatter.
FISHER_GROUPS = 1
# Where the real KL sets the level of the Fisher predictions (one probe pass each): the first layers' keys one
# by one (the Fisher estimate is furthest off there: 10x low for layer 0's), the other layers' keys and all
# values in blocks of adjacent layers.
KEY_LAYERS_ALONE = 4
KEY_BLOCKS = 6
VALUE_BLOCKS = 6
SEED = 0


def default_texts() -> list[tuple[str, str]]:
    folder = resources.files("kvcli.calibration") / "data"
    return [(e.name, e.read_text()) for e in sorted(folder.iterdir(), key=lambda e: e.name)
            if e.name.startswith("calibration-") and e.name.endswith(".txt")]


@dataclass
class Reference:
    """A text's quality reference, and what its exact continuation left at each decoder layer's output: a
    probe that changes the cache from layer l on gets the same hidden states below l, so it starts at l."""

    ref: quality.Reference
    layer_outputs: list | None  # None where the decoder layers cannot be reached: probes then run every layer


def _decoder_layers(lm: LoadedModel) -> list:
    layers = getattr(getattr(lm.model, "model", None), "layers", None)
    return list(layers) if layers is not None else []


def _attention_modules(lm: LoadedModel) -> list:
    return [getattr(layer, "self_attn", None) for layer in _decoder_layers(lm)]


@contextmanager
def _capture_layer_outputs(lm: LoadedModel, into: list):
    """Fill `into` with each decoder layer's output of the last forward pass run inside the block."""
    layers = _decoder_layers(lm)
    into[:] = [None] * len(layers)

    def hook(_mod, _inp, out, i):
        # Detached: a pass under autograd (Fisher's) would otherwise keep its graph alive through the probes.
        into[i] = out.detach() if isinstance(out, torch.Tensor) else tuple(
            o.detach() if isinstance(o, torch.Tensor) else o for o in out)

    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def _start_at(lm: LoadedModel, reference: Reference, start: int):
    """Layers below `start` hand back their exact outputs instead of computing them again."""
    layers = _decoder_layers(lm)[:start] if reference.layer_outputs else []
    for layer, out in zip(layers, reference.layer_outputs):
        layer.forward = lambda *_args, _out=out, **_kwargs: _out  # an instance attribute shadows the method
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def prefill_and_key_weights(lm: LoadedModel, ids: list[int], prefix: int) -> tuple[quality.Context, list | None]:
    """A text's context (its prefix prefilled, with the attention its tokens receive: quality.decoded_as weighs tokens
    by it as encoding does) and, from that prefill, per layer (kv_heads, head_dim) mean squared query, or None
    if the model's queries cannot be reached."""
    cfg = lm.model.config.get_text_config(decoder=True)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    modules = _attention_modules(lm)
    if not modules or any(m is None or not hasattr(m, "q_proj") for m in modules):
        return quality.context(lm, ids, prefix), None
    captured: list[torch.Tensor | None] = [None] * len(modules)
    hooks = []
    for i, attn in enumerate(modules):
        # Queries after their norm where the model has one (Gemma 3, Qwen 3): that is what meets the keys.
        target = getattr(attn, "q_norm", None) or attn.q_proj

        def hook(_mod, _inp, out, i=i):
            captured[i] = out.detach().float().reshape(-1, heads, dim).pow(2).mean(0).cpu()

        hooks.append(target.register_forward_hook(hook))
    try:
        context = quality.context(lm, ids, prefix)
    finally:
        for h in hooks:
            h.remove()
    weights = []
    for m2 in captured:
        per_kv = m2.reshape(kv_heads, heads // kv_heads, dim).mean(1)
        half = dim // 2
        pair = (per_kv[:, :half] + per_kv[:, half:]) / 2
        weights.append(torch.cat([pair, pair], -1).numpy().astype(np.float64))
    return context, weights


def continuation_reference(lm: LoadedModel, context: quality.Context) -> Reference:
    """The exact continuation's logits and layer outputs, from a pass of its own (the `probes` method's)."""
    kv, feed, targets = context
    outputs: list = []
    with _capture_layer_outputs(lm, outputs):
        logits = inference.logits_after(lm, kv, feed).float()
    return Reference(quality.Reference(kv, feed, targets, logits), outputs or None)


@torch.inference_mode()
def probe_sensitivity(lm: LoadedModel, reference: Reference, coarse: KVCache, progress=None) -> np.ndarray:
    """(layers, 2, kv_heads): KL of the continuation with one head of one layer's K or V coarsely quantized."""
    kv = reference.ref.kv
    heads = kv.keys[0].shape[0]
    out = np.zeros((kv.num_layers, 2, heads))
    for layer in range(kv.num_layers):
        for kind in range(2):
            exact = (kv.keys if kind == 0 else kv.values)[layer]
            rough = (coarse.keys if kind == 0 else coarse.values)[layer]
            for head in range(heads):
                keys, values = list(kv.keys), list(kv.values)
                mixed = exact.clone()
                mixed[head] = rough[head]
                (keys if kind == 0 else values)[layer] = mixed
                out[layer, kind, head] = _kl(lm, reference, KVCache(kv.token_ids, keys, values), layer)
                if progress:
                    progress()
    return out


def fisher_sensitivity(lm: LoadedModel, context: quality.Context, coarse: KVCache, groups: int = FISHER_GROUPS,
                       seed: int = SEED, progress=None) -> tuple[np.ndarray, Reference]:
    """(layers, 2, kv_heads): each head's KL under the coarse quantization as the local (second-order) model
    predicts it: half the squared quantization error weighted by the diagonal Fisher information. And the
    text's reference: the forward pass these gradients go back through is the exact continuation.

    The Fisher information is that of the continuation's next-token distributions with respect to the cached
    K and V, estimated from squared gradients of the log-likelihood of tokens sampled from the model itself;
    positions can be split into `groups`, one backward pass each: squaring a sum over positions adds cross terms
    that are zero on average (each position's token is sampled on its own) but add noise, which more groups
    lessen at one backward pass each."""
    kv, feed, targets = context
    layers = kv.num_layers
    errors = [[((coarse.keys if kind == 0 else coarse.values)[layer] - (kv.keys if kind == 0 else kv.values)[layer])
               .float().pow(2) for kind in range(2)] for layer in range(layers)]
    # Clones, because the prefill's tensors were made under inference mode and cannot join a graph.
    keys = [k.clone().requires_grad_() for k in kv.keys]
    values = [v.clone().requires_grad_() for v in kv.values]
    out = np.zeros((layers, 2, kv.keys[0].shape[0]))
    generator = torch.Generator().manual_seed(seed)
    outputs: list = []
    with torch.enable_grad():
        cache = to_model_cache(KVCache(kv.token_ids, keys, values), lm.model)
        with _capture_layer_outputs(lm, outputs):
            logits = inference._forward(lm, feed, cache).float()
        logp = logits.log_softmax(-1)
        sampled = torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator)[:, 0].to(logp.device)
        loglik = logp.gather(1, sampled[:, None])[:, 0]
        n = len(loglik)
        bounds = np.linspace(0, n, min(groups, n) + 1).astype(int)
        for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            grads = torch.autograd.grad(loglik[lo:hi].sum(), keys + values, retain_graph=g < len(bounds) - 2)
            for layer in range(layers):
                for kind in range(2):
                    grad = grads[layer if kind == 0 else layers + layer].float()
                    out[layer, kind] += (grad.pow(2) * errors[layer][kind]).sum((1, 2)).cpu().numpy()
            if progress:
                progress()
    reference = Reference(quality.Reference(kv, feed, targets, logits.detach()), outputs or None)
    return out / (2 * n), reference  # KL is a mean over positions


def blocks_of(layers: int, blocks: int) -> list[range]:
    bounds = np.linspace(0, layers, min(blocks, layers) + 1).astype(int)
    return [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def blocks_per_kind(layers: int) -> tuple[list[range], list[range]]:
    """Where the real KL is measured: keys of the first KEY_LAYERS_ALONE layers one by one and of the rest in
    KEY_BLOCKS blocks, values in VALUE_BLOCKS blocks."""
    alone = min(KEY_LAYERS_ALONE, layers)
    rest = [range(b.start + alone, b.stop + alone) for b in blocks_of(layers - alone, KEY_BLOCKS)]
    return blocks_of(alone, alone) + rest, blocks_of(layers, VALUE_BLOCKS)


@torch.inference_mode()
def block_kl(lm: LoadedModel, reference: Reference, coarse: KVCache, blocks: tuple[list[range], list[range]],
             progress=None) -> list[np.ndarray]:
    """Per kind, per block: KL of the continuation with all heads of the block's K (or V) coarsely quantized."""
    kv = reference.ref.kv
    out = [np.zeros(len(blocks[0])), np.zeros(len(blocks[1]))]
    for kind in range(2):
        for b, block in enumerate(blocks[kind]):
            keys, values = list(kv.keys), list(kv.values)
            target, source = (keys, coarse.keys) if kind == 0 else (values, coarse.values)
            for layer in block:
                target[layer] = source[layer]
            out[kind][b] = _kl(lm, reference, KVCache(kv.token_ids, keys, values), block.start)
            if progress:
                progress()
    return out


def scale_to_blocks(predicted: np.ndarray, measured: list[np.ndarray], blocks: tuple[list[range], list[range]]) -> np.ndarray:
    """Predicted per-head KLs, scaled per (K/V, block) so that they sum to the block's measured KL."""
    out = predicted.copy()
    for kind in range(2):
        for b, block in enumerate(blocks[kind]):
            total = predicted[block.start : block.stop, kind].sum()
            if total > 0 and measured[kind][b] > 0:
                out[block.start : block.stop, kind] *= measured[kind][b] / total
    return out


def _kl(lm: LoadedModel, reference: Reference, kv: KVCache, start: int = 0) -> float:
    """KL of the continuation with `kv`, which differs from the exact cache in layers `start` and up only."""
    with _start_at(lm, reference, start):
        return max(quality.compare(lm, reference.ref, kv).kl, 0.0)


CHOICES = len(scales_.ALPHAS) + len(scales_.TARGET_BITS)  # progress steps of the token alpha and the scales


def passes(lm: LoadedModel, texts: int, method: str) -> int:
    """How many progress steps `calibrate` reports."""
    cfg = lm.model.config.get_text_config(decoder=True)
    if method == "probes":
        return texts * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads + CHOICES
    return texts * (FISHER_GROUPS + sum(len(b) for b in blocks_per_kind(cfg.num_hidden_layers))) + CHOICES


@dataclass
class Calibration:
    profile: Profile  # as it is stored (profiles.as_stored): the numbers every later encoder reads
    details: dict  # how it was measured, for the profile's JSON
    bases: bases_.Bases | None  # kvq's per-head transform under `profile` (None unless asked)
    scales: dict[str, float]  # the presets' step scales for this model (kvcli/calibration/scales.py)
    token_alpha: float  # the token weights' alpha they were chosen at (kvcli/calibration/scales.py)


def calibrate(lm: LoadedModel, texts: list[tuple[str, str]], prefix: int = quality.PREFIX_TOKENS,
              method: str = "fisher", progress=None, transform: bool = True) -> Calibration:
    """The profile of `lm` from `texts`, with `transform` the bases of kvq's per-head transform under it, and the
    presets' step scales for this model. The bases and the scales are measured on the caches the calibration
    prefilled (each text's prefix, with its attention): both need the final profile (its key weights set the
    covariance), so the caches are kept until it is known instead of prefilled again."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    inv_freq = inv_freq_per_layer(lm.model)
    weights = None
    per_doc = []
    contexts = []
    for _, text in texts:
        context, w = prefill_and_key_weights(lm, inference.document_ids(lm, text), prefix)
        kv = context[0]
        contexts.append(context)
        weights = w if weights is None else [a + b for a, b in zip(weights, w)] if w else None
        # kvq's default token alpha: the model's own is chosen after the profile, on it (scales.choose), and is
        # near it (0.25-0.45), so the probe weighs tokens about as the encoder will.
        probe = KvqCodec(COARSE_SCALE, profile=Profile("probe", np.ones((kv.num_layers, 2)), w), inv_freq=inv_freq,
                         token_alpha=DEFAULT_TOKEN_ALPHA)
        # Under uniform token steps instead, the profile would measure an error the encoder never makes
        # (docs/codec.md, "Calibration time").
        coarse = quality.decoded_as(kv, probe)
        if method == "probes":
            per_doc.append(probe_sensitivity(lm, continuation_reference(lm, context), coarse, progress))
        else:
            blocks = blocks_per_kind(kv.num_layers)
            predicted, reference = fisher_sensitivity(lm, context, coarse, progress=progress)
            per_doc.append(scale_to_blocks(predicted, block_kl(lm, reference, coarse, blocks, progress), blocks))
    if weights is not None:
        weights = [w / len(texts) for w in weights]
    profile = profiles.as_stored(Profile(f"{lm.name}", np.mean(per_doc, axis=0), weights))
    details = {"texts": [name for name, _ in texts], "prefix_tokens": prefix, "method": method,
               "continuation_tokens": quality.CONTINUATION_TOKENS, "coarse_scale": COARSE_SCALE,
               "coarse_token_alpha": DEFAULT_TOKEN_ALPHA}
    if method == "fisher":
        details.update(fisher_groups=FISHER_GROUPS, key_layers_alone=KEY_LAYERS_ALONE, key_blocks=KEY_BLOCKS,
                       value_blocks=VALUE_BLOCKS, seed=SEED)
    learned, chosen, alpha, details["rate"] = transform_and_scales(lm, profile, contexts, transform, progress)
    return Calibration(profile, details, learned, chosen, alpha)


def transform_and_scales(lm: LoadedModel, profile: Profile, contexts: list[quality.Context], transform: bool,
                         progress=None) -> tuple[bases_.Bases | None, dict[str, float], float, dict]:
    """From the calibration texts' contexts (caches with their attention, and continuations): with `transform` the
    bases of kvq's per-head transform under `profile`, then the presets' token alpha and scales for this model, and
    what choosing them measured."""
    moments = _moments(lm, profile, [kv for kv, _, _ in contexts]) if transform else None
    learned = bases_.Moments.merged(moments).bases() if moments else None
    transforms = scales_.held_out(lm, moments) if moments else [None] * len(contexts)
    chosen, alpha, measured = scales_.choose(lm, profile, contexts, transforms, bool(moments) and len(moments) > 1,
                                             progress)
    return learned, chosen, alpha, measured


def _moments(lm: LoadedModel, profile: Profile, caches: list[KVCache]) -> list[bases_.Moments]:
    """Per cache, the second moments the transform under `profile` is learned from."""
    codec = bases_.codec_for(lm, profile)
    moments = []
    for kv in caches:
        moments.append(bases_.Moments())
        moments[-1].add(codec, kv)
    return moments


def store(lm: LoadedModel, result: Calibration, path=None) -> Path:
    """Store a calibration: the transform's dictionary in the user's cache first, then the profile naming it (at
    `path`, or in the user's profile directory), so that no profile names a dictionary not yet written."""
    found = bases_.to_dictionary(result.bases, lm.identity) if result.bases is not None else None
    if found is not None:
        dictionary.save_to_cache(found)
    return profiles.save(result.profile, lm.identity, result.details, path, found.sha if found else None,
                         result.scales, result.token_alpha)


def calibration_for(lm: LoadedModel, transform: bool = True, scaled: bool = True) -> profiles.Stored | None:
    """The model's stored profile and the dictionary it names; without a profile, calibrate now (once: stored
    under the user's directories, keyed by the model's identity), unless automatic calibration is turned off.

    A profile naming a dictionary that none of this machine's places holds (the user's cache emptied, say) has
    its transform learned again from the profile (a prefill per calibration text) where automatic calibration
    is on; otherwise it is refused with DictionaryMissing (exit 4), as is a shipped profile's (kvcli ships both).
    Without `transform` (a preset that codes without it) the dictionary is neither checked nor learned. With
    `scaled` (a preset whose scale a profile sets) a user's profile made before the presets' scales were chosen has
    them chosen now (a prefill per calibration text) where automatic calibration is on, and stored in it."""
    stored = profiles.lookup(lm.identity)
    if stored is None:
        if not profiles.auto_calibrate():
            return None
        t0 = time.perf_counter()
        path = store(lm, calibrate(lm, default_texts()))
        write_stderr_text(f"kvcli: calibrated {lm.name} for lossy presets in {time.perf_counter() - t0:.0f} s, once: "
                          f"stored in {path} (set {profiles.AUTO_CALIBRATE_ENV}=0 to skip)\n")
        return profiles.read(path)  # as stored: rounded, as every later run will read it
    if not transform or stored.dictionary is None or _holds(stored.dictionary):
        return _with_scales(lm, stored) if scaled else stored
    if stored.shipped or not profiles.auto_calibrate():
        raise dictionary.DictionaryMissing(
            stored.dictionary, f"profile {stored.where} (`kvcli calibrate` learns it again)",
            [place.where for place in dictionary.own_places()])
    t0 = time.perf_counter()
    found = bases_.to_dictionary(bases_.learn_bases(lm, stored.profile, default_texts()), lm.identity)
    if found is None:  # every head wider than this build transforms (the dictionary made by another build)
        raise dictionary.DictionaryMissing(stored.dictionary, f"profile {stored.where}", [])
    dictionary.save_to_cache(found)
    if found.sha != stored.dictionary:
        profiles.update(Path(stored.where), dictionary=found.sha)
    write_stderr_text(f"kvcli: the transform dictionary of {stored.where} was missing: learned it again in "
                      f"{time.perf_counter() - t0:.0f} s, stored in {dictionary.cache_place().where}\n")
    stored = profiles.read(Path(stored.where))
    return _with_scales(lm, stored) if scaled else stored


def _with_scales(lm: LoadedModel, stored: profiles.Stored) -> profiles.Stored:
    """`stored`, with the presets' scales chosen now and kept in it if it has none (a user's profile made before
    they were); left as it is where automatic calibration is off, or for a shipped profile (kvcli ships them). The
    scales are chosen on the bundled texts: where the profile's transform was learned on them, each is coded with
    the transform learned on the others (as calibration does); where it was learned on other texts (`--text`), the
    bundled ones are held out already and are coded with it."""
    from ..codecs.transform import Transforms

    if stored.scales or stored.shipped or not profiles.auto_calibrate():
        return stored
    t0 = time.perf_counter()
    contexts = [quality.context(lm, inference.document_ids(lm, text)) for _, text in default_texts()]
    caches = [kv for kv, _, _ in contexts]
    transforms, held = [None] * len(caches), False
    if stored.dictionary is not None:
        moments = _moments(lm, stored.profile, caches)
        found = bases_.to_dictionary(bases_.Moments.merged(moments).bases(), lm.identity)
        if found is not None and found.sha == stored.dictionary:
            transforms, held = scales_.held_out(lm, moments), len(moments) > 1
        else:
            own = dictionary.find(stored.dictionary, dictionary.own_places(), f"profile {stored.where}")
            transforms, held = [(Transforms.unpack(own.payload), own.sha)] * len(caches), True
    chosen, alpha, measured = scales_.choose(lm, stored.profile, contexts, transforms, held)
    profiles.update(Path(stored.where), scales=chosen, rate=measured, token_alpha=alpha)
    write_stderr_text(f"kvcli: chose the presets' token alpha and scales for {lm.name} in {time.perf_counter() - t0:.0f} s, once: "
                      f"stored in {stored.where}\n")
    return profiles.read(Path(stored.where))


def _holds(sha: str) -> bool:
    try:
        dictionary.find(sha, dictionary.own_places(), "")
        return True
    except dictionary.DictionaryMissing:
        return False
