"""benchmarks/gpu_check.sh's CPU path: every benchmark runs (--quick, not timed) and ends with its JSON line."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
