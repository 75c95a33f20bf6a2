"""Quality levels of one document from one file: `kvcli push FILE STORE --quality high,balanced,small`.

    result = push_levels(store, "doc.kvc", ("high", "balanced", "small"), model=None)
    result["levels"]  # per level, in the order asked: quality, key, url, bytes, uploaded, resumed_from, sent, made

A level is only ever made from a file at least as good: a lossless or raw file gives every level, a lossy file
its own level (the file itself, never a re-encode) and the lossy levels below it, and a file written with
--step-scale (no preset, so no level) gives none. Anything else is refused before any work.

FILE is validated and decoded once; each level it is not is encoded from the decoded cache as a prefill encodes
that preset for the model (its calibration profile, the preset's sinks, the attention the tokens receive, measured
again by running the last tokens: inference.measure_attention), in FILE's own chunks, so the levels mix
(docs/format.md, "Mixed-level decoding"). Every level is encoded, to a temporary directory, before
the first upload starts: a level that cannot be encoded leaves the store as it was. The uploads are store.push,
one level after another; one that fails leaves the levels before it stored whole and indexed, which a rerun skips
as it skips every level already stored (not even encoded again).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..codecs.presets import PRESET_CODECS, make_codec
from ..container import format, keys, kvfile
from ..errors import InternalError, UsageError
from ..modeling import inference
from ..storage import store as stores
from ..container.level import QUALITY_RANK, quality_of
from . import pipeline
from .ingest import check_qualities


def exact(quality: str) -> bool:
    return PRESET_CODECS[quality].lossless


def check_derivable(header: format.Header, path: str, qualities: tuple[str, ...]) -> str | None:
    """The file's own level (None: it is none), once every level asked for is one the file can give."""
    source = quality_of(header.codec)
    if source is None:
        params = header.codec.get("params") or {}
        how = (f"--step-scale {params['step_scale']:g}" if isinstance(params.get("step_scale"), (int, float))
               else f"codec {header.codec.get('name')!r}")
        raise UsageError(f"{path}: written with {how}, which is no preset, so it gives no level; push it without "
                         f"--quality, or prefill the document with --quality {','.join(qualities)}")
    for quality in qualities:
        if quality == source or exact(source) or (not exact(quality) and QUALITY_RANK[quality] < QUALITY_RANK[source]):
            continue
        raise UsageError(f"{path} is a {source} file: it cannot give the {quality} level (a level is made only "
                         f"from a better file); push the document's lossless file, or prefill it with --quality "
                         f"{quality}")
    return source


def level_codec(quality: str, header: format.Header, path: str, model: str | None, loaded: dict):
    """The preset's codec as a prefill builds it; the model is loaded once, and only for a lossy preset (its
    calibration profile, rotary frequencies and attention), and must be the one that made the file."""
    if exact(quality):
        return make_codec(quality)
    if "lm" not in loaded:
        from ..modeling import models

        loaded["lm"] = models.load(model, header.dtype, loaded["device"])
        pipeline.check_identity(header, loaded["lm"], path)
    return pipeline.EncodeOptions(quality).codec(loaded["lm"])


def push_levels(target, path: str | Path, qualities, model: str | None = None, device: str = "cpu",
                backend: str = "torch") -> dict:
    """Store each level of FILE's document that `qualities` names (module doc). `model`: the model that made the
    file (None: the bundled default), needed only for lossy levels other than the file's own."""
    qualities = check_qualities(qualities)
    path = str(path)
    with format.FileSource(path) as src:
        header = stores.validate(src)
        source = check_derivable(header, path, qualities)
        loaded: dict = {"device": device}
        plans = []  # (quality, key, codec to encode it with; None: FILE itself, or stored already)
        for quality in qualities:
            if quality == source:
                plans.append((quality, keys.key_of_header(header), None))
                continue
            codec = level_codec(quality, header, path, model, loaded)
            key = keys.derive_key(header.model, header.dtype, {"name": codec.name, "params": codec.params()},
                                  header.token_ids)
            plans.append((quality, key, None if stores.stored_soundly(target, key) else codec))
        with tempfile.TemporaryDirectory(prefix="kvcli-push-") as staging:
            files = encode_levels(src, header, path, plans, Path(staging), loaded.get("lm"), device, backend)
            levels = []
            for quality, key, _ in plans:
                made = "file" if quality == source else "encoded" if quality in files else "stored"
                pushed = upload(target, key, path if made == "file" else files.get(quality))
                levels.append({"quality": quality, **pushed, "made": made})
    return {"file": path, "source_quality": source, "levels": levels}


def upload(target, key: str, file: str | None) -> dict:
    """store.push of a level's file; None: a level found stored before any work, reported as push reports it."""
    if file is not None:
        return stores.push(target, file)
    return {"key": key, "url": target.url_for(key), "bytes": target.size(key), "uploaded": False, "resumed_from": 0,
            "sent": 0}


def encode_levels(src: format.ByteSource, header: format.Header, path: str, plans, staging: Path, lm, device: str,
                  backend: str) -> dict[str, str]:
    """Each level still to store, encoded from one decode of the file into `staging`: {quality: path}. With the
    model (lossy levels), the attention the tokens receive is measured first, as a prefill measures it."""
    todo = [(quality, codec) for quality, _, codec in plans if codec is not None]
    key_of = {quality: key for quality, key, _ in plans}
    if not todo:
        return {}
    kv = kvfile.decode(src, header, device=device, backend=backend)
    for quality, _ in todo:
        pipeline.check_finite(kv, pipeline.EncodeOptions(quality), path)
    if any(not codec.lossless for _, codec in todo):
        kv.attention = inference.measure_attention(lm, kv)
    extra = {name: value for name, value in (("created_at", header.created_at), ("source", header.source)) if value}
    files = {}
    for quality, codec in todo:
        meta, parts = pipeline.encode_cache(kv, header.model, codec, header.chunk_tokens, extra, backend)
        files[quality] = str(staging / f"{quality}.kvc")
        format.write_kvc(files[quality], meta, parts)
        with format.FileSource(files[quality]) as written:
            got = keys.key_of_header(format.read_header(written))
        if got != key_of[quality]:  # the level must land where a prefill of that preset would store it
            raise InternalError(f"{path}: the {quality} level encoded to key {got}, not the preset's {key_of[quality]}")
    return files
