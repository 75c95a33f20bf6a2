"""One vLLM engine in this process, answering prompts with or without the kvcli connector: what the vLLM tests
(run with .venv-vllm/bin/python) and bench/vllm_ttft.py drive.

    python tests/vllm_runs.py SPEC.json

SPEC: {"model": DIR, "prompts": [[token ids], ...], "max_tokens": N, "connector": {kv_connector_extra_config} or
null, "prefix_caching": false, "await_saves": N (wait until the stats file counts N settled saves)}.
Prints one JSON line per prompt (output token ids, vLLM's num_cached_tokens, seconds from submission to the end of
the answer: with max_tokens 1, the time to first token), then one line with the engine's start time and the connector's counters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SETTLED = ("saves", "saves_already_stored", "save_failures", "saves_skipped_queue_full", "saves_incomplete")


def stats(directory: str | None) -> dict:
    """The connector's counters, its scheduler's and worker's summed (they may run in different processes)."""
    total: dict[str, int] = {}
    for role in ("scheduler", "worker"):
        try:
            counts = json.loads((Path(directory) / f"{role}.json").read_text()) if directory else {}
        except (OSError, ValueError):
            counts = {}
        for name, value in counts.items():
            total[name] = total.get(name, 0) + value
    return total


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    extra = spec.get("connector")
    transfer = None
    if extra is not None:
        transfer = KVTransferConfig(kv_connector="KvcliConnector", kv_connector_module_path="kvcli.integrations.vllm",
                                    kv_role="kv_both", kv_connector_extra_config=extra)
    began = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=spec.get("max_model_len", 2048),
              enable_prefix_caching=spec.get("prefix_caching", False), kv_transfer_config=transfer, seed=0)
    started = time.perf_counter() - began
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0)
    for ids in spec["prompts"]:
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - t0
        print(json.dumps({"tokens": list(out.outputs[0].token_ids), "num_cached_tokens": out.num_cached_tokens,
                          "prompt_tokens": len(ids), "seconds": round(seconds, 4)}), flush=True)
    path = (extra or {}).get("stats_dir")
    deadline = time.monotonic() + spec.get("save_timeout_s", 120)
    while sum(stats(path).get(k, 0) for k in SETTLED) < spec.get("await_saves", 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(json.dumps({"engine_start_s": round(started, 2), "stats": stats(path)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
