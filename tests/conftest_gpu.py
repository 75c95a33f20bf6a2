"""pytest plugin: `--gpu` runs the kernel tests compiled on a CUDA device instead of interpreted on the CPU.

Load it with `pytest_plugins = ["conftest_gpu"]` in tests/conftest.py, or `PYTHONPATH=tests pytest -p conftest_gpu`.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="run the Triton kernel tests compiled on CUDA (larger shapes too) instead of interpreted")


def pytest_configure(config):
    if config.getoption("--gpu"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--gpu given but torch sees no CUDA device")
        # Kernels read this when they are defined, at collection, after this hook: compile them.
        os.environ["TRITON_INTERPRET"] = "0"


@pytest.fixture(scope="session")
def gpu(request) -> bool:
    """Whether this run is `--gpu`: kernels compiled on CUDA rather than interpreted on the CPU."""
    return bool(request.config.getoption("--gpu", default=False))


@pytest.fixture(scope="session")
def device(gpu):
    """Where the kernel tests put their tensors: cuda with --gpu, else the CPU (the interpreter)."""
    import torch

    return torch.device("cuda" if gpu else "cpu")


@pytest.fixture
def short_lanes(monkeypatch, gpu):
    """Lanes of 3 steps on CPU, so the interpreter meets many lanes in few steps; the real length on a GPU.
    The lane count rule is read by encoder and decoders alike, so files written under it decode under it."""
    if not gpu:
        from kvcli.codecs import rans

        monkeypatch.setattr(rans, "STEPS_PER_LANE", 3)
