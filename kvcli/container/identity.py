"""Model identity: the facts a cache must share with the model that reads it (docs/format.md, "Model identity").

- config digest: SHA-256 of the canonical JSON (RFC 8785) of the allow-listed, computation-relevant fields of
  config.json as saved, with the rope parameters brought to one form and documented defaults dropped;
- weights digest: SHA-256 of the canonical JSON of every tensor's name, dtype, shape and BLAKE3 of all its bytes,
  read from the safetensors files, so sharding and file metadata do not count and one changed float does;
- tokenizer digest: SHA-256 of the canonical JSON of the tokenizer's serialized definition, less runtime state.

Tensor digests cost a full read, so they are kept per weight file in a digest cache keyed by the file's resolved
path, size, mtime and inode (as git's index does); later loads read only the safetensors headers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ..errors import ModelLoadError, StorageError
from .format import STALE_TEMP_SECONDS, TEMP_MARK, TEMP_NAME, atomic_write

# ---------------------------------------------------------------------------------------------------------------
# Canonical JSON (RFC 8785, the JSON Canonicalization Scheme)

MAX_EXACT_INT = 1 << 53


def canonical_json(value) -> bytes:
    """RFC 8785 bytes of a JSON value: sorted keys, no whitespace, ECMAScript number form. ValueError if not JSON."""
    return _jcs(value).encode("utf-8")


def _jcs(value) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _jcs_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_jcs(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _jcs(v) for k, v in items) + "}"
    raise ValueError(f"not a JSON value: {type(value).__name__}")


def _jcs_number(x: int | float) -> str:
    """ECMAScript Number::toString of the binary64 value; 10000 and 10000.0 are the same number."""
    if isinstance(x, int) and abs(x) > MAX_EXACT_INT:
        raise ValueError(f"integer {x} is not exact as a binary64 number")
    f = float(x)
    if not math.isfinite(f):
        raise ValueError(f"{f} is not a JSON number")
    if f == 0:
        return "0"
    mantissa, _, exp = repr(abs(f)).partition("e")  # repr gives the shortest digits that round-trip
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    e = int(exp or 0) - len(frac)
    while digits.endswith("0"):
        digits, e = digits[:-1], e + 1
    k, n = len(digits), len(digits) + e  # value = 0.digits x 10^n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        text = digits[0] + ("." + digits[1:] if k > 1 else "") + f"e{'+' if n >= 1 else '-'}{abs(n - 1)}"
    return ("-" if f < 0 else "") + text


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Config digest

# The config.json fields that change what the model computes (docs/format.md lists the same set). An allow-list:
# fields a newer transformers adds for its own bookkeeping must not change the identity of old models.
CONFIG_FIELDS = frozenset(
    {
        "model_type", "quantization_config",
        # sizes
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "original_max_position_embeddings",
        "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx",
        "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
        # mixture of experts
        "num_experts", "num_local_experts", "num_experts_per_tok", "n_routed_experts", "n_shared_experts",
        "moe_intermediate_size", "shared_expert_intermediate_size", "first_k_dense_replace", "decoder_sparse_step",
        "mlp_only_layers", "moe_layer_freq", "norm_topk_prob", "routed_scaling_factor", "topk_group", "n_group",
        "topk_method", "scoring_func",
        # activation and normalization
        "hidden_act", "hidden_activation", "activation_function",
        "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon",
        # positions
        "rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq", "partial_rotary_factor",
        "rotary_pct", "rotary_emb_base", "rotary_dim", "position_embedding_type", "alibi", "no_rope_layers",
        # attention
        "attention_bias", "mlp_bias", "bias", "qkv_bias", "sliding_window", "use_sliding_window",
        "max_window_layers", "sliding_window_pattern", "layer_types", "attention_chunk_size",
        "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "use_qk_norm",
        "qk_layernorm", "clip_qkv", "attn_temperature_tuning", "floor_scale", "attn_scale", "multi_query",
        "new_decoder_architecture", "parallel_attn", "use_parallel_residual", "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
        # scaling and tying
        "attention_multiplier", "embedding_multiplier", "residual_multiplier", "logits_scaling",
        "scale_embedding", "pretraining_tp", "tie_word_embeddings",
    }
)
# A field equal to its default is dropped, so absent and present-with-default hash the same. Only defaults that
# hold for every architecture are listed; others (tie_word_embeddings, sliding_window, ...) hash as saved.
CONFIG_DEFAULTS = {"pretraining_tp": 1, "attention_bias": False, "mlp_bias": False}
ROPE_SCALED_TYPES = ("llama3", "yarn", "longrope")
EXCLUDED_SUB_CONFIGS = frozenset({"quantization_config"})  # hashed whole as a field, not as a nested config


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        doc = json.loads(path.read_bytes(), parse_constant=_refuse_constant)
    except (OSError, ValueError, RecursionError) as err:
        raise ModelLoadError(f"{path}: cannot read the model config: {err}") from None
    if not isinstance(doc, dict):
        raise ModelLoadError(f"{path}: the model config is not a JSON object")
    return doc


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def config_digest(config: dict, where: str = "config.json") -> str:
    try:
        return sha256_hex(canonical_json(canonical_config(config)))
    except (ValueError, TypeError) as err:
        raise ModelLoadError(f"{where}: a computation field has an unusable value: {err}") from None


def canonical_config(config: dict) -> dict:
    """The allow-listed fields, rope parameters in the transformers 5 form, defaults dropped, sub-configs recursed."""
    out = {k: v for k, v in config.items() if k in CONFIG_FIELDS}
    for key, value in config.items():
        if key.endswith("_config") and key not in EXCLUDED_SUB_CONFIGS and isinstance(value, dict):
            out[key] = canonical_config(value)
    rope = canonical_rope(config)
    out.pop("rope_scaling", None)  # with no rope, null and {} both mean "none": drop them
    out.pop("rope_parameters", None)
    if rope is not None:
        for moved in ("rope_theta", "rope_local_base_freq", "partial_rotary_factor"):
            out.pop(moved, None)
        out["rope_parameters"] = rope
    for key, default in CONFIG_DEFAULTS.items():
        if key in out and type(out[key]) is type(default) and out[key] == default:
            del out[key]
    _drop_derived(out)
    return out


def _drop_derived(out: dict) -> None:
    """head_dim = hidden_size / heads and kv heads = heads are what an absent field means (tensor shapes agree)."""
    heads = out.get("num_attention_heads")
    if not _is_int(heads) or heads <= 0:
        return
    if out.get("num_key_value_heads") == heads and _is_int(out["num_key_value_heads"]):
        del out["num_key_value_heads"]
    hidden = out.get("hidden_size")
    if _is_int(hidden) and _is_int(out.get("head_dim")) and hidden % heads == 0 and out["head_dim"] == hidden // heads:
        del out["head_dim"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def canonical_rope(config: dict) -> dict | None:
    """Rope parameters as one dict (or one per layer type), whether saved in the transformers 4 or 5 form."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError("rope parameters must be an object")
    if not rope and "rope_theta" not in config and "rope_local_base_freq" not in config:
        return None
    nested = bool(rope) and all(v is None or isinstance(v, dict) for v in rope.values())
    if "rope_local_base_freq" in config and not nested:  # transformers 4 form of Gemma 3's two rope bases
        rope = {"full_attention": rope, "sliding_attention": {"rope_theta": config["rope_local_base_freq"]}}
        nested = True
    if not nested:
        return _complete_rope(rope, config)
    return {k: None if v is None else _complete_rope(v, config) for k, v in rope.items()}


def _complete_rope(params: dict, config: dict) -> dict:
    out = dict(params)
    kind = out.pop("type", "default")
    out.setdefault("rope_type", kind)
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in config:
            out.setdefault(key, config[key])
    if out["rope_type"] in ROPE_SCALED_TYPES:
        if "original_max_position_embeddings" in config:  # transformers gives the top-level value priority
            out["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        elif "max_position_embeddings" in config:
            out.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer digest

TOKENIZER_RUNTIME_KEYS = ("version", "truncation", "padding")
# Fields later tokenizers releases added to the serialization, with the value that means "as before".
TOKENIZER_DEFAULTS = {"ignore_merges": False, "byte_fallback": False, "use_regex": True}


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        vocab = sorted(tokenizer.get_vocab().items())
        return sha256_hex(canonical_json({"class": type(tokenizer).__name__, "vocab": vocab}))
    text = backend.to_str()
    # Canonicalizing a 50k-token vocabulary takes about a second on a busy CPU: memoize it by the exact text.
    text_sha256 = sha256_hex(text.encode())
    return memoized(f"tokenizer\0{text_sha256}", {"kind": "tokenizer", "text_sha256": text_sha256},
                    lambda: (sha256_hex(canonical_json(canonical_tokenizer(json.loads(text)))), True),
                    lambda v: isinstance(v, str))


def canonical_tokenizer(doc: dict) -> dict:
    """A tokenizers JSON without runtime state, merges as pairs, and late-added fields at their old meaning dropped."""
    out = {k: v for k, v in doc.items() if k not in TOKENIZER_RUNTIME_KEYS}
    return _drop_tokenizer_defaults(out)


def _drop_tokenizer_defaults(value):
    if isinstance(value, list):
        return [_drop_tokenizer_defaults(v) if isinstance(v, (dict, list)) else v for v in value]
    out = {}
    for key, v in value.items():
        if key in TOKENIZER_DEFAULTS and type(v) is bool and v == TOKENIZER_DEFAULTS[key]:
            continue
        if key in ("vocab", "merges") and isinstance(v, (dict, list)):  # no field below: spare the walk
            out[key] = _merge_pairs(v) if key == "merges" and isinstance(v, list) else v
        else:
            out[key] = _drop_tokenizer_defaults(v) if isinstance(v, (dict, list)) else v
    return out


def _merge_pairs(merges: list) -> list:
    return [m.split(" ") if isinstance(m, str) and m.count(" ") == 1 else m for m in merges]


# ---------------------------------------------------------------------------------------------------------------
# Weights digest

SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit
READ_CHUNK = 16 << 20
SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers loads: model.safetensors, else those the index names, else any."""
    directory = Path(directory)
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return _indexed_files(index)
    return sorted(directory.glob("*.safetensors"))


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise ModelLoadError(f"{index}: not a valid safetensors index: {err}") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not (index.parent / name).is_file():
            raise ModelLoadError(f"{index}: names {name!r}, which is not a file in this directory")
    return [index.parent / n for n in names]


def weights_digest(paths: list[Path]) -> str:
    """SHA-256 of the canonical JSON {tensor name: {dtype, shape, blake3}} over all files; names must be unique."""
    tensors: dict[str, dict] = {}
    owner: dict[str, Path] = {}
    for path in paths:
        for name, record in cached(path, "safetensors-tensors", digest_safetensors, _valid_tensor_records).items():
            if name in tensors:
                raise ModelLoadError(f"{path}: tensor {name!r} is also in {owner[name]}")
            tensors[name], owner[name] = record, path
    return sha256_hex(canonical_json(tensors))


def read_safetensors_header(path: Path) -> list[tuple[str, str, list[int], int, int]]:
    """(name, dtype, shape, begin, end) per tensor, with absolute file offsets, validated against the file size."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            length = int.from_bytes(prefix, "little")
            if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
                raise ValueError(f"header length {length} exceeds the file ({size} bytes) or the 100 MiB limit")
            header = json.loads(fh.read(length), object_pairs_hook=_unique_keys)
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot read: {err.strerror}") from None
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(f"{path}: not a valid safetensors file: {err}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a valid safetensors file: the header is not a JSON object")
    data_start, data_len = 8 + length, size - 8 - length
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, begin, end = _tensor_entry(info, data_len)
        except ValueError as err:
            raise ModelLoadError(f"{path}: not a valid safetensors file: tensor {name!r}: {err}") from None
        entries.append((name, dtype, shape, data_start + begin, data_start + end))
    _check_tiling(path, entries, data_start, size)
    return entries


def _check_tiling(path: Path, entries: list, data_start: int, size: int) -> None:
    """The tensors cover the data section exactly, back to back, as the safetensors library requires to load it."""
    position = data_start
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != position:
            raise ModelLoadError(f"{path}: not a valid safetensors file: tensor {name!r} starts at byte {begin}, "
                                 f"where the previous one ends at {position} (a gap or an overlap)")
        position = end
    if position != size:
        raise ModelLoadError(f"{path}: not a valid safetensors file: {size - position} bytes after the last tensor")


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in the header")
    return out


def _tensor_entry(info, data_len: int) -> tuple[str, list[int], int, int]:
    if not isinstance(info, dict):
        raise ValueError("entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len):
        raise ValueError(f"data_offsets {offsets!r} fall outside the {data_len}-byte data section")
    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    if bits != 8 * (offsets[1] - offsets[0]):
        raise ValueError(f"shape {shape} of {dtype} needs {bits / 8:g} bytes, the offsets give {offsets[1] - offsets[0]}")
    return dtype, shape, offsets[0], offsets[1]


def digest_safetensors(path: Path) -> dict[str, dict]:
    """{name: {dtype, shape, blake3}} for every tensor of one file: a full read, in file order."""
    import blake3

    entries = sorted(read_safetensors_header(path), key=lambda e: e[3])
    buffer = memoryview(bytearray(READ_CHUNK))
    records = {}
    with open(path, "rb", buffering=0) as fh:
        for name, dtype, shape, begin, end in entries:
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            fh.seek(begin)
            remaining = end - begin
            while remaining:
                got = fh.readinto(buffer[: min(READ_CHUNK, remaining)])
                if not got:
                    raise ModelLoadError(f"{path}: the file shrank while it was read")
                hasher.update(buffer[:got])
                remaining -= got
            records[name] = {"dtype": dtype, "shape": shape, "blake3": hasher.hexdigest()}
    return records


def _valid_tensor_records(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(r, dict) and set(r) == {"dtype", "shape", "blake3"} for r in value.values())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(READ_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def cached_file_sha256(path: Path) -> str:
    return cached(path, "sha256", file_sha256, lambda v: isinstance(v, str))


# ---------------------------------------------------------------------------------------------------------------
# Digest cache: one small JSON file per (kind, weight file), trusted while the file's stat key is unchanged

DIGEST_CACHE_FORMAT = "kvcli-digest-cache"
DIGEST_CACHE_VERSION = 1
RACY_SECONDS = 2.0  # a file modified this recently may change again within one mtime tick: do not cache it


def digest_cache_dir() -> Path:
    return cache_root() / "digests"


def cached(path: Path, kind: str, compute: Callable[[Path], object], valid: Callable[[object], bool]):
    """compute(path), or the value stored for this file while its path, size, mtime and inode are unchanged."""
    real = Path(path).resolve()
    try:
        key = _stat_key(real, kind)
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot read: {err.strerror}") from None

    def fresh() -> tuple[object, bool]:
        try:
            value = compute(real)
        except OSError as err:
            raise ModelLoadError(f"{path}: cannot read: {err.strerror}") from None
        return value, _stat_key(real, kind) == key and time.time() - key["mtime_ns"] / 1e9 > RACY_SECONDS

    return memoized(f"{kind}\0{real}", key, fresh, valid)


def memoized(address: str, key: dict, compute: Callable[[], tuple[object, bool]], valid: Callable[[object], bool]):
    """The value stored at `address` if it was stored under `key` and is valid, else compute() -> (value, storable).

    One entry file per address, so a changed weight file replaces its entry instead of adding one.
    """
    entry = digest_cache_dir() / f"{sha256_hex(address.encode())[:32]}.json"
    try:
        doc = json.loads(entry.read_bytes())
        if doc.get("key") == key and valid(doc.get("value")):
            return doc["value"]
    except (OSError, ValueError, AttributeError, RecursionError):
        pass  # no entry or a damaged one: recompute
    value, storable = compute()
    if storable:
        _store(entry, {"format": DIGEST_CACHE_FORMAT, "version": DIGEST_CACHE_VERSION, "key": key, "value": value})
    return value


def _stat_key(real: Path, kind: str) -> dict:
    st = real.stat()
    return {"kind": kind, "path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _store(entry: Path, doc: dict) -> None:
    """Best effort: a read-only or full cache directory costs a recomputation next time, nothing more."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(str(entry), [json.dumps(doc, separators=(",", ":")).encode()])
    except (OSError, StorageError):
        pass


# ---------------------------------------------------------------------------------------------------------------
# The cache directory and its temporaries


def cache_root() -> Path:
    """Where kvcli keeps converted models, profiles and digests: $KVCLI_CACHE_DIR, else $XDG_CACHE_HOME/kvcli."""
    explicit = os.environ.get("KVCLI_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvcli"


CACHE_SUBDIRS = ("", "models", "profiles", "digests")


def temp_prefix(name: str) -> str:
    """mkdtemp prefix of a temporary beside NAME: with the suffix `.tmp`, the naming of format.atomic_write."""
    return f".{name}{TEMP_MARK}"


def sweep_cache_dir(root: Path | None = None, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove kvcli temporaries left in the cache dir by killed processes, once untouched for max_age seconds.

    atomic_write sweeps temporary files of dead writers; this also takes conversion directories, the
    debris of profiles and digest-cache entries that are never written again, and the digest-cache entries of
    weight files that no longer exist.
    """
    root = Path(root) if root is not None else cache_root()
    removed = []
    now = time.time()
    for sub in CACHE_SUBDIRS:
        try:
            entries = list(os.scandir(root / sub))
        except OSError:
            continue
        for entry in entries:
            if TEMP_NAME.fullmatch(entry.name) and now - _newest_mtime(entry) > max_age:
                _remove(entry)
                removed.append(Path(entry.path))
            elif sub == "digests" and entry.name.endswith(".json") and _orphaned(entry, now - max_age):
                _remove(entry)
                removed.append(Path(entry.path))
    return removed


def _orphaned(entry: os.DirEntry, cutoff: float) -> bool:
    """A digest-cache entry older than cutoff for a weight file that no longer exists (a deleted model)."""
    try:
        if entry.stat(follow_symlinks=False).st_mtime > cutoff:
            return False
        path = json.loads(Path(entry.path).read_bytes())["key"].get("path")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # unreadable or not ours to judge: leave it
    return isinstance(path, str) and not os.path.exists(path)


def _newest_mtime(entry: os.DirEntry) -> float:
    """A conversion in progress keeps writing into its directory: the newest child counts, not the directory."""
    try:
        newest = entry.stat(follow_symlinks=False).st_mtime
        if entry.is_dir(follow_symlinks=False):
            for child in os.scandir(entry.path):
                newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
        return newest
    except OSError:
        return time.time()  # vanished or unreadable: another process owns it, leave it


def _remove(entry: os.DirEntry) -> None:
    try:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)
    except OSError:
        pass


def describe_mismatch(cache_model: dict, model: dict) -> str | None:
    """The first identity field that differs, phrased for an error message; None when they match."""
    if cache_model.get("architecture") != model.get("architecture"):
        return f"architecture {cache_model.get('architecture')} != {model.get('architecture')}"
    for field, label in (("config_digest", "config"), ("weights_digest", "weights"), ("tokenizer_digest", "tokenizer")):
        if cache_model.get(field) != model.get(field):
            return f"{label} differ ({cache_model.get(field, '?')[:12]} in the cache, {model.get(field, '?')[:12]} loaded)"
    return None
