"""The .kvc container: the byte format, caches to and from files, model identity, cache keys, safetensors export."""
