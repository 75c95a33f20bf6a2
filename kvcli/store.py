"""`kvcli.store`, the library name the README documents for `kvcli.storage.store`: the same module object."""

import sys

from .storage import store

sys.modules[__name__] = store
