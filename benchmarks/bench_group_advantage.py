"""GRPO group advantages for 2^20 rewards (K = 2 reward functions, G = 8): every backend, every scale.

Rows: the CUDA op (omni_fast._C), Triton, and the torch reference (the reference trainer's view / mean / std /
repeat_interleave, several launches), measured in the same run. Bytes moved are K*M*4 read + M*4 written;
GB/s and the fraction of the device's copy bandwidth (measured in the same run) use that count. Reward buffers
rotate through more than 100 MB so no call finds its input in the 50 MB L2. `--device cpu` times the C++ CPU
op against the torch reference (2 threads).
Last stdout line: one JSON object; --quick is a CPU smoke run (C++ op, Triton interpreter; not timed).
"""
from __future__ import annotations

import itertools
import os

import torch

from common import bench_args, copy_bandwidth, emit, time_ms


def main(argv=None):
    args = bench_args(__doc__, argv)
    device = torch.device(args.device)
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")                  # before the kernels are defined
    from omni_fast import ops
    from omni_fast.grpo.advantage import group_advantages
    from omni_fast.kernels.group_advantage import group_advantage_ref

    m, k, group_size = (512 if args.quick else 2**20), 2, 8
    bytes_moved = (k + 1) * m * 4
    n_buffers = 1 if args.quick else -(-2 * 50 * 2**20 // (k * m * 4))
    torch.manual_seed(0)
    buffers = [torch.randint(0, 2, (k, m), device=device).float() + torch.rand(k, m, device=device) * 0.01
               for _ in range(n_buffers)]
    with_triton = device.type == "cuda" or args.quick  # the interpreter is far too slow to measure
    backends = [b for b in ("cuda", "cpu", "triton", "torch")
                if (b == "triton" and with_triton) or b in ops.backends("group_advantage", device)]
    reps = {"warmup": 1, "reps": 1} if args.quick else {"warmup": 10, "reps": 100}
    bandwidth = copy_bandwidth(device.type)
    table, records = [], []
    for backend, scale in itertools.product(backends, ("group", "batch", "none")):
        cycle = itertools.cycle(buffers)
        with ops.force_backend(backend, "group_advantage"):
            out = group_advantages(buffers[0], group_size, scale=scale)
            err = (out.double() - group_advantage_ref(buffers[0].double(), group_size, scale=scale)).abs().max()
            ms = time_ms(lambda: group_advantages(next(cycle), group_size, scale=scale), device, **reps)  # noqa: B023
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        roofline = gbps * 1e9 / bandwidth
        table.append([backend, scale, ms * 1e3, gbps, roofline, err.item()])
        records.append({"backend": backend, "scale": scale, "us": ms * 1e3, "GBps": gbps,
                        "roofline_fraction": roofline, "max_err_vs_fp64": err.item()})
    print(f"M={m} rewards, K={k}, G={group_size}: {bytes_moved / 1e6:.1f} MB moved per call")
    emit("group_advantage", ["backend", "scale", "us", "GB/s", "roofline", "max err"], table,
         {"device": str(device), "quick": args.quick, "copy_GBps": bandwidth / 1e9, "M": m, "K": k, "G": group_size,
          "bytes_per_call": bytes_moved, "rows": records}, args.out)


if __name__ == "__main__":
    main()
