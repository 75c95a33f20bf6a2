"""Triton kernels for bulk KV work, each tested against its torch reference. Installed as `kvcli.kernels`.

The references live in `codecs/quantize.py` (the CPU path); kernels import them, never the reverse at import
time. The kernels need triton (the `gpu` extra); on CPU they run under TRITON_INTERPRET=1, which is how the test
suite checks them without a GPU. `placement.resolve` decides, once per command, where tensors live and which
implementation runs.

This file imports nothing: with the repository root on sys.path (`python -m pytest`), libraries that probe for a
top-level package named `kernels` (transformers does) import it, and must not fail.
"""
