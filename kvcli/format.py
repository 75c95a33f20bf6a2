"""`kvcli.format`, the library name the README documents for `kvcli.container.format`: the same module object."""

import sys

from .container import format

sys.modules[__name__] = format
