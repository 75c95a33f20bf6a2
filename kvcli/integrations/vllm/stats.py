"""The connector's counters: one set per engine process, shared by its scheduler and worker sides, written to
the configured stats file, with each kind of fault logged once."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from ...container.format import atomic_write

log = logging.getLogger("kvcli.vllm")

# Why a load was given back to vLLM to recompute (docs/vllm.md, "Faults").
FAULTS = ("model_mismatch", "shape_mismatch", "corrupt", "store_unavailable", "timeout", "internal")


class Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._counts: dict[str, int] = {}
        self._logged: set[str] = set()
        self._dirty = False

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + amount
            self._dirty = True

    def fault(self, kind: str, message: str) -> None:
        """Count a fault; its first occurrence of each kind goes to the log (a store that is down fails every load,
        and one line says so)."""
        self.add(f"fault_{kind}")
        with self._lock:
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            log.warning("kvcli connector: %s (recomputed by vLLM; further %s faults are counted, not logged)",
                        message, kind)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def flush(self, path: str | None) -> None:
        """Rewrite the stats file if anything changed since the last flush (atomically: readers never see half)."""
        if not path:
            return
        with self._flushing:  # one writer at a time, so an older snapshot never lands after a newer one
            with self._lock:
                if not self._dirty:
                    return
                self._dirty = False
                data = json.dumps(self._counts, sort_keys=True).encode()
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, [data])
            except Exception as err:  # the stats file is an aid; it never stops the engine
                self.fault("internal", f"cannot write the stats file {path}: {err}")


STATS = Stats()
