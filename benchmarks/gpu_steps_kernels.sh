#!/usr/bin/env bash
# GPU steps of the fused GRPO kernels (selective_logprob, group advantages), for benchmarks/gpu_check.sh:
#   bash benchmarks/gpu_steps_kernels.sh RESULTS_DIR
# Runs the gpu-marked kernel tests (Triton and the CUDA op against their references), then the two benchmarks,
# writing their output and JSON lines to RESULTS_DIR. Needs omni_fast installed with its CUDA extension
# (pip install --no-build-isolation -e . on the GPU machine). Liger-Kernel is a baseline row when installed or
# when its wheel was brought along in .whl/ (pip download --no-deps liger-kernel==0.8.5 -d .whl).
# About 3-4 minutes on an H100; each step has a timeout and the first failure stops the script.
set -euo pipefail
out=${1:-gpu-results}
cd "$(dirname "$0")/.."
mkdir -p "$out"

if ! python -c "import liger_kernel" 2>/dev/null; then
  if compgen -G ".whl/liger_kernel-*.whl" >/dev/null; then
    pip install -q --no-deps --no-index .whl/liger_kernel-*.whl || echo "liger_kernel: install failed, its row is skipped"
  else
    echo "liger_kernel: not installed and no wheel in .whl/, its row is skipped"
  fi
fi

echo "== kernel GPU tests"
timeout 300 python -m pytest -q -x -m gpu tests/test_selective_logprob.py tests/test_group_advantage.py \
  2>&1 | tee "$out/kernels_gpu_tests.txt"

echo "== bench_selective_logprob"
timeout 300 python benchmarks/bench_selective_logprob.py | tee "$out/bench_selective_logprob.txt"
tail -n 1 "$out/bench_selective_logprob.txt" > "$out/bench_selective_logprob.json"

echo "== bench_group_advantage"
timeout 120 python benchmarks/bench_group_advantage.py | tee "$out/bench_group_advantage.txt"
tail -n 1 "$out/bench_group_advantage.txt" > "$out/bench_group_advantage.json"
