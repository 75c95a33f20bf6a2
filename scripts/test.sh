#!/usr/bin/env bash
# Install what the tests need, then run the whole suite. pytest's exit 5 (nothing collected) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test bench vllm || exit 1
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
