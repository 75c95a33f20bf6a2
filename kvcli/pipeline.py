"""What each command does, without the command line: prefill to a file, load a file for a model, export, import."""

from __future__ import annotations

from dataclasses import dataclass

from . import format, identity, inference, kvfile, models
from .codecs import Codec
from .codecs.kvq import DEFAULT_SINKS
from .codecs.presets import make_codec
from .errors import ModelMismatchError
from .kvcache import KVCache


@dataclass
class CacheFile:
    header: format.Header
    kv: KVCache


def read_header(path: str) -> tuple[format.ByteSource, format.Header]:
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


def load_cache(src: format.ByteSource, header: format.Header, lm: models.LoadedModel) -> CacheFile:
    """Verify and decode an opened file for `lm`, refusing caches made by any other model."""
    check_identity(header, lm, getattr(src, "path", "<input>"))
    kv = kvfile.decode(src, header)
    if kv.dtype != lm.model.dtype:
        kv = KVCache(kv.token_ids, [k.to(lm.model.dtype) for k in kv.keys], [v.to(lm.model.dtype) for v in kv.values])
    return CacheFile(header, kv)


def codec_for(quality: str, lm: models.LoadedModel, step_scale: float = 1.0, sinks: int | None = None) -> Codec:
    """The preset's codec for this model: its calibration profile (if any) and its rotary frequencies."""
    from . import profiles
    from .rope import inv_freq_per_layer

    if quality in ("lossless", "raw"):
        return make_codec(quality)
    return make_codec(quality, profiles.find(lm.identity), inv_freq_per_layer(lm.model), step_scale,
                      DEFAULT_SINKS if sinks is None else sinks)


def write_cache(out: str, kv: KVCache, lm_identity: dict, codec: Codec, chunk_tokens: int) -> int:
    meta, parts = kvfile.encode(kv, lm_identity, codec, chunk_tokens)
    return format.write_kvc(out, meta, parts)


def prefill_document(text: str, lm: models.LoadedModel, codec: Codec, chunk_tokens: int, out: str) -> tuple[KVCache, int]:
    ids = inference.document_ids(lm, text)
    kv = inference.prefill(lm, ids)  # refuses a document longer than the model's context
    size = write_cache(out, kv, lm.identity, codec, chunk_tokens)
    return kv, size


def check_shapes(kv: KVCache, lm: models.LoadedModel) -> None:
    """An imported cache must have the model's layer count and head shapes."""
    reference = inference.prefill(lm, kv.token_ids[:1])
    if reference.num_layers != kv.num_layers:
        raise ModelMismatchError(f"the cache has {kv.num_layers} layers, the model {reference.num_layers}")
    for i in range(kv.num_layers):
        want = (reference.keys[i].shape[0], reference.keys[i].shape[2], reference.values[i].shape[2])
        got = (kv.keys[i].shape[0], kv.keys[i].shape[2], kv.values[i].shape[2])
        if want != got:
            raise ModelMismatchError(f"layer {i}: (kv_heads, key_dim, value_dim) = {got}, the model has {want}")
