"""Every Triton kernel compiles for the H100 (sm_90) down to a cubin, checked on this GPU-less machine
(tests/triton_aot.py: the compiler's rules, which the CPU interpreter does not apply)."""
import os
import subprocess
import sys
from pathlib import Path


def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_aot.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " 0 failed" in proc.stdout
