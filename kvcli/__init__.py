"""kvcli: offline KV-cache files for language models."""

__version__ = "0.1.0"
