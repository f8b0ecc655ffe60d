"""GRPO group advantages for 2^20 rewards (K = 2 reward functions, G = 8): every backend, every scale.

Rows: the CUDA op (omni_fast._C), Triton, and the torch reference (the reference trainer's view / mean / std /
repeat_interleave, several launches), measured in the same run. Bytes moved are K*M*4 read + M*4 written;
GB/s and the fraction of the 3.0 TB/s copy ceiling (shared/GPU.md) use that count. Reward buffers rotate
through more than 100 MB so no call finds its input in the 50 MB L2.

    python benchmarks/bench_group_advantage.py                  # CUDA
    python benchmarks/bench_group_advantage.py --device cpu     # small, C++ op + Triton interpreter (smoke)
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    p.add_argument("--rewards", type=int, default=None, help="B*G (default 2^20; 512 on cpu)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--components", type=int, default=2, help="K reward functions")
    args = p.parse_args()
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    common.setup_device(device)
    from omni_fast import ops
    from omni_fast.grpo.advantage import group_advantages
    from omni_fast.kernels.group_advantage import group_advantage_ref

    m = args.rewards or (512 if device == "cpu" else 2**20)
    k, group_size = args.components, args.group_size
    bytes_moved = (k + 1) * m * 4
    n_buffers = max(1, -(-2 * 50 * 2**20 // (k * m * 4))) if device == "cuda" else 1
    torch.manual_seed(0)
    buffers = [torch.randint(0, 2, (k, m), device=device).float() + torch.rand(k, m, device=device) * 0.01
               for _ in range(n_buffers)]
    backends = [b for b in ("cuda", "cpu", "triton", "torch") if b in ops.backends("group_advantage", device)
                or b == "triton"]
    rows = []
    for backend, scale in itertools.product(backends, ("group", "batch", "none")):
        cycle = itertools.cycle(buffers)

        def run():
            return group_advantages(next(cycle), group_size, scale=scale)

        with ops.force_backend(backend, "group_advantage"):
            out = group_advantages(buffers[0], group_size, scale=scale)
            err = (out.double() - group_advantage_ref(buffers[0].double(), group_size, scale=scale)).abs().max()
            ms = common.median_ms(run, device)
        rows.append({"backend": backend, "scale": scale, "ms": ms, "us": ms * 1e3,
                     "gb_per_s": bytes_moved / (ms * 1e-3) / 1e9,
                     "roofline": bytes_moved / common.H100_COPY_BYTES_PER_S / (ms * 1e-3),
                     "max_err_vs_fp64": err.item()})
    print(f"group_advantage  M={m}  K={k}  G={group_size}  {bytes_moved / 1e6:.1f} MB moved per call  "
          f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu (not timed)'}")
    common.print_table(rows, ["backend", "scale", "us", "gb_per_s", "roofline", "max_err_vs_fp64"])
    common.emit_json({"bench": "group_advantage", "device": device, "timed": device == "cuda",
                      "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                      "shape": {"M": m, "K": k, "G": group_size}, "bytes_per_call": bytes_moved, "rows": rows})


if __name__ == "__main__":
    main()
