"""Shared benchmark helpers: timing on the device, the device's measured ceilings, the table + last-line-JSON
output.

GPU timings are triton.testing.do_bench's (median, the L2 flushed before every call) when Triton is there, CUDA
events around the same flush otherwise; CPU timings are perf_counter loops. The copy bandwidth a roofline is
taken against is measured on the device at hand in the same run (`copy_bandwidth`), not a card's constant.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

BF16_FLOPS = 774e12  # H100 bf16 dense matmul, measured (../shared/GPU.md); only the GPU rooflines use it
L2_FLUSH_BYTES = 256 << 20  # larger than any L2 (H200: 60 MB), as do_bench's flush


def bench_args(doc: str | None, argv=None, cpu_ok: bool = True) -> argparse.Namespace:
    """--quick (a CPU smoke run: tiny shapes, not a measurement), --device (cuda, or cpu for a CPU measurement
    at the benchmark's stated CPU shape), --threads (CPU threads) and --out (also write the JSON there)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run with tiny shapes (not a measurement)")
    ap.add_argument("--device", choices=["cuda", "cpu"] if cpu_ok else ["cuda"], default="cuda",
                    help="where to measure (cpu: the benchmark's reduced CPU shape)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for --device cpu")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    return finish_args(ap.parse_args(argv))


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """--quick implies the CPU; a CPU run uses --threads threads."""
    if args.quick:
        args.device = "cpu"
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    return args


def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def _cuda_ms(fn, warmup: int, reps: int) -> float:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    flush = _flush_buffer(torch.device("cuda"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_ms(fn, device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of fn() after warm-up: do_bench (L2 flushed) on a GPU, perf_counter on the CPU.
    On a GPU, reps=1 (a smoke run or a call too slow to repeat) times one call with CUDA events instead."""
    if device.type == "cuda" and reps > 1:
        return _cuda_ms(fn, warmup, reps)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@functools.cache
def copy_bandwidth(device_type: str) -> float:
    """Bytes per second (read + written) of a large tensor copy on this device, measured now: the roofline of
    the memory-bound rows (1 GiB on a GPU, 128 MiB on the CPU, both far past the caches)."""
    device = torch.device(device_type)
    n = (1 << 30 if device.type == "cuda" else 128 << 20) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * n * 4 / (ms * 1e-3)


def emit(name: str, header: list[str], rows: list[list], result: dict, out: str | None) -> dict:
    """Print the table, write `out` if given, and end stdout with the JSON line."""
    widths = [max(len(h), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(_fmt(v).rjust(w) for v, w in zip(r, widths)))
    result = {"bench": name, **result}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))
    return result


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def compare_memory_bound(name: str, doc: str, cases: list[tuple[str, tuple, int]], ours, ref, argv=None) -> dict:
    """A memory-bound op against its eager torch form: per case (label, args, bytes moved) the median time of
    each, the speedup, ours in GB/s and as a fraction of the device's measured copy bandwidth."""
    args = bench_args(doc, argv, cpu_ok=False)  # no CPU path of their own: on a CPU `ours` is the torch form
    device = torch.device(args.device)
    reps = dict(warmup=1, reps=1) if args.quick else {}
    bandwidth = copy_bandwidth(device.type)
    rows, records = [], []
    for label, make, nbytes in cases:
        inputs = make(device, args.quick)
        t_ours = time_ms(lambda: ours(*inputs), device, **reps)
        t_ref = time_ms(lambda: ref(*inputs), device, **reps)
        gbps = nbytes(inputs) / (t_ours * 1e-3) / 1e9
        rows.append([label, t_ours * 1e3, t_ref * 1e3, t_ref / t_ours, gbps, gbps * 1e9 / bandwidth])
        records.append({"case": label, "ours_us": t_ours * 1e3, "torch_us": t_ref * 1e3, "speedup": t_ref / t_ours,
                        "GBps": gbps, "roofline_fraction": gbps * 1e9 / bandwidth})
    return emit(name, ["case", "ours us", "torch us", "speedup", "GB/s", "roofline"], rows,
                {"device": str(device), "quick": args.quick, "copy_GBps": bandwidth / 1e9, "rows": records},
                args.out)
