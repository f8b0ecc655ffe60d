"""Compile every Triton kernel of omni_fast for the H100 (sm_90) on a machine without a GPU.

The CPU interpreter runs the kernels' arithmetic but not the compiler: shape rules of tl.dot, types of
loop-carried values, what may be a constexpr, are only checked when Triton lowers a kernel to PTX. This script
calls each host wrapper with meta tensors of the shapes and dtypes the GPU path uses, records the launches
instead of running them (JITFunction.run is replaced), and compiles each recorded launch with
triton.compile(..., target=GPUTarget("cuda", 90, 32)) down to a cubin.

Run as a script (not under TRITON_INTERPRET): python tests/triton_aot.py  -> one line per kernel, exit 1 on error.
"""
from __future__ import annotations

import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: this compiles, not interprets"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
         torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
launches: list[tuple[str, JITFunction, dict, dict, dict]] = []


def _record(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in LAUNCH_OPTIONS}
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    signature, constexprs = {}, {}
    for i, name in enumerate(self.arg_names):
        value = bound[name]
        if i in self.constexprs:
            signature[name], constexprs[name] = "constexpr", value
        elif torch.is_tensor(value):
            signature[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{self.fn.__name__}: cannot type argument {name}={value!r}")
    launches.append((f"{self.fn.__module__.split('.')[-1]}.{self.fn.__name__}", self, signature, constexprs, options))


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def record_all() -> None:
    """The GPU-side calls: bf16 activations, Qwen2.5-0.5B shapes."""
    from omni_fast.kernels import cascade_attention, rms_norm, rope, sampling, silu_mul

    b, hq, hkv, d, p = 64, 14, 2, 64, 8
    for dtype in (torch.bfloat16, torch.float32):
        blocks, bs = 4096, 16  # the paged pool: (num_blocks, block_size, Hkv, D), int32 block tables
        cascade_attention.cascade_attention(
            meta(b, hq, d, dtype=dtype), meta(blocks, bs, hkv, d, dtype=dtype), meta(blocks, bs, hkv, d, dtype=dtype),
            meta(p, 1024 // bs, dtype=torch.int32), meta(p, dtype=torch.int64), meta(b, dtype=torch.int64),
            meta(b, 576 // bs, dtype=torch.int32), meta(b, dtype=torch.int64), group_offsets=meta(p + 1, dtype=torch.int64))
    logits = meta(b, 151936, dtype=torch.float32)
    vec = meta(b, dtype=torch.float32)
    sampling.sample(logits, vec, meta(b, dtype=torch.int64), vec, meta(b, dtype=torch.int64), 3, (50, True, False))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        rms_norm.add_rms_norm(meta(b, 896, dtype=dtype), meta(b, 896, dtype=dtype), meta(896, dtype=dtype), 1e-6)
        rms_norm.add_rms_norm(meta(b, 896, dtype=dtype), None, meta(896, dtype=dtype), 1e-6)
        qkv = meta(b, (hq + 2 * hkv) * d, dtype=dtype)
        q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        rope.rope(q.view(b, hq, d), k.view(b, hkv, d), meta(b, d, dtype=dtype), meta(b, d, dtype=dtype))
        silu_mul.silu_mul(meta(b, 2 * 4864, dtype=dtype))
    _record_grpo_kernels()


def _record_grpo_kernels() -> None:
    """selective_logprob forward (with and without entropy) and backward at the R1-Omni shape, and at an odd
    shape that takes the masked H / K tails; group advantages in every scale."""
    from omni_fast.kernels import group_advantage
    from omni_fast.kernels import selective_logprob as slp

    for (n, v, h), dtype in [((10240, 151936, 896), torch.bfloat16), ((10240, 151936, 896), torch.float32),
                             ((37, 4099, 96), torch.bfloat16)]:
        config = slp.gpu_config(n, v, h, dtype)
        hidden, weight, targets = meta(n, h, dtype=dtype), meta(v, h, dtype=dtype), meta(n, dtype=torch.int64)
        for with_entropy in (False, True):
            _, lse, _ = slp.selective_logprob_fwd(hidden, weight, targets, 0.9, with_entropy, config)
        slp.selective_logprob_bwd(meta(n, dtype=torch.float32), hidden, weight, targets, lse, 0.9, True, True, config)
    for scale in group_advantage.SCALES:
        group_advantage.group_advantage(meta(2, 2**20, dtype=torch.float32), 8, 1e-4, scale)


def main() -> int:
    JITFunction.run = _record
    record_all()
    failures = 0
    seen = set()
    for name, fn, signature, constexprs, options in launches:
        key = (name, tuple(signature.items()), tuple(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=H100,
                                      options=options)
            ok = "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
            print(f"ok   {name} {signature} {constexprs}" if ok else f"FAIL {name}: no cubin")
            failures += not ok
        except Exception:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(f"FAIL {name} {signature} {constexprs}\n{traceback.format_exc()}")
    print(f"{len(seen)} kernel variants compiled for sm_90, {failures} failed")
    return 1 if failures or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
