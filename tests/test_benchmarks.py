"""benchmarks/gpu_check.sh's CPU path: every benchmark runs (--quick, not timed) and ends with its JSON line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every benchmark's --quick run

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_cpu_path(tmp_path):
    env = dict(os.environ, OMNI_FAST_SKIP_BUILD="1", PYTHON=sys.executable, TRITON_INTERPRET="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benches = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert benches and sorted(p.stem for p in tmp_path.glob("bench_*.json")) == benches
    for name in benches:
        last = (tmp_path / f"{name}.log").read_text().strip().splitlines()[-1]
        result = json.loads(last)
        assert result["quick"] is True and result["rows"]
    assert "results in" in proc.stdout and "steps (rc, seconds)" in proc.stdout


def test_grpo_step_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_grpo_step.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "grpo_step" and result["quick"] is True and result["ratio"] > 0
    phases = {"towers", "rollout", "reference", "policy", "optimizer"}
    for path in ("ours", "reference"):
        assert set(result[path]["phase_s"]) == phases and all(v > 0 for v in result[path]["phase_s"].values())
        assert result[path]["projected_recipe_hours"] > 0


def test_gpu_check_dry_run_checks_every_command_of_the_gpu_plan(tmp_path):
    """`gpu_check.sh --dry-run`: the GPU machine's plan (no --quick, the GPU-only steps and arguments), each
    command checked on the CPU without doing its work."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benches = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
    for name in benches:
        log = (tmp_path / f"{name}.log").read_text()
        assert f"{name}.py: imports and arguments ok" in log, log
        assert "'quick': False" in log  # the GPU arguments, not the CPU smoke run's
    gpu_tests = (tmp_path / "gpu_tests.log").read_text()
    assert "tests selected" in gpu_tests and not gpu_tests.startswith("pytest -q -m gpu tests -p no:cacheprovider: 0")
    assert "not run in a dry run" in (tmp_path / "build.log").read_text()
    assert "steps (rc, seconds)" in proc.stdout


@pytest.mark.parametrize("args, why", [(["bench_media.py", "--clipz", "3"], "arguments refused"),
                                       (["bench_nothing.py"], "no such benchmark"),
                                       (["-m", "pytest", "-m", "gpu", "tests/test_no_such_file.py"], "collection failed")])
def test_check_command_refuses_what_would_fail_on_the_gpu(args, why):
    if args[0].endswith(".py"):
        args = [str(ROOT / "benchmarks" / args[0]), *args[1:]]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_command.py"), sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert why in proc.stdout + proc.stderr
