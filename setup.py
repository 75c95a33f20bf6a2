"""The C entropy coder, kvcli.codecs._ans (codecs/_ans.c); everything else is declared in pyproject.toml.

pip install builds it, so no call ever compiles. -O3 but no -march=native: a wheel must run on any CPU of
its architecture. -ffp-contract=off: reconstruction is specified as separate float32 multiplies and adds
(docs/codec.md, "Reconstruction"), and GCC would otherwise fuse them where the CPU has a multiply-add.
(pyproject's own ext-modules table is still experimental in setuptools.)
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvcli.codecs._ans", ["codecs/_ans.c"], extra_compile_args=["-O3", "-ffp-contract=off"])])
