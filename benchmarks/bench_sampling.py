"""Sampling (ops.sample) against the torch reference and an HF-style torch sampler, same run.

Rollout rows of Qwen2.5's vocabulary (151,936), temperature 1.0 with top_k 50 (R1-Omni) and plain temperature
sampling; 8, 64, 256 rows on a GPU, 8, 16, 32, 64 with `--device cpu` (the CPU path, 2 threads). Roofline:
reading the fp32 logits once at the device's copy bandwidth, measured in the same run.
Last stdout line: one JSON object; --quick is a CPU smoke run (tiny shapes, not timed).
"""
from __future__ import annotations

import torch

from common import bench_args, copy_bandwidth, emit, time_ms
from omni_fast import ops
from omni_fast.kernels.sampling import sample_ref


def hf_style(logits, top_k):
    """What HF generate does per step: top-k warper, softmax, multinomial, plus the log-prob gather."""
    if top_k:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=1)
    tokens = torch.multinomial(probs, 1)
    return tokens[:, 0], torch.log(probs.gather(1, tokens))[:, 0]


def main(argv=None):
    args = bench_args(__doc__, argv)
    device = torch.device(args.device)
    vocab = 2000 if args.quick else 151936
    bandwidth = copy_bandwidth(device.type)
    sizes = [4] if args.quick else [8, 16, 32, 64] if device.type == "cpu" else [8, 64, 256]
    rows, records = [], []
    for b in sizes:
        for top_k in (50, 0):
            logits = torch.randn(b, vocab, device=device) * 3
            t = torch.ones(b, device=device)
            k = torch.full((b,), top_k, device=device)
            p = torch.ones(b, device=device)
            seeds = torch.arange(b, device=device) + 1
            reps = dict(warmup=1, reps=1) if args.quick else dict(warmup=1, reps=5) if device.type == "cpu" else {}
            ours = time_ms(lambda: ops.sample(logits, t, k, p, seeds, 7, (top_k, False, False)), device, **reps)
            ref = time_ms(lambda: sample_ref(logits, t, k, p, seeds, 7, (top_k, False, False)), device, **reps)
            hf = time_ms(lambda: hf_style(logits, top_k), device, **reps)
            gbps = b * vocab * 4 / (ours * 1e-3) / 1e9
            rows.append([b, top_k, ours * 1e3, ref * 1e3, hf * 1e3, hf / ours, gbps, gbps * 1e9 / bandwidth])
            records.append({"rows": b, "top_k": top_k, "ours_us": ours * 1e3, "torch_ref_us": ref * 1e3,
                            "hf_style_us": hf * 1e3, "GBps": gbps, "roofline_fraction": gbps * 1e9 / bandwidth})
    emit("sampling", ["rows", "top_k", "ours us", "ref us", "HF-style us", "vs HF", "GB/s", "roofline"], rows,
         {"device": str(device), "vocab": vocab, "quick": args.quick, "copy_GBps": bandwidth / 1e9,
          "backend": ops.backends("sample", device)[0], "rows": records}, args.out)


if __name__ == "__main__":
    main()
