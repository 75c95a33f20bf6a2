"""One vLLM engine in this process, answering prompts with or without the kvcli connector: what the vLLM tests
(run with .venv-vllm/bin/python) and bench/vllm_ttft.py drive.

    python tests/vllm_runs.py SPEC.json

SPEC: {"model": DIR, "prompts": [[token ids], ...], "max_tokens": N, "connector": {kv_connector_extra_config} or
null, "prefix_caching": false, "await_saves": N (wait, before prompt "await_saves_before" if given and at the end,
until the stats count N settled saves), "pause_before": [i, ...]
and "handshake_dir": before prompt i, touch ready.i there and wait for go.i, "logprobs_for": [i, ...]: the whole
first-token distribution of those prompts}.
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


def await_saves(path: str | None, spec: dict) -> None:
    deadline = time.monotonic() + spec.get("save_timeout_s", 300)
    while sum(stats(path).get(k, 0) for k in SETTLED) < spec.get("await_saves", 0) and time.monotonic() < deadline:
        time.sleep(0.2)


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
              enable_prefix_caching=spec.get("prefix_caching", False), kv_transfer_config=transfer, seed=0,
              max_logprobs=-1 if spec.get("logprobs_for") else 20)
    started = time.perf_counter() - began
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0)
    with_logprobs = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, logprobs=-1)
    path = (extra or {}).get("stats_dir")
    for i, ids in enumerate(spec["prompts"]):
        if i == spec.get("await_saves_before"):  # the saves of the prompts so far are stored before this one
            await_saves(path, spec)
        if i in spec.get("pause_before", []):  # the driving test changes the world (stops a store), then says go
            hand = Path(spec["handshake_dir"])
            (hand / f"ready.{i}").touch()
            deadline = time.monotonic() + 120
            while not (hand / f"go.{i}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        t0 = time.perf_counter()
        logprobs = i in spec.get("logprobs_for", [])
        out = llm.generate([{"prompt_token_ids": ids}], with_logprobs if logprobs else params, use_tqdm=False)[0]
        seconds = time.perf_counter() - t0
        line = {"tokens": list(out.outputs[0].token_ids), "num_cached_tokens": out.num_cached_tokens,
                "prompt_tokens": len(ids), "seconds": round(seconds, 4)}
        if logprobs:  # the whole next-token distribution after the prompt: {token id: log-probability}
            line["first_logprobs"] = {str(t): lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}
        print(json.dumps(line), flush=True)
    await_saves(path, spec)
    print(json.dumps({"engine_start_s": round(started, 2), "stats": stats(path)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
