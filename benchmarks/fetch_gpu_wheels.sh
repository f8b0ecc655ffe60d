#!/usr/bin/env bash
# Run on a machine that reaches PyPI, before a GPU run: downloads, into .whl/ (git-ignored; name it in the device
# call's `carry`), the wheels of the Python packages the GPU machine (Python 3.12, x86-64) lacks:
# PyAV (the media path and the synthetic clips), decord (the reference decoder, tests/test_decord.py) and
# Liger-Kernel (a baseline of bench_selective_logprob).
# gpu_check.sh installs whatever it finds in .whl/. DALI's wheel is too large to travel in one call.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
for pkg in "av==18.1.0" "decord==0.6.0" "liger-kernel"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg"
done
ls -la .whl
