"""Rate-distortion of kvcli's presets against baseline codecs, all measured in one run.

    python bench/rate_distortion.py [--model M] [--profile auto|none|PATH] [--corpus DIR] [--plot rd.png] [--step-scales S ...]
                                    [--codecs NAME ...] [--documents N] [--variants SPEC ...]
    python bench/rate_distortion.py --plot rd.png --plot-from RUN.jsonl ...

`--plot-from` draws the plot from the summary lines of earlier runs instead of measuring (a codec in a later file
replaces the same codec of an earlier one), for runs that measured different codecs of one model on one corpus.

KVTC (bench/kvtc.py) runs when named: `--codecs kvtc@1.0 kvtc@1.5`, the number its target bits per element
before DEFLATE; its basis is fitted once on kvcli's calibration texts and its bytes reported apart
(`dictionary_bytes`).

`--variants alpha=A,coarsest=C,scale=S ...` adds rows `kvcli:PRESET{SPEC}` for each kvcli preset with other encoder
settings: the token weights' alpha (0: none), the largest token exponent (docs/codec.md, "Token weights"), the step
scale; what a SPEC leaves out stays the preset's.

Protocol (issue "The CacheGen-style lossy codec"): the model (default: the bundled one) in float32; prefix = the first 2,048 tokens of
each document, exact cache as the reference; the next 128 tokens teacher-forced; top-1 agreement and dNLL over
those positions; greedy continuation of 64 tokens and its first divergence; bits per element from real bytes
(for kvcli: the whole .kvc file, header and tables included). One JSON line per (document, codec), then one
summary line per codec with the mean over documents.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from baselines import registry
from common import DEFAULT_CORPUS, corpus, emit, environment
from kvtc import Kvtc

from kvcli.calibration import profiles, quality
from kvcli.calibration.calibrate import default_texts
from kvcli.codecs.kvq import KvqCodec
from kvcli.codecs.presets import make_codec
from kvcli.container import format, kvfile
from kvcli.modeling import inference, models
from kvcli.modeling.kvcache import KVCache
from kvcli.modeling.rope import inv_freq_per_layer
from kvcli.reuse import pipeline

KVCLI_PRESETS = ("lossless", "high", "balanced", "small", "tiny")


VARIANT_KEYS = {"alpha": float, "coarsest": int, "scale": float}


def variant(spec: str) -> tuple[str, dict]:
    """(spec, settings) from `alpha=A,coarsest=C,scale=S` (any subset), for --variants."""
    settings = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in VARIANT_KEYS:
            raise argparse.ArgumentTypeError(f"{spec!r}: a variant sets {', '.join(VARIANT_KEYS)}, not {key!r}")
        try:
            settings[key] = VARIANT_KEYS[key](value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{spec!r}: {key} takes a number, not {value!r}") from None
    return spec, settings


def variants_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--variants", type=variant, nargs="*", default=[], metavar="SPEC",
                    help="kvcli's presets with other encoder settings, alpha=A,coarsest=C,scale=S "
                         "(rows kvcli:PRESET{SPEC})")


def kvcli_codec(lm, preset: str, profile: str, step_scale: float = 1.0, version: int | None = None,
                transform: bool = True, settings: dict | None = None):
    """auto: what `kvcli prefill` would use (a stored profile, else automatic calibration; with its dictionary's
    transform unless `transform` is False); none: uniform steps; else the profile stored at that path, whatever
    model it names. version: the kvq bitstream version to write (default: kvcli's; a transform needs 4).
    settings: a --variants' alpha and coarsest in place of the preset's (its scale is the caller's step_scale)."""
    if profile == "auto":
        codec = pipeline.codec_for(preset, lm, step_scale, transform=transform)
    else:
        chosen = None if profile == "none" else profiles.load(Path(profile))
        codec = make_codec(preset, chosen, inv_freq_per_layer(lm.model), step_scale)
    if version is not None and isinstance(codec, KvqCodec) and version != codec.version:
        if codec.transforms is not None:
            raise SystemExit(f"kvq version {version} has no transform: add --no-transform")
        codec = KvqCodec(codec.scale, codec.sinks, codec.profile, codec.inv_freq, codec.meta, codec.token_alpha, version)
    if settings and isinstance(codec, KvqCodec):
        alpha = settings.get("alpha", codec.token_alpha)
        codec = KvqCodec(codec.scale, codec.sinks, codec.profile, codec.inv_freq, {**codec.meta, "token_alpha": alpha},
                         alpha, codec.version, codec.transforms, codec.dictionary,
                         settings.get("coarsest", codec.token_coarsest))
    return codec


def measure_kvcli(lm, ref: quality.Reference, preset: str, profile: str, step_scale: float = 1.0,
                  version: int | None = None, transform: bool = True, settings: dict | None = None):
    codec = kvcli_codec(lm, preset, profile, step_scale, version, transform, settings)
    t0 = time.perf_counter()
    meta, parts = kvfile.encode(ref.kv, lm.identity, codec, 256)
    data = format.build_header(meta, parts) + b"".join(p.data for p in parts)
    enc_s = time.perf_counter() - t0
    src = format.BytesSource(data)
    header = format.read_header(src)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        decoded = kvfile.decode(src, header)
        times.append(time.perf_counter() - t0)
    return len(data), enc_s, statistics.median(times), decoded, header.codec.get("params", {})


def measure_baseline(ref: quality.Reference, enc, dec):
    kv = ref.kv
    t0 = time.perf_counter()
    blobs = [(enc(x.float(), layer, kind, kv.token_start(layer)), x.shape) for layer in range(kv.num_layers)
             for kind, x in enumerate((kv.keys[layer], kv.values[layer]))]
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = [dec(b, shape, i // 2, i % 2, kv.token_start(i // 2)) for i, (b, shape) in enumerate(blobs)]
    dec_s = time.perf_counter() - t0
    decoded = KVCache(kv.token_ids, out[0::2], out[1::2])
    return sum(len(b) for b, _ in blobs), enc_s, dec_s, decoded


def kvtc_baselines(lm, names: list[str], baselines: dict) -> dict[str, int]:
    """Adds each kvtc@B to `baselines` (one basis fitted for all); returns name -> dictionary bytes."""
    if not names:
        return {}
    kvtc = Kvtc.fit(lm, [text for _, text in default_texts()])
    out = {}
    for name in names:
        plans = kvtc.plans(float(name.split("@", 1)[1]))
        baselines[name] = (lambda x, l, k, s, plans=plans: kvtc.encode(plans[(l, k)], x, l, k, s),
                           lambda b, shape, l, k, s, plans=plans: kvtc.decode(plans[(l, k)], b, shape, l, k, s))
        out[name] = kvtc.dictionary_bytes(plans)
    return out


def model_options(ap: argparse.ArgumentParser) -> None:
    """--model, --profile and --corpus, as every benchmark of kvcli's lossy presets takes them."""
    ap.add_argument("--model", help="model directory or .gguf file [default: the bundled model]")
    ap.add_argument("--profile", nargs="+", default=["auto"],
                    help="kvcli's calibration, one or more of: auto, none, a profile's path (each its own rows)")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_options(ap)
    ap.add_argument("--plot", type=Path, help="write a PNG of bits/element against top-1 agreement")
    ap.add_argument("--kvq-version", type=int, choices=(3, 4),
                    help="kvq bitstream version kvcli's presets write [default: kvcli's]")
    ap.add_argument("--no-transform", action="store_true",
                    help="kvcli's presets without the model's per-head transform (its profile's dictionary)")
    ap.add_argument("--codecs", nargs="*", help="subset of codecs to run (kvcli:PRESET or a baseline name)")
    ap.add_argument("--documents", type=int, default=0, help="only the first N documents")
    ap.add_argument("--greedy-tokens", type=int, default=64, help="greedy continuation length; 0 skips it")
    ap.add_argument("--step-scales", type=float, nargs="*", default=[],
                    help="also run each kvcli preset at these --step-scale values (rows kvcli:PRESET@SCALE)")
    variants_option(ap)
    ap.add_argument("--plot-from", type=Path, nargs="+", metavar="JSONL",
                    help="with --plot: plot these runs' summary lines instead of measuring")
    args = ap.parse_args()
    if args.plot_from:
        if not args.plot:
            raise SystemExit("--plot-from needs --plot")
        replot(args.plot_from, args.plot)
        return
    torch.set_grad_enabled(False)
    lm = models.load(args.model, "float32")
    env = {**environment(), "model": lm.name}
    layers = lm.model.config.get_text_config(decoder=True).num_hidden_layers
    baselines = registry(layers)
    names = [f"kvcli:{p}" for p in KVCLI_PRESETS] + list(baselines)
    dictionary: dict[str, int] = {}
    if args.codecs:
        names = [c for c in names if c in args.codecs]
        dictionary = kvtc_baselines(lm, [c for c in args.codecs if c.startswith("kvtc@")], baselines)
        names += list(dictionary)
    # (label, codec, profile): kvcli's presets once per profile, labelled by it when there are several (by the
    # file's stem, or its whole path where two stems are the same: rows with one label are averaged together).
    stems = [Path(prof).stem for prof in args.profile]
    tags = stems if len(set(stems)) == len(stems) else args.profile
    runs = [(name if len(args.profile) == 1 else f"{name}[{tag}]", name, prof, 1.0, None)
            for name in names if name.startswith("kvcli:") for prof, tag in zip(args.profile, tags)]
    plain = [run for run in runs if run[1] != "kvcli:lossless"]
    runs += [(f"{label}@{scale:g}", name, prof, scale, None) for label, name, prof, _, _ in plain
             for scale in args.step_scales]
    runs += [(f"{label}{{{spec}}}", name, prof, settings.get("scale", 1.0), settings)
             for label, name, prof, _, _ in plain for spec, settings in args.variants]
    runs += [(name, name, None, 1.0, None) for name in names if not name.startswith("kvcli:")]
    docs = corpus(args.corpus)[: args.documents or None]
    rows: dict[str, list[dict]] = {label: [] for label, _, _, _, _ in runs}
    for doc in docs:
        ids = inference.document_ids(lm, doc.read_text())
        ref = quality.reference(lm, ids)
        exact_greedy = quality.greedy_continuation(lm, ref, ref.kv, args.greedy_tokens) if args.greedy_tokens else None
        elements = sum(k.numel() + v.numel() for k, v in zip(ref.kv.keys, ref.kv.values))
        for label, name, prof, scale, settings in runs:
            if prof is not None:
                size, enc_s, dec_s, decoded, params = measure_kvcli(lm, ref, name.split(":", 1)[1], prof, scale,
                                                                    args.kvq_version, not args.no_transform, settings)
            else:
                enc, dec = baselines[name]
                size, enc_s, dec_s, decoded = measure_baseline(ref, enc, dec)
                params = {}
            agree = quality.compare(lm, ref, decoded)
            diverge = quality.first_divergence(exact_greedy, quality.greedy_continuation(
                lm, ref, decoded, args.greedy_tokens)) if exact_greedy else None
            row = {"what": "rate_distortion", "document": doc.name, "codec": label, "profile": prof,
                   "kvq_version": params.get("version"), "dictionary": params.get("dictionary"),
                   "tokens": ref.kv.num_tokens, "bits_per_element": round(8 * size / elements, 4), "bytes": size,
                   "top1": round(agree.top1, 4), "dnll": round(agree.dnll, 5), "kl": round(agree.kl, 6),
                   "first_divergence": diverge, "encode_elements_per_s": round(elements / enc_s),
                   "decode_elements_per_s": round(elements / dec_s)}
            rows[label].append(row)
            emit({**row, **env})
    summary = []
    for label, rs in rows.items():
        if not rs:
            continue
        mean = {k: round(statistics.mean(r[k] for r in rs), 5) for k in ("bits_per_element", "top1", "dnll", "kl")
                + (("first_divergence",) if args.greedy_tokens else ())}
        speed = {k: round(statistics.median(r[k] for r in rs)) for k in ("encode_elements_per_s", "decode_elements_per_s")}
        line = {"what": "rate_distortion_summary", "codec": label, "profile": rs[0]["profile"], "documents": len(rs),
                **mean, **speed, **env}
        if label in dictionary:
            line["dictionary_bytes"] = dictionary[label]
        summary.append(line)
        emit(line)
    if args.plot:
        plot(summary, args.plot, lm.name)


def replot(runs: list[Path], path: Path) -> None:
    import json

    summary: dict[str, dict] = {}
    for run in runs:
        for line in run.read_text().splitlines():
            row = json.loads(line)
            if row.get("what") == "rate_distortion_summary":
                summary[row["codec"]] = row
    names = {row.get("model") for row in summary.values()}
    if len(names) != 1:
        raise SystemExit(f"--plot-from: the runs must be of one model, found {sorted(map(str, names))}")
    plot(list(summary.values()), path, names.pop())


def plot(summary: list[dict], path: Path, model: str) -> None:
    """Two panels over bits per element: top-1 agreement, and KL on a log scale (codecs with KL 0 left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, kl) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    panels = [(ax, key, [s for s in summary if key != "kl" or s["kl"] > 0]) for ax, key in ((top, "top1"), (kl, "kl"))]
    for ax, key, shown in panels:
        for s in shown:
            ours = s["codec"].startswith("kvcli:")
            if not s["codec"].startswith("kvtc@"):
                ax.scatter(s["bits_per_element"], s[key], marker="o" if ours else "s", color="C0" if ours else "C1")
        kvtc = sorted((s["bits_per_element"], s[key]) for s in shown if s["codec"].startswith("kvtc@"))
        if kvtc:  # one curve: its points are one method at several targets
            ax.plot(*zip(*kvtc), marker="^", color="C2", label="KVTC")
            ax.legend(loc="best", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per element (log scale, real file bytes)")
        ax.grid(alpha=0.3)
    top.set_ylabel("top-1 agreement with the exact cache")
    kl.set_yscale("log")
    kl.set_ylabel("KL(exact || decoded), nats per position")
    fig.suptitle(f"{model}, 2,048-token prefixes, mean over the corpus")
    fig.tight_layout()
    for ax, key, shown in panels:  # after the layout, which moves the axes the names are measured in
        _label(fig, ax, [(s["bits_per_element"], s[key], s["codec"]) for s in shown])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _label(fig, ax, points: list[tuple[float, float, str]]) -> None:
    """Each point's name beside it, at the first of four places inside the axes where it overlaps no name placed
    before."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = []
    for x, y, name in sorted(points):
        for dx, dy, ha in ((4, 3, "left"), (4, -10, "left"), (-4, 3, "right"), (-4, -10, "right")):
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, ha=ha)
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                break
            text.remove()
        else:  # crowded everywhere: keep the first place
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
            box = text.get_window_extent(renderer)
        placed.append(box)


if __name__ == "__main__":
    main()
