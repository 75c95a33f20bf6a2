"""kvcli inside serving engines: each engine's adapter in its own package, imported only where that engine is."""
