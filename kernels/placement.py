"""Where the model and the cache live (`--device`) and which implementation of the codec's hot paths runs there
(`--backend`), checked once per command before any work."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DeviceError, UsageError

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Placement:
    """Where the model and the cache live, and which implementation of the codec's hot paths runs there."""

    device: torch.device
    backend: str  # "torch" or "triton"


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET, as triton itself parses it)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def resolve(device: str = "auto", backend: str = "auto") -> Placement:
    """The placement for `--device` and `--backend`, refused with DeviceError (exit 9) when it cannot run here.

    auto device: cuda when torch sees one, else cpu. auto backend: triton on CUDA when triton is installed,
    torch otherwise. The triton backend on a CPU needs TRITON_INTERPRET=1 (slow: for tests)."""
    if device not in DEVICES:
        raise UsageError(f"unknown --device {device!r}; choose one of {', '.join(DEVICES)}")
    if backend not in BACKENDS:
        raise UsageError(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        build = f"torch {torch.__version__} has no CUDA support" if torch.version.cuda is None else \
            "torch sees no CUDA device"
        raise DeviceError(f"--device cuda: {build}; use --device cpu")
    where = torch.device("cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu")
    if backend == "auto":  # triton is imported (about 0.3 s) only where it may run
        return Placement(where, "triton" if where.type == "cuda" and triton_installed() else "torch")
    if backend == "triton":
        if not triton_installed():
            raise DeviceError("--backend triton: triton is not installed; pip install 'kvcli[gpu]', or use "
                              "--backend torch")
        if where.type != "cuda" and not triton_interpreted():
            raise DeviceError("--backend triton on the CPU: Triton needs a GPU or TRITON_INTERPRET=1; use "
                              "--backend torch")
    return Placement(where, backend)
