"""kvcli as vLLM's KV connector (`kvcli[vllm]`): prompt prefixes served from any kvcli store, and the prefixes vLLM
computes saved to it (docs/vllm.md).

vLLM names the class through `kv_connector="KvcliConnector"` and
`kv_connector_module_path="kvcli.integrations.vllm"`. vLLM is imported only when the class is asked for, so the
layout and save modules stay importable (and testable) where vLLM is not installed.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "KvcliConnector":
        from .connector import KvcliConnector

        return KvcliConnector
    raise AttributeError(name)


__all__ = ["KvcliConnector"]
