"""What each command does, without the command line: prefill to a file, load a file for a model, export, import."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from ..codecs.base import Codec, CodecError
from ..codecs.kvq import DEFAULT_SINKS
from ..codecs.presets import DEFAULT_QUALITY, PRESET_CODECS, QUALITIES, TARGET_BITS, TRANSFORM_PRESETS, make_codec
from ..container import dictionary, format, identity, kvfile
from ..errors import FormatError, InputError, ModelMismatchError, UsageError
from ..modeling import inference, models
from ..modeling.kvcache import KVCache
from ..stdio import write_stderr_text
from . import compose

_warned_no_profile: set[str] = set()


@dataclass(frozen=True)
class EncodeOptions:
    """How a cache becomes a file: the preset (--quality) with its expert settings, the segment length and where
    the quantize step runs. Checked when built, so a command refuses a bad value before any work; commands build
    one and hand it down (commands/prefill.py, files.py, ingest.Settings)."""

    quality: str = DEFAULT_QUALITY
    step_scale: float = 1.0  # multiplies the preset's steps (lossy presets)
    sinks: int | None = None  # leading tokens kept exact by lossy presets; None: the codec's default
    chunk_tokens: int = kvfile.DEFAULT_CHUNK_TOKENS
    backend: str = "torch"  # "torch" or "triton" (kernels.placement.resolve)

    def __post_init__(self) -> None:
        if self.quality not in QUALITIES:
            raise UsageError(f"unknown --quality {self.quality!r}; choose one of {', '.join(QUALITIES)}")
        if not (isinstance(self.step_scale, (int, float)) and math.isfinite(self.step_scale) and self.step_scale > 0):
            raise UsageError(f"--step-scale must be a finite number above 0, not {self.step_scale!r}")
        if self.sinks is not None and not (_is_int(self.sinks) and 0 <= self.sinks <= format.MAX_TOKENS):
            raise UsageError(f"--sinks must be an integer in [0, {format.MAX_TOKENS}], not {self.sinks!r}")
        if not (_is_int(self.chunk_tokens) and 1 <= self.chunk_tokens <= format.MAX_TOKENS):
            raise UsageError(f"--chunk-tokens must be an integer in [1, {format.MAX_TOKENS}], "
                             f"not {self.chunk_tokens!r}")
        if self.backend not in ("torch", "triton"):
            raise UsageError(f"backend must be torch or triton, not {self.backend!r}")

    @property
    def lossless(self) -> bool:
        """Whether the preset's codec keeps every bit (asked of the codec class, before any codec is built)."""
        return PRESET_CODECS[self.quality].lossless

    def codec(self, lm: models.LoadedModel) -> Codec:
        return codec_for(self.quality, lm, self.step_scale, self.sinks)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class CacheFile:
    header: format.Header
    kv: KVCache


def read_header(path: str, cache_dir: str | None = None) -> tuple[format.ByteSource, format.Header]:
    """Open a file, `-`, or a remote cache (http(s):// or s3:// URL, streamed; docs/server.md) and read its header."""
    if "://" in path:
        from ..storage import remote

        src = remote.open_source(path, cache_dir)
        if isinstance(src, remote.RemoteSource):
            return src, src.header
    else:
        src = format.open_source(path)
    try:
        return src, format.read_header(src)
    except BaseException:
        src.close()
        raise


def check_identity(header: format.Header, lm: models.LoadedModel, where: str) -> None:
    why = identity.describe_mismatch(header.model, lm.identity)
    if why:
        raise ModelMismatchError(
            f"{where}: made by a different model ({header.model.get('name', '?')}): {why}; "
            "pass the --model that created it, or prefill again"
        )


def check_layout(layers: list[format.LayerShape], token_ids: list[int], lm: models.LoadedModel, where: str) -> None:
    """Refuse, before anything is decoded or allocated, a cache whose shapes or tokens the model cannot take."""
    want = models.expected_layers(lm, len(token_ids))
    if len(layers) != len(want):
        raise ModelMismatchError(f"{where}: the cache has {len(layers)} layers, the model {len(want)}")
    for i, (got, exp) in enumerate(zip(layers, want)):
        if (got.kv_heads, got.key_dim, got.value_dim) != (exp.kv_heads, exp.key_dim, exp.value_dim):
            raise ModelMismatchError(
                f"{where}: layer {i} has (kv_heads, key_dim, value_dim) = {(got.kv_heads, got.key_dim, got.value_dim)}, "
                f"the model {(exp.kv_heads, exp.key_dim, exp.value_dim)}")
        if got.token_start != exp.token_start:
            raise ModelMismatchError(
                f"{where}: layer {i} holds tokens from {got.token_start}, but the model keeps them from "
                f"{exp.token_start} for a {len(token_ids)}-token context")
    vocab = len(lm.tokenizer)
    cfg_vocab = getattr(lm.model.config.get_text_config(decoder=True), "vocab_size", None) or vocab
    limit = max(vocab, cfg_vocab)
    bad = next((t for t in token_ids if t >= limit), None)
    if bad is not None:
        raise ModelMismatchError(f"{where}: token id {bad} is outside the model's vocabulary of {limit}")
    inference.check_length(lm, len(token_ids), f"{where}: the cached context")


def load_cache(src: format.ByteSource, header: format.Header, lm: models.LoadedModel,
               backend: str = "torch") -> CacheFile:
    """Verify and decode an opened file for `lm` onto the model's device, refusing caches made by any other
    model, before decoding."""
    where = getattr(src, "path", "<input>")
    check_identity(header, lm, where)
    check_layout(header.layers, header.token_ids, lm, where)
    kv = kvfile.decode(src, header, device=next(lm.model.parameters()).device, backend=backend)
    if kv.dtype != lm.model.dtype:
        kv = KVCache(kv.token_ids, [k.to(lm.model.dtype) for k in kv.keys], [v.to(lm.model.dtype) for v in kv.values])
    return CacheFile(header, kv)


def codec_for(quality: str, lm: models.LoadedModel, step_scale: float = 1.0, sinks: int | None = None,
              transform: bool = True) -> Codec:
    """The preset's codec for this model: its calibration profile (measured now if it has none and automatic
    calibration is on) with the preset's step scale for this model where the profile sets one, its rotary
    frequencies, and for TRANSFORM_PRESETS the per-head transform of the dictionary the profile names (unless
    `transform` is False)."""
    from ..calibration.calibrate import calibration_for
    from ..codecs.transform import Transforms
    from ..modeling.rope import inv_freq_per_layer

    if quality not in PRESET_CODECS or PRESET_CODECS[quality].lossless:  # nothing to calibrate (or refused)
        return make_codec(quality)
    transform = transform and quality in TRANSFORM_PRESETS
    stored = calibration_for(lm, transform, quality in TARGET_BITS)
    if stored is None and lm.identity["weights_digest"] not in _warned_no_profile:
        _warned_no_profile.add(lm.identity["weights_digest"])
        write_stderr_text(f"kvcli: no calibration profile for {lm.name} (KVCLI_AUTO_CALIBRATE=0): --quality "
                          f"{quality} uses uniform steps, which costs quality at the same size; run `kvcli calibrate "
                          "--model ...` once to measure one\n")
    transforms = sha = None
    if transform and stored is not None and stored.dictionary is not None:
        found = dictionary.find(stored.dictionary, dictionary.own_places(), f"profile {stored.where}")
        dictionary.check_model(found, lm.identity, f"profile {stored.where}")
        try:
            transforms, sha = Transforms.unpack(found.payload), found.sha
        except CodecError as err:
            raise FormatError(f"{found.where}: {err}") from None
    return make_codec(quality, stored.profile if stored is not None else None, inv_freq_per_layer(lm.model),
                      step_scale, DEFAULT_SINKS if sinks is None else sinks, transforms=transforms, dictionary=sha,
                      base_scale=stored.scale(quality) if stored is not None else None,
                      token_alpha=stored.token_alpha if stored is not None and quality in TARGET_BITS else None)


def provenance(source: inference.Document | None = None) -> dict:
    """Header fields that say where and when a cache was made (docs/format.md, "Header"). SOURCE_DATE_EPOCH,
    the reproducible-builds convention, replaces the clock so reruns can produce identical bytes."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = int(epoch) if epoch.isdigit() else time.time()
    extra = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))}
    if source is not None:
        extra["source"] = source.provenance()
    return extra


def check_finite(kv: KVCache, options: EncodeOptions, where: str) -> None:
    """Lossy codecs cannot represent NaN or Inf; refuse before writing rather than write an unreadable file."""
    if options.lossless:
        return
    for i in range(kv.num_layers):
        for kind, t in (("keys", kv.keys[i]), ("values", kv.values[i])):
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"{where}: {kind}.{i} holds NaN or Inf values, which lossy presets cannot store; "
                                 "use --quality lossless")


def encode_cache(kv: KVCache, lm_identity: dict, codec: Codec, chunk_tokens: int,
                 extra: dict | None = None, backend: str = "torch") -> tuple[dict, list[format.SegmentData]]:
    """kvfile.encode, with the codec's refusals (values it cannot store, or whose file its reader would refuse)
    reported as the input problem they are."""
    try:
        return kvfile.encode(kv, lm_identity, codec, chunk_tokens, extra, backend)
    except CodecError as err:
        raise InputError(f"cannot store this cache with codec {codec.name}: {err}") from None


def codec_dictionary(codec: Codec) -> dictionary.Dictionary | None:
    """The dictionary a codec's files name (kvq version 4 with a transform), from this machine's own places."""
    sha = getattr(codec, "dictionary", None)
    return None if sha is None else dictionary.find(sha, dictionary.own_places(), f"codec {codec.name}")


def with_dictionary(parts: list[format.SegmentData], found: dictionary.Dictionary) -> list[format.SegmentData]:
    """The file's segments with its dictionary embedded (aux segments come first)."""
    return [format.SegmentData("aux", -1, 0, 0, found.data, dictionary.AUX_NAME)] + parts


def write_cache(out: str, kv: KVCache, lm_identity: dict, codec: Codec, chunk_tokens: int,
                extra: dict | None = None, backend: str = "torch", self_contained: bool = False) -> int:
    """Write the file. A file that names a dictionary gets it beside itself (OUT's directory/dicts/, written
    first, so no reader sees the file without it), or inside itself with `self_contained` and on a stream, which
    has no beside."""
    meta, parts = encode_cache(kv, lm_identity, codec, chunk_tokens, extra, backend)
    found = codec_dictionary(codec)
    if found is not None:
        if self_contained or out == "-" or format.is_stream(out):
            parts = with_dictionary(parts, found)
        else:
            dictionary.save(found, os.path.dirname(out) or ".")
    return format.write_kvc(out, meta, parts)


def checked_ids(lm: models.LoadedModel, doc: inference.Document) -> list[int]:
    """The document's tokens, refused early (by size, then by token count) when the context cannot hold them."""
    inference.check_document_size(lm, doc)
    ids = inference.document_ids(lm, doc.text)
    inference.check_length(lm, len(ids), f"{doc.name}: the document")
    return ids


def prefill_document(doc: inference.Document, ids: list[int], lm: models.LoadedModel, codec: Codec, out: str,
                     options: EncodeOptions = EncodeOptions()) -> tuple[KVCache, int]:
    """The document's cache written to `out` with `codec` (options.codec(lm), built once by the caller), cut and
    quantized as `options` say."""
    kv = inference.prefill(lm, ids, attention=not codec.lossless)
    size = write_cache(out, kv, lm.identity, codec, options.chunk_tokens, provenance(doc), options.backend)
    return kv, size


def check_shapes(kv: KVCache, lm: models.LoadedModel, where: str) -> None:
    """An imported cache must have exactly the layout the model's own prefill would give its tokens."""
    layers = [format.LayerShape(kv.keys[i].shape[0], kv.keys[i].shape[2], kv.values[i].shape[2], kv.token_start(i))
              for i in range(kv.num_layers)]
    check_layout(layers, kv.token_ids, lm, where)


def load_composed(opened: list[tuple[format.ByteSource, format.Header]], lm: models.LoadedModel,
                  recompute_fraction: float = 0.0, backend: str = "torch") -> KVCache:
    """Opened files joined in order into one context, as if their documents had been concatenated
    (kvcli/reuse/compose.py), with a fraction of its tokens recomputed. Every file is checked against the model, and
    the composed length against its context, before any is decoded; one file and no recomputation is load_cache.
    The composition is planned once, from the headers, and the plan is what places the decoded caches."""
    names = [getattr(src, "path", "<input>") for src, _ in opened]
    for (src, header), where in zip(opened, names):
        check_identity(header, lm, where)
    plan = compose.plan_composition(lm, [header.token_ids for _, header in opened], names) if len(opened) > 1 else None
    if recompute_fraction:
        compose.check_recomputable(lm)
    caches = [load_cache(src, header, lm, backend).kv for src, header in opened]
    kv = compose.compose_caches(lm, caches, names, plan)
    return compose.recompute_tokens(lm, kv, recompute_fraction).kv
