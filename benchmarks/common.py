"""Shared by the kernel benchmarks: timing, peak memory, the H100 ceilings, the table and the JSON line.

On CUDA: median of warmed-up runs (triton.testing.do_bench, CUDA events) and peak memory over one run.
On CPU (`--device cpu`, for smoke runs in CI) the Triton kernels run under TRITON_INTERPRET=1, so times are
wall-clock of a couple of runs and mean nothing; they are printed only to exercise the code.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable

# The ceilings measured on the project's H100 (shared/GPU.md): device copy and bf16 dense matmul.
H100_COPY_BYTES_PER_S = 3.0e12
H100_BF16_FLOPS = 774e12


def setup_device(device: str) -> None:
    """Before triton is imported: without CUDA the Triton kernels must run in the interpreter."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def median_ms(fn: Callable[[], object], device: str, grad_to_none=None, cpu_runs: int = 2) -> float:
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none,
                                             return_mode="median"))
    times = []
    for _ in range(cpu_runs):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def extra_peak_gb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory above what was allocated before one call of fn, in GB (None on CPU)."""
    if device != "cuda":
        fn()
        return None
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def print_table(rows: list[dict], columns: list[str]) -> None:
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def emit_json(payload: dict) -> None:
    """The last line of stdout: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(payload, sort_keys=True))
