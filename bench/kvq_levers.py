"""Issue 20's candidate levers for kvq version 4, measured cheaply before any format change.

    python bench/kvq_levers.py [--model M] [--profile auto|PATH] [--corpus DIR] [--documents N]
                               [--scales S ...] [--candidate-scales S ...]

Every candidate starts from what kvq version 3 computes for a cache (its plan's centres and steps, its token
weights: `KvqCodec._fit_one` itself) and changes one thing in the space kvq quantizes in, the unit-step space
u = (x - center) / (step * g) (keys with RoPE undone; kvq's integers are round(u)):

- `base`: round(u), as version 3;
- `xf-layer`: an orthogonal transform per (layer, K/V) over the layer's heads concatenated, the eigenvectors of
  u's covariance on kvcli's calibration texts (never the corpus), then round() per component: uniform unit steps
  over the components are reverse water-filling at distortion 1/12, so the sensitivities' allocation holds;
- `xf-head`: the same with one transform per (layer, K/V, head) (issue 10's design);
- `xf-layer-drop`: xf-layer with the components whose calibration variance is under 1/12 (those water-filling
  gives no bits) dropped, set to 0, costing nothing;
- `recent`: base with the last RECENT tokens of every layer at half the step (a finer recent-token window);
- `bands`: not a cache of its own: every row's integers also priced with one table per (class, token-exponent
  band) instead of per class (entropy contexts by token-exponent band).

Bits are estimated as kvq codes them: per channel (or component) the class of its integers' spread, tuples of m
tokens as kvq's joint symbols with one table per class over the whole cache, escapes at 32 bits per value,
plus each table's used symbols at 16 bits. A `base` row's bits are those of the real version-3 file of the
cache at that scale; a candidate's are that file's bits plus the difference of the two stream estimates (sinks,
plans, token weights and header cost the same for every candidate). A transform's basis is the per-model dictionary and is reported apart
(`dictionary_bytes`, float16). Quality: top-1 and KL on the corpus protocol (bench/rate_distortion.py's).
One JSON line per (document, candidate, scale), then a summary per (candidate, scale) over the documents.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from common import corpus, emit, environment
from rate_distortion import kvcli_codec, model_options

from kvcli.calibration import quality
from kvcli.calibration.calibrate import default_texts
from kvcli.codecs import entropy
from kvcli.codecs.kvq_ops import quantize
from kvcli.codecs.kvq_ops.rope import rope_tables, rotate_keys
from kvcli.codecs.presets import LOSSY_SCALES
from kvcli.container import format, kvfile
from kvcli.modeling import inference, models
from kvcli.modeling.kvcache import KVCache

RECENT = 128
PIECE = 512  # calibration tokens per prefill: a sliding-window layer of 512 then holds all of them
BANDS = 6  # exponent values per band: e in [-24, 24] gives 9 bands
ESCAPE_BITS = 32
TABLE_SYMBOL_BITS = 16
BASIS_SCALE = 0.75  # the bases are fitted in balanced's unit-step space; a transform is the same at any scale
DROP_BELOW = 1 / 12  # a component whose variance is under the uniform quantizer's distortion gets no bits


def unit_space(codec, x: torch.Tensor, layer: int, kind: int, start: int, attention: torch.Tensor | None):
    """kvq's view of one layer and kind: (u (heads, dim, T) float64, center, step (heads, dim), g (heads, T) or
    None, skip)."""
    plan, _, weights, _ = codec._fit_one(x, layer, kind, start, attention)
    skip = codec._skip(x.shape[1], start)
    body = quantize.to_channels_ref(x[:, skip:], codec._freq(layer, kind, x.shape[2]), start + skip).double()
    center = torch.from_numpy(plan.center.astype(np.float64))
    step = torch.from_numpy(plan.step.astype(np.float64))
    g = weights.factors(start + skip, x.shape[1] - skip).double() if weights is not None else None
    size = step[..., None] * (g[:, None, :] if g is not None else 1.0)
    return (body - center[..., None]) / size, center, step, g, skip


def back(codec, uq: torch.Tensor, center, step, g, x: torch.Tensor, layer: int, kind: int, start: int, skip: int):
    """The cache (heads, tokens, dim) from unit-space values uq, sinks exact, keys rotated again."""
    size = step[..., None] * (g[:, None, :] if g is not None else 1.0)
    v = (uq * size + center[..., None]).float()
    freq = codec._freq(layer, kind, x.shape[2])
    if freq is not None and v.shape[2]:
        cos, sin = rope_tables(freq, start + skip, v.shape[2])
        v = rotate_keys(v, cos, sin)
    return torch.cat([x[:, :skip].float(), v.transpose(1, 2)], 1).to(x.dtype)


def fit_bases(lm, codec) -> dict[tuple[int, int], torch.Tensor]:
    """Covariance of u per (layer, K/V) over the layer's heads concatenated, on the calibration texts."""
    cov: dict[tuple[int, int], torch.Tensor] = {}
    count: dict[tuple[int, int], int] = defaultdict(int)
    for _, text in default_texts():
        ids = inference.document_ids(lm, text)
        for first in range(0, len(ids) - 64, PIECE):
            kv = inference.prefill(lm, ids[first:first + PIECE], attention=True)
            for layer in range(kv.num_layers):
                att = kv.attention[layer] if kv.attention is not None else None
                for kind, x in enumerate((kv.keys[layer], kv.values[layer])):
                    u = unit_space(codec, x, layer, kind, kv.token_start(layer), att)[0]
                    f = u.reshape(-1, u.shape[2])  # (heads * dim, T): head-major features
                    key = (layer, kind)
                    cov[key] = cov.get(key, 0) + f @ f.T
                    count[key] += f.shape[1]
    return {key: c / count[key] for key, c in cov.items()}


def transforms(cov: dict, heads: dict[tuple[int, int], int]) -> dict[str, dict]:
    """Per candidate and (layer, K/V): (orthogonal basis (features, features) with columns by decreasing
    variance, the variances)."""
    layer_xf, head_xf = {}, {}
    for key, c in cov.items():
        values, vectors = torch.linalg.eigh(c)
        layer_xf[key] = (vectors.flip(1), values.flip(0))
        n, h = c.shape[0], heads[key]
        d = n // h
        block = torch.zeros_like(c)
        var = torch.zeros(n, dtype=c.dtype)
        for i in range(h):
            sl = slice(i * d, (i + 1) * d)
            hv, hvec = torch.linalg.eigh(c[sl, sl])
            block[sl, sl], var[sl] = hvec.flip(1), hv.flip(0)
        head_xf[key] = (block, var)
    return {"xf-layer": layer_xf, "xf-head": head_xf}


class Pricer:
    """kvq's symbol statistics for a whole cache: per (context) the joint-symbol counts."""

    def __init__(self):
        self.counts: dict[object, np.ndarray] = {}
        self.escapes = 0
        self.elements = 0

    def add(self, q: np.ndarray, context=None) -> None:
        """q: (channels, T) integers of channels that share a context beside their class (None: class only);
        context may also be (channels, T) per-token labels, a tuple's label its first token's."""
        if q.shape[1] == 0:
            return
        self.elements += q.size
        std = q.astype(np.float64).std(axis=1)
        classes = np.clip(np.round(2 * np.log2(np.maximum(std, 1e-30))), -12, 16).astype(int)
        for cls in np.unique(classes):
            rows = q[classes == cls]
            k, m = entropy.class_layout(int(cls))
            n = -(-rows.shape[1] // m)
            pad = np.zeros((rows.shape[0], n * m), np.int64)
            pad[:, :rows.shape[1]] = rows
            tuples = pad.reshape(rows.shape[0], n, m)
            inside = (np.abs(tuples) <= k).all(axis=2)
            sym = np.zeros((rows.shape[0], n), np.int64)
            for j in range(m):
                sym = sym * (2 * k + 1) + (tuples[:, :, j] + k)
            alphabet = (2 * k + 1) ** m + 1
            sym[~inside] = alphabet - 1
            self.escapes += int((~inside).sum()) * m
            if context is None:
                labels = np.zeros_like(sym)
            else:
                labels = np.asarray(context)[classes == cls][:, ::m][:, :n] if np.ndim(context) == 2 else \
                    np.zeros_like(sym)
            for lab in np.unique(labels):
                key = (int(cls), int(lab))
                c = np.bincount(sym[labels == lab], minlength=alphabet)
                self.counts[key] = self.counts[key] + c if key in self.counts else c

    def bits(self) -> float:
        """Stream bits: ideal code lengths under each table fitted on the whole cache, escapes, tables."""
        total = ESCAPE_BITS * self.escapes
        for c in self.counts.values():
            used = c[c > 0].astype(np.float64)
            total += float(-(used * np.log2(used / used.sum())).sum()) + TABLE_SYMBOL_BITS * len(used)
        return total


def bands_of(g: torch.Tensor | None, heads: int, dim: int, tokens: int) -> np.ndarray:
    """Per (channel, token) the exponent band of the token's weight (channels head-major)."""
    if g is None:
        return np.zeros((heads * dim, tokens), np.int64)
    e = np.rint(8 * np.log2(g.numpy())).astype(np.int64)
    band = (e + 24) // BANDS
    return np.repeat(band, dim, axis=0)


def layer_bands(g: torch.Tensor | None, heads: int, dim: int, tokens: int) -> np.ndarray:
    """For cross-head components: the band of the tokens' mean exponent over heads."""
    if g is None:
        return np.zeros((heads * dim, tokens), np.int64)
    e = np.rint(8 * np.log2(g.numpy()).mean(axis=0)).astype(np.int64)
    return np.repeat(((e + 24) // BANDS)[None], heads * dim, axis=0)


def run_candidate(codec, kv: KVCache, name: str, xf: dict | None, scale: float = BASIS_SCALE):
    """(decoded cache, stream bits per class, stream bits per (class, band), elements)."""
    floor = DROP_BELOW * (scale / BASIS_SCALE) ** 2  # the bases' variances are in units of BASIS_SCALE's steps
    plain, banded = Pricer(), Pricer()
    keys, values = [], []
    for layer in range(kv.num_layers):
        start = kv.token_start(layer)
        att = kv.attention[layer] if kv.attention is not None else None
        for kind, x in enumerate((kv.keys[layer], kv.values[layer])):
            u, center, step, g, skip = unit_space(codec, x, layer, kind, start, att)
            heads, dim, tokens = u.shape
            if name == "recent" and tokens:
                cut = max(0, tokens - RECENT)
                u = u.clone()
                u[:, :, cut:] *= 2.0  # half the step: u doubles
                q = torch.round(u)
                uq = q.clone()
                uq[:, :, cut:] /= 2.0
                flat = q.reshape(heads * dim, tokens).numpy().astype(np.int64)
                ctx = bands_of(g, heads, dim, tokens)
            elif xf is None:
                q = torch.round(u)
                uq = q
                flat = q.reshape(heads * dim, tokens).numpy().astype(np.int64)
                ctx = bands_of(g, heads, dim, tokens)
            else:
                basis, var = xf[(layer, kind)]
                f = u.reshape(heads * dim, tokens)
                z = basis.T @ f
                qz = torch.round(z)
                if name.endswith("-drop"):
                    qz[var < floor] = 0
                    flat = qz[var >= floor].numpy().astype(np.int64)
                else:
                    flat = qz.numpy().astype(np.int64)
                uq = (basis @ qz).reshape(heads, dim, tokens)
                ctx = layer_bands(g, heads, dim, tokens)[: flat.shape[0]] if name == "xf-layer" or \
                    name.endswith("-drop") else bands_of(g, heads, dim, tokens)
            plain.add(flat)
            banded.add(flat, ctx)
            (keys, values)[kind].append(back(codec, uq, center, step, g, x, layer, kind, start, skip))
    elements = sum(k.numel() + v.numel() for k, v in zip(kv.keys, kv.values))
    return KVCache(kv.token_ids, keys, values), plain.bits(), banded.bits(), elements


def file_bits(lm, codec, kv: KVCache) -> float:
    meta, parts = kvfile.encode(kv, lm.identity, codec, 256)
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    return 8 * len(data)


def at_bits(curve: list[tuple[float, float]], bits: float) -> float | None:
    """KL on a curve of (bits, KL) points at `bits`, linear in log KL between the neighbouring points; None
    outside the curve."""
    curve = sorted(curve)
    for (b0, k0), (b1, k1) in zip(curve, curve[1:]):
        if b0 <= bits <= b1:
            t = (bits - b0) / (b1 - b0)
            return float(np.exp((1 - t) * np.log(k0) + t * np.log(k1)))
    return None


def means(lines: list[dict]) -> list[dict]:
    """Summary lines from the per-document lines of a run cut short: means over the documents that have every
    (candidate, scale) of the run."""
    rows = [r for r in lines if r.get("what") == "kvq_levers"]
    runs = {(r["candidate"], r["scale"]) for r in rows}
    complete = {d for d in {r["document"] for r in rows}
                if {(r["candidate"], r["scale"]) for r in rows if r["document"] == d} == runs}
    out = []
    for name, scale in sorted(runs):
        rs = [r for r in rows if (r["candidate"], r["scale"]) == (name, scale) and r["document"] in complete]
        out.append({"candidate": name, "scale": scale, "documents": len(rs), "model": rs[0].get("model"),
                    **{k: round(statistics.mean(r[k] for r in rs), 5)
                       for k in ("bits_per_element", "bits_bands", "top1", "kl")}})
    return out


def summarize(lines: list[dict]) -> list[dict]:
    """Per (candidate, scale): the base curve's KL at the candidate's bits and at its bits with band contexts,
    from the means over documents; a ratio under 1 moves the frontier."""
    summary = [r for r in lines if r.get("what") == "kvq_levers_summary"] or means(lines)
    base = [(r["bits_per_element"], r["kl"]) for r in summary if r["candidate"] == "base"]
    out = []
    for r in summary:
        equal = at_bits(base, r["bits_per_element"])
        banded = at_bits(base, r["bits_bands"])
        out.append({"what": "kvq_levers_frontier", "model": r.get("model"), "candidate": r["candidate"],
                    "scale": r["scale"], "documents": r["documents"], "top1": r["top1"], "bits_per_element": r["bits_per_element"], "kl": r["kl"],
                    "kl_ratio_at_equal_bits": round(r["kl"] / equal, 3) if equal and r["candidate"] != "base" else None,
                    "bits_with_bands": r["bits_bands"],
                    "kl_ratio_with_bands": round(r["kl"] / banded, 3) if banded else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_options(ap)
    ap.add_argument("--summarize", type=Path, help="only print the frontier lines of an earlier run's output")
    ap.add_argument("--documents", type=int, default=0)
    ap.add_argument("--scales", type=float, nargs="*", default=[0.6, 0.75, 1.0, 1.3, 1.55, 2.0, 2.6, 3.3],
                    help="kvq scales of the base rows (balanced is 0.75, small 1.55)")
    ap.add_argument("--candidate-scales", type=float, nargs="*", default=[0.75, 1.55, 2.6])
    ap.add_argument("--candidates", nargs="*", default=["xf-layer", "xf-head", "xf-layer-drop", "recent"],
                    help="NAME (at every --candidate-scales value) or NAME@SCALE")
    args = ap.parse_args()
    if args.summarize:
        for line in summarize([json.loads(x) for x in args.summarize.read_text().splitlines() if x.strip()]):
            emit(line)
        return
    torch.set_grad_enabled(False)
    lm = models.load(args.model, "float32")
    env = {**environment(), "model": lm.name}
    profile = args.profile[0]

    runs = [("base", s) for s in args.scales]
    for c in args.candidates:
        name, _, at = c.partition("@")
        runs += [(name, float(s)) for s in ([at] if at else args.candidate_scales)]
    names = {name for name, _ in runs}

    def codec_at(scale: float):
        return kvcli_codec(lm, "balanced", profile, scale / LOSSY_SCALES["balanced"])

    t0 = time.perf_counter()
    cov = fit_bases(lm, codec_at(BASIS_SCALE)) if any(c.startswith("xf") for c in names) else {}
    emit({"what": "kvq_levers_basis_fit", "seconds": round(time.perf_counter() - t0, 1), **env})
    probe = inference.prefill(lm, inference.document_ids(lm, "a b c d e f g h"))
    heads = {(layer, kind): probe.keys[layer].shape[0] for layer in range(probe.num_layers) for kind in (0, 1)}
    xfs = transforms(cov, heads) if cov else {}
    xfs["xf-layer-drop"] = xfs.get("xf-layer")
    for name, scale in runs:
        if name.startswith("xf"):
            floor = DROP_BELOW * (scale / BASIS_SCALE) ** 2 if name.endswith("-drop") else -1
            # float16, only the nonzero blocks (xf-head: per head), only the components kept
            used = sum(int((var >= floor).sum()) * (int((b[:, 0] != 0).sum())) for b, var in xfs[name].values())
            emit({"what": "kvq_levers_dictionary", "candidate": name, "scale": scale, "dictionary_bytes": 2 * used,
                  **env})
    rows: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for doc in corpus(args.corpus)[: args.documents or None]:
        ref = quality.reference(lm, inference.document_ids(lm, doc.read_text()))
        base, overhead = {}, {}
        for name, scale in runs:
            codec = codec_at(scale)
            if scale not in overhead:  # the real file's bytes beside its streams, the same for every candidate
                base[scale] = run_candidate(codec, ref.kv, "base", None)
                real = file_bits(lm, codec, ref.kv)
                overhead[scale] = (real - base[scale][1], real)
            decoded, bits, banded, elements = base[scale] if name == "base" else \
                run_candidate(codec, ref.kv, name, xfs.get(name), scale)
            side, real = overhead[scale]
            agree = quality.compare(lm, ref, decoded)
            row = {"what": "kvq_levers", "document": doc.name, "candidate": name, "scale": scale,
                   "bits_per_element": round((bits + side) / elements, 4),
                   "bits_bands": round((banded + side) / elements, 4),
                   "top1": round(agree.top1, 4), "kl": round(agree.kl, 6)}
            rows[(name, scale)].append(row)
            emit({**row, **env})
    summary = []
    for (name, scale), rs in rows.items():
        mean = {k: round(statistics.mean(r[k] for r in rs), 5) for k in ("bits_per_element", "bits_bands", "top1", "kl")}
        summary.append({"what": "kvq_levers_summary", "candidate": name, "scale": scale, "documents": len(rs),
                        **mean, **env})
        emit(summary[-1])
    for line in summarize(summary):
        emit(line)


if __name__ == "__main__":
    main()
