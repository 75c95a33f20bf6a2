"""Shared by the benchmarks: the corpus, timing statistics and the facts every JSON line carries."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers

import kvcli

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"


def corpus(path: Path) -> list[Path]:
    docs = sorted(p for p in path.glob("*.txt"))
    if not docs:
        raise SystemExit(f"no .txt documents in {path}")
    return docs


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvcli": kvcli.__version__,
        "git": git_revision(),
    }


def timed(fn, repeats: int) -> tuple[list[float], object]:
    """Wall seconds of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def spread(times: list[float]) -> dict:
    return {"median": round(statistics.median(times), 5), "min": round(min(times), 5), "max": round(max(times), 5)}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
