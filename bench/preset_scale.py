"""Bits per element of kvq at given scales on kvcli's calibration texts: how a preset's scale is chosen
(docs/codec.md, "Presets"), never on the benchmark corpus.

    python bench/preset_scale.py [--model M] [--profile auto|none|PATH] --scales 2.4 2.6 2.8

Each calibration text's first 2,048 tokens are prefilled (with the attention that token weights come from) and
encoded as `kvcli prefill` would at each scale (the scale is the preset's `scale` times `--step-scale`:
`balanced` is 0.75, `small` 1.55). One JSON line per (text, scale): the file's bits per element.
"""

from __future__ import annotations

import argparse

import torch
from common import emit, environment
from rate_distortion import kvcli_codec

from kvcli.calibration.calibrate import default_texts
from kvcli.codecs.presets import LOSSY_SCALES
from kvcli.container import format, kvfile
from kvcli.modeling import inference, models

PREFIX = 2048


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory or .gguf file [default: the bundled model]")
    ap.add_argument("--profile", default="auto", help="auto, none or a profile's path")
    ap.add_argument("--scales", type=float, nargs="+", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = models.load(args.model, "float32")
    env = {**environment(), "model": lm.name}
    for name, text in default_texts():
        kv = inference.prefill(lm, inference.document_ids(lm, text)[:PREFIX], attention=True)
        elements = sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))
        for scale in args.scales:
            codec = kvcli_codec(lm, "balanced", args.profile, scale / LOSSY_SCALES["balanced"])
            meta, parts = kvfile.encode(kv, lm.identity, codec, 256)
            size = len(format.build_header(meta, parts)) + sum(len(p.data) for p in parts)
            emit({"what": "preset_scale", "text": name, "tokens": kv.num_tokens, "scale": scale,
                  "bits_per_element": round(8 * size / elements, 4), **env})


if __name__ == "__main__":
    main()
