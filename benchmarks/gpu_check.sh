#!/usr/bin/env bash
# Every GPU check of omni_fast in one unattended run: build the CUDA extension, the gpu-marked tests, every
# benchmarks/bench_*.py; full JSON and logs in the results folder, a short table printed last.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [results-dir] [all|tests|bench]     (default: gpu-results/ all)
#
# --dry-run (on any machine, no GPU needed; tests/test_benchmarks.py runs it in CI): the GPU machine's plan,
# every step with its time limit and its exact command, each one checked without doing the work
# (benchmarks/check_command.py: a benchmark's imports and its arguments parsed by its own parser, the pytest
# selections collected, pip and the build printed only). A typo there fails on the CPU, not in a GPU window.
#
# "tests" = build + the gpu-marked tests, "bench" = build + every benchmark: two shorter calls on one warm
# machine when a single one would not fit the time left (the build is skipped when the CUDA extension from the
# first call is still there). On an H100 "all" must finish in under 8 minutes; each step has its own time limit and the first broken step
# stops the run loudly (its log is in the results folder). Without a GPU the same steps run on the CPU (GPU
# tests skipped, benchmarks with --quick under the Triton interpreter): that is how CI keeps this script working.
# Wheels for packages the GPU machine lacks (av, liger-kernel, ...) are installed from .whl/ when present.
# Set OMNI_FAST_SKIP_BUILD=1 to use the omni_fast already installed.
set -uo pipefail
DRY=0
ARGS=()
for a in "$@"; do if [ "$a" = --dry-run ]; then DRY=1; else ARGS+=("$a"); fi; done
set -- ${ARGS[@]+"${ARGS[@]}"}
OUT=$(mkdir -p "${1:-gpu-results}" && cd "${1:-gpu-results}" && pwd)
PHASE=${2:-all}
case "$PHASE" in all|tests|bench) ;; *) echo "gpu_check.sh: phase must be all, tests or bench, not '$PHASE'"; exit 2 ;; esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
: > "$OUT/steps.txt"
T0=$(date +%s)

summary() {
  "$PY" benchmarks/summarize.py "$OUT" || true
  echo "steps (rc, seconds):"; cat "$OUT/steps.txt"
  echo "total: $(( $(date +%s) - T0 )) s; results in $OUT"
}

step() {  # step NAME SECONDS CMD...: run with a time limit, log it, stop everything if it fails
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start; start=$(date +%s)
  if [ "$DRY" = 1 ]; then
    echo "   $*"
    "$PY" benchmarks/check_command.py "$@" > "$OUT/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$name rc=$rc $(( $(date +%s) - start ))s" >> "$OUT/steps.txt"
  if [ "$rc" -ne 0 ]; then
    echo "FAILED: $name (rc=$rc$([ "$rc" -eq 124 ] && echo ', timed out')); full log: $OUT/$name.log"
    summary
    exit "$rc"
  fi
}

if ls .whl/*.whl > /dev/null 2>&1; then
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/omni_fast_site .whl/*.whl
  export PYTHONPATH=/tmp/omni_fast_site${PYTHONPATH:+:$PYTHONPATH}
fi

GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[ "$DRY" = 1 ] && GPU=1  # the plan of the GPU machine, whatever this one has
if [ "$GPU" = 1 ]; then QUICK=(); else QUICK=(--quick); fi
[ "$GPU" = 1 ] && [ "$DRY" = 0 ] || export TRITON_INTERPRET=1
step environment 60 "$PY" benchmarks/environment.py "$OUT/environment.json"

BUILT=$("$PY" -c "import torch, omni_fast._C as C; print(int(hasattr(C, 'group_advantage_cuda') or not torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "${OMNI_FAST_SKIP_BUILD:-0}" != 1 ] && { [ "$BUILT" != 1 ] || [ "$DRY" = 1 ]; }; then
  step build 360 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
if [ -f csrc/bindings.cpp ]; then
  step native_ops 60 "$PY" -c "import torch, omni_fast._C as C; print(sorted(n for n in dir(C) if not n.startswith('_')))"
fi

if [ "$GPU" = 1 ] && [ "$PHASE" != bench ]; then
  step gpu_tests 300 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
  step timm_regstage 60 "$PY" -m pytest -q tests/test_projector.py::test_against_timm_regstage -p no:cacheprovider -rs
fi

[ "$PHASE" = tests ] && { summary; exit 0; }
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  limit=120; extra=()
  case "$name" in
    bench_rollout) limit=360; [ "$GPU" = 1 ] && extra=(--workload fixed mixed arrivals cache) ;;  # every workload
    bench_selective_logprob) limit=240 ;;
    bench_grpo_step) limit=420 ;;  # full GRPO steps (ours, reference: warm-up + 3 timed; ours with the tower-feature store cold and warm: warm-up + 2), random weights of the real shape
    bench_sft_epoch) limit=180 ;;  # makes 24 clips, then three SFT epochs of the tiny model (no store, cold, warm)
    bench_lora) limit=300 ;;  # two processes (full fine-tuning, LoRA), each two GRPO steps at the real 0.5B shape
    bench_infer) limit=180 ;;  # builds the real shape in float16 and encodes 16 clips
    bench_media) limit=240; [ "$GPU" = 1 ] && extra=(--clips 32 --repeats 2) ;;  # encoding the clips dominates; + the store's cold and warm passes
    bench_serve) limit=300; [ "$GPU" = 1 ] && extra=(--requests 24 --rates 1 4 inf --max_tokens 64) ;;  # two servers (real shape, random fp16) and HF generate, 24 requests per run
  esac
  step "$name" "$limit" "$PY" "$bench" ${QUICK[@]+"${QUICK[@]}"} ${extra[@]+"${extra[@]}"} --out "$OUT/$name.json"
done
summary
