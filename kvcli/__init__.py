"""kvcli: offline KV-cache files for language models."""

from ._layout import install as _install_checkout_folders

__version__ = "0.1.0"

_install_checkout_folders()
