"""Reusing caches: prefill to a file and load it back (pipeline), several caches as one context (compose), batch ingestion (ingest)."""
