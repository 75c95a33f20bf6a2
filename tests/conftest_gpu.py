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
