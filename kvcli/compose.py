"""`kvcli.compose`, the library name the README documents for `kvcli.reuse.compose`: the same module object."""

import sys

from .reuse import compose

sys.modules[__name__] = compose
