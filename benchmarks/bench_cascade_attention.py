"""Cascade decode attention (ops.cascade_attention) against its torch reference, same inputs, same run.

R1-Omni rollout shapes: 1, 8, 32 prompt groups x n = 8 samples, 1,000-token prefix, 256 generated tokens so
far, 14 query / 2 KV heads, head dim 64, bf16; one layer's attention for one decode step. Roofline: the bytes
the step must read (each prefix once per group, each sample's own keys/values, q and out) at the device's copy
bandwidth, measured in the same run; the pool is paged as the engine's (16-position blocks). `--device cpu` times the CPU path (fp32, 2 threads) at the rollout
benchmark's CPU configs: 1 x 8, 1 x 16, 4 x 8 samples, 1,000-token prefix, 16 generated.
Last stdout line: one JSON object; --quick is a CPU smoke run (tiny shapes, not timed).
"""
from __future__ import annotations

import torch

from common import bench_args, copy_bandwidth, emit, time_ms
from omni_fast import ops
from omni_fast.kernels.cascade_attention import cascade_attention_ref


def inputs(groups: int, n: int, prefix: int, gen: int, device, dtype=torch.bfloat16, hq=14, hkv=2, d=64,
           block_size=16):
    """One layer's paged pool as the engine lays it out: each group's prefix and each row's generated keys in
    consecutive blocks of `block_size` positions (the allocator hands out the lowest ids first), int32 tables."""
    b = groups * n
    wp, wg = -(-prefix // block_size), -(-(gen + 64) // block_size)
    blocks = groups * wp + b * wg
    k_cache, v_cache = (torch.randn(blocks, block_size, hkv, d, device=device, dtype=dtype) for _ in range(2))
    ids = torch.arange(blocks, device=device, dtype=torch.int32)
    prefix_tables, gen_tables = ids[:groups * wp].view(groups, wp), ids[groups * wp:].view(b, wg)
    q = torch.randn(b, hq, d, device=device, dtype=dtype)
    lens = torch.full((groups,), prefix, device=device)
    rows = torch.arange(b, device=device)
    return q, k_cache, v_cache, prefix_tables, lens, rows // n, gen_tables, torch.full((b,), gen, device=device)


def bytes_read(groups, n, prefix, gen, hq=14, hkv=2, d=64, elem=2) -> int:
    kv = 2 * hkv * d * elem
    return groups * prefix * kv + groups * n * gen * kv + 2 * groups * n * hq * d * elem


def main(argv=None):
    args = bench_args(__doc__, argv)
    device = torch.device(args.device)
    if args.quick:
        configs = [(1, 2, 40, 8)]
    elif device.type == "cpu":
        configs = [(1, 8, 1000, 16), (1, 16, 1000, 16), (4, 8, 1000, 16)]
    else:
        configs = [(1, 8, 1000, 256), (8, 8, 1000, 256), (32, 8, 1000, 256)]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    bandwidth = copy_bandwidth(device.type)
    rows, records = [], []
    for groups, n, prefix, gen in configs:
        x = inputs(groups, n, prefix, gen, device, dtype)
        reps = dict(warmup=1, reps=1) if args.quick else {}
        ours = time_ms(lambda: ops.cascade_attention(*x), device, **reps)
        ref = time_ms(lambda: cascade_attention_ref(*x), device, **reps)
        gbps = bytes_read(groups, n, prefix, gen, elem=dtype.itemsize) / (ours * 1e-3) / 1e9
        rows.append([f"{groups}x{n}", prefix, gen, ours * 1e3, ref * 1e3, ref / ours, gbps, gbps * 1e9 / bandwidth])
        records.append({"groups": groups, "n": n, "prefix": prefix, "gen": gen, "ours_us": ours * 1e3,
                        "torch_ref_us": ref * 1e3, "GBps": gbps, "roofline_fraction": gbps * 1e9 / bandwidth})
    emit("cascade_attention", ["groups x n", "prefix", "gen", "ours us", "torch us", "speedup", "GB/s", "roofline"],
         rows, {"device": str(device), "dtype": str(dtype), "quick": args.quick, "copy_GBps": bandwidth / 1e9,
                "backend": ops.backends("cascade_attention", device)[0], "rows": records}, args.out)


if __name__ == "__main__":
    main()
