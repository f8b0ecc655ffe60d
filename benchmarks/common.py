"""Shared benchmark helpers: timing on the device, the H100 ceilings, the table + last-line-JSON output."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

HBM_BYTES_PER_S = 3.0e12  # H100 80GB HBM3 device-to-device copy, measured (../shared/GPU.md)
BF16_FLOPS = 774e12  # H100 bf16 dense matmul, measured


def bench_args(doc: str | None, argv=None) -> argparse.Namespace:
    """--quick (a CPU smoke run: tiny shapes, not a measurement) and --out (also write the JSON there)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run with tiny shapes (not a measurement)")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    return ap.parse_args(argv)


def time_ms(fn, device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of fn() after warm-up: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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
    each, the speedup, ours in GB/s and as a fraction of the HBM copy roofline."""
    args = bench_args(doc, argv)
    device = torch.device("cpu" if args.quick else "cuda")
    reps = dict(warmup=1, reps=1) if args.quick else {}
    rows, records = [], []
    for label, make, nbytes in cases:
        inputs = make(device, args.quick)
        t_ours = time_ms(lambda: ours(*inputs), device, **reps)
        t_ref = time_ms(lambda: ref(*inputs), device, **reps)
        gbps = nbytes(inputs) / (t_ours * 1e-3) / 1e9
        rows.append([label, t_ours * 1e3, t_ref * 1e3, t_ref / t_ours, gbps, gbps * 1e9 / HBM_BYTES_PER_S])
        records.append({"case": label, "ours_us": t_ours * 1e3, "torch_us": t_ref * 1e3, "speedup": t_ref / t_ours,
                        "GBps": gbps, "roofline_fraction": gbps * 1e9 / HBM_BYTES_PER_S})
    return emit(name, ["case", "ours us", "torch us", "speedup", "GB/s", "roofline"], rows,
                {"device": str(device), "quick": args.quick, "rows": records}, args.out)
