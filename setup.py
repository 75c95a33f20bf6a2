"""kvcli's two C extensions; everything else is declared in pyproject.toml.

- kvcli.codecs._ans (codecs/_ans.c): the entropy coder, rANS streams and kvq's joint symbols;
- kvcli.codecs.kvq_ops._kvq (codecs/kvq_ops/*.c): kvq's arithmetic, each operation beside its torch form.

Both include codecs/_symbols.h, what they share. pip install builds them, so no call ever compiles. -O3 but no
-march=native: a wheel must run on any CPU of its architecture. -ffp-contract=off: reconstruction is specified as
separate float32 multiplies and adds (docs/codec.md, "Reconstruction"), and GCC would otherwise fuse them where
the CPU has a multiply-add. (pyproject's own ext-modules table is still experimental in setuptools.)
"""

from setuptools import Extension, setup

FLAGS = {"extra_compile_args": ["-O3", "-ffp-contract=off"], "include_dirs": ["codecs"],
         "depends": ["codecs/_symbols.h"]}

setup(ext_modules=[
    Extension("kvcli.codecs._ans", ["codecs/_ans.c"], **FLAGS),
    Extension("kvcli.codecs.kvq_ops._kvq", ["codecs/kvq_ops/_kvq.c", "codecs/kvq_ops/quantize.c",
                                             "codecs/kvq_ops/dequantize.c", "codecs/kvq_ops/transform.c"],
              **FLAGS | {"depends": FLAGS["depends"] + ["codecs/kvq_ops/_kvq.h"]}),
])
