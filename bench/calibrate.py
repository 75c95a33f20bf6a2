"""Where `kvcli calibrate`'s time goes: wall seconds per phase, and the work each phase does, counted.

    python bench/calibrate.py [--model M] [--method fisher|probes] [--threads N] [--output PROFILE.json]

Runs kvcli.calibration.calibrate.calibrate on the bundled calibration texts, as `kvcli calibrate` does, with the model load
timed apart. Work is counted with forward hooks, not derived from the code: decoder-layer token passes (one
token through one decoder layer, summed over every forward pass, the gradient-enabled one included; backward
passes are not hooked: `fisher_groups` of them per text, each about twice its forward), output-layer token
passes (the logits over the vocabulary, whose cost is the same for every layer count), and the forward calls (one per output-layer call).
Weight GFLOP = 2 x (parameters of one decoder layer x layer token passes + output-layer parameters x output
token passes): matrix products with the weights only, attention scores and backward passes not included.
One JSON line per phase, then a total line.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import emit, environment

from kvcli.calibration import bases, calibrate, profiles, quality
from kvcli.modeling import models


class Counter:
    """Token passes through the decoder layers and the output layer, credited to the phase running."""

    def __init__(self, lm):
        self.phase = "other"
        self.layer_tokens: dict[str, int] = defaultdict(int)
        self.head_tokens: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        layers = calibrate._decoder_layers(lm)
        head = lm.model.get_output_embeddings()
        self.layer_params = sum(p.numel() for p in layers[0].parameters())
        self.head_params = head.weight.numel()
        self.hooks = [layer.register_forward_hook(self._layer) for layer in layers]
        self.hooks.append(head.register_forward_hook(self._head))

    def _tokens(self, out) -> int:
        x = out[0] if isinstance(out, tuple) else out
        return x.shape[0] * x.shape[1]

    def _layer(self, mod, _inp, out):
        if "forward" not in vars(mod):  # a layer that a probe skips hands back a stored output (calibrate._start_at)
            self.layer_tokens[self.phase] += self._tokens(out)

    def _head(self, _mod, _inp, out):
        self.head_tokens[self.phase] += self._tokens(out)
        self.calls[self.phase] += 1

    def gflop(self, phase: str) -> float:
        return 2 * (self.layer_params * self.layer_tokens[phase] + self.head_params * self.head_tokens[phase]) / 1e9


def timed_phases(counter: Counter, seconds: dict) -> None:
    """Wrap calibrate's phases so that each is timed and its passes counted under its own name (the transform's
    as `transform_moments`, the covariances, and `transform_bases`, the eigenvectors)."""
    phases = [(calibrate, name, name) for name in ("prefill_and_key_weights", "fisher_sensitivity",
                                                   "continuation_reference", "block_kl", "probe_sensitivity")]
    phases += [(quality, "decoded_as", "decoded_as")]
    phases += [(bases.Moments, "add", "transform_moments"), (bases.Moments, "bases", "transform_bases")]
    for owner, name, phase in phases:
        inner = getattr(owner, name)

        def wrapper(*args, _inner=inner, _phase=phase, **kwargs):
            counter.phase = _phase
            t0 = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                seconds[_phase] += time.perf_counter() - t0
                counter.phase = "other"

        setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory or .gguf file [default: the bundled model]")
    ap.add_argument("--method", default="fisher", choices=calibrate.METHODS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads [default: torch's choice]")
    ap.add_argument("--output", type=Path, help="also store the profile there (for bench/rate_distortion.py --profile)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = models.load(args.model, "float32")
    load_s = time.perf_counter() - t0
    env = {**environment(), "model": lm.name}
    counter = Counter(lm)
    seconds: dict[str, float] = defaultdict(float)
    timed_phases(counter, seconds)
    texts = calibrate.default_texts()
    t0 = time.perf_counter()
    result = calibrate.calibrate(lm, texts, method=args.method)
    profile, details = result.profile, result.details
    total_s = time.perf_counter() - t0
    emit({"what": "calibrate_phase", "phase": "model_load", "seconds": round(load_s, 2), **env})
    for phase in seconds:
        emit({"what": "calibrate_phase", "phase": phase, "seconds": round(seconds[phase], 2),
              "forward_calls": counter.calls[phase], "layer_token_passes": counter.layer_tokens[phase],
              "output_token_passes": counter.head_tokens[phase], "weight_gflop": round(counter.gflop(phase), 1), **env})
    phases = list(seconds)
    if args.output:
        profile = profiles.load(profiles.save(profile, lm.identity, details, args.output))  # as kvcli stores it
    emit({"what": "calibrate_total", "method": args.method, "texts": len(texts), "calibrate_seconds": round(total_s, 2),
          "with_load_seconds": round(total_s + load_s, 2), "forward_calls": sum(counter.calls.values()),
          "weight_gflop": round(sum(counter.gflop(p) for p in phases), 1), "profile_digest": profile.digest(),
          "details": details, **env})


if __name__ == "__main__":
    main()
