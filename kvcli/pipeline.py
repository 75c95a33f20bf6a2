"""`kvcli.pipeline`, the library name the README documents for `kvcli.reuse.pipeline`: the same module object."""

import sys

from .reuse import pipeline

sys.modules[__name__] = pipeline
