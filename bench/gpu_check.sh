#!/bin/bash
# The one GPU check of the kernels (issue 11): compiled kernel and device-path tests (the commands with
# --device cuda --backend triton included), then bench/kernel_bandwidth.py, output under $OUT.
# Run from the repo root on a CUDA machine whose python3 has torch, triton and transformers, carrying `.whl`
# (the zstandard wheel for that python: see the device notes). Writes $OUT/gpu.txt, tests.log, kernels.jsonl,
# bench.log.
set -o pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
PYTHONPATH=/tmp/site:tests timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p conftest_gpu --gpu \
    tests/test_kernels_gpu.py tests/test_kernels.py tests/test_device.py --durations=8 2>&1 | tee "$OUT/tests.log"
(cd bench && timeout ${BENCH_TIMEOUT:-220} python3 kernel_bandwidth.py --out "$OUT/kernels.jsonl" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log")
