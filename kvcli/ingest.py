"""`kvcli.ingest`, the library name the README documents for `kvcli.reuse.ingest`: the same module object."""

import sys

from .reuse import ingest

sys.modules[__name__] = ingest
