"""The Triton kernels of selective_logprob and group_advantage compile for an H100 (sm_90) without a GPU.

The interpreter (how every other CPU test runs them) accepts code that compiled Triton rejects, e.g. a kernel
reading a module global that is not a tl.constexpr; this test compiles each kernel, one variant per constexpr
branch used on a GPU, with the specialisation a launch at the R1-Omni shape gets (pointers 16-byte aligned,
H / V / N / strides divisible by 16). The hot bf16 kernels must not spill registers (ptxas -v), the regression
that matters most for their speed. Triton's own ptxas does the work; no CUDA driver is involved.

Compiled Triton needs the kernels defined without TRITON_INTERPRET, which conftest sets for this process, so
the compiles run in one subprocess (this file as a script) and each case reads its result.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
from omni_fast.kernels import group_advantage as ga  # noqa: E402
from omni_fast.kernels import selective_logprob as slp  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
DIVISIBLE = {"N", "V", "H", "K", "M", "stride_hn", "stride_wv", "stride_dn", "stride_dhn", "chunk_cols", "stride_k"}


def _types(dtype):
    ptr = f"*{dtype}"
    return {
        "hidden_ptr": ptr, "weight_ptr": ptr, "d_ptr": ptr, "part_ptr": "*fp32", "targets_ptr": "*i64",
        "logp_ptr": "*fp32", "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_ptr": "*fp32", "dh_ptr": "*fp32",
        "rewards_ptr": "*fp32", "out_ptr": "*fp32", "scale2": "fp32", "inv_temp": "fp32", "eps": "fp32",
    }


def _compile(fn, dtype, constexprs, num_warps, num_stages):
    names = fn.arg_names
    types = _types(dtype)
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
             if a not in constexprs and (signature[a].startswith("*") or a in DIVISIBLE)}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _spill_bytes(kernel, folder) -> int:
    ptx = os.path.join(folder, "kernel.ptx")
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    report = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(folder, "kernel.cubin")],
                            capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))


TILE = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64)
CASES = {  # name: (kernel, dtype, constexprs, num_warps, num_stages, must not spill)
    "fwd": (slp._selective_logprob_fwd_kernel, "bf16",
            dict(WITH_ENTROPY=False, DOT_IEEE=False, EVEN_H=True, **TILE), 8, 3, True),
    "fwd_entropy": (slp._selective_logprob_fwd_kernel, "bf16",
                    dict(WITH_ENTROPY=True, DOT_IEEE=False, EVEN_H=True, **TILE), 8, 3, True),
    "fwd_fp32_masked_h": (slp._selective_logprob_fwd_kernel, "fp32",
                          dict(WITH_ENTROPY=True, DOT_IEEE=True, EVEN_H=False, BLOCK_N=128, BLOCK_V=128, BLOCK_H=32),
                          8, 3, False),
    "merge": (slp._selective_logprob_merge_kernel, "bf16",
              dict(WITH_ENTROPY=True, BLOCK_N=64, BLOCK_S=8, BLOCK_H=128), 4, 1, True),
    "bwd": (slp._selective_logprob_bwd_kernel, "bf16",
            dict(DOT_IEEE=False, EXP_FP64=False, RNE_BF16=False, EVEN_H=True, **TILE), 8, 3, True),
    "bwd_fp32_exp_fp64": (slp._selective_logprob_bwd_kernel, "fp32",
                          dict(DOT_IEEE=True, EXP_FP64=True, RNE_BF16=False, EVEN_H=False, BLOCK_N=128, BLOCK_V=128,
                               BLOCK_H=32), 8, 3, False),
    "dh": (slp._selective_logprob_dh_kernel, "bf16",
           dict(DOT_IEEE=False, EVEN_K=True, BLOCK_M=128, BLOCK_H=128, BLOCK_K=64), 8, 3, True),
    "dh_k_tail": (slp._selective_logprob_dh_kernel, "bf16",
                  dict(DOT_IEEE=False, EVEN_K=False, BLOCK_M=128, BLOCK_H=128, BLOCK_K=64), 8, 3, False),
    **{f"group_advantage_{scale}": (ga._group_advantage_kernel, "fp32",
                                    dict(SCALE=code, BLOCK_G=128, BLOCK_E=8), 4, 1, False)
       for scale, code in ga.SCALES.items()},
}


def _compile_all() -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (fn, dtype, constexprs, num_warps, num_stages, _) in CASES.items():
            try:
                kernel = _compile(fn, dtype, constexprs, num_warps, num_stages)
                results[name] = {"wgmma": "wgmma" in kernel.asm["ptx"], "spill_bytes": _spill_bytes(kernel, folder)}
            except Exception as exc:                                     # noqa: BLE001 (reported per case)
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    return results


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_compiles_for_sm90(compiled, name):
    result = compiled[name]
    assert "error" not in result, result.get("error")
    if name.startswith(("fwd", "bwd", "dh")) and CASES[name][1] == "bf16":
        assert result["wgmma"], "the bf16 GEMM did not lower to Hopper tensor-core instructions"
    if CASES[name][-1]:
        assert result["spill_bytes"] == 0


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
