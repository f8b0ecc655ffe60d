"""The kernel benchmarks run end to end on a small CPU shape (not timed): a table, then one JSON line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench_selective_logprob.py", "bench_group_advantage.py"])
def test_benchmark_smoke(script):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["device"] == "cpu" and payload["timed"] is False
    assert payload["rows"] and not [r for r in payload["rows"] if "error" in r]
