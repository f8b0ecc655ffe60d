"""Inference as `omni-fast infer` runs it on the card: OmniModel greedy decoding with float16 weights (towers
included, the reference's model_init), stretched frames, the checkpoint's repetition penalty, at the real
R1-Omni-0.5B shape with random weights, on synthetic DFEW-like clips (640x360 h264 + AAC, 3 s).

Baseline in the same run: the same clips one at a time (batch 1, as the reference inference.py loops over
clips), against batches of --batch_size. Each clip generates exactly --new_tokens tokens (EOS ignored: random
weights stop anywhere), so both paths do the same work. Reported: clips/s and seconds per clip by stage (media
wait, towers + projectors, generation) for each path, and whether every generated log-prob is finite (a float16
overflow shows there).

    python benchmarks/bench_infer.py                 # GPU: float16, real shape
    python benchmarks/bench_infer.py --device cpu    # the tiny checkpoint in float32 (the shape is stated)

Last stdout line: one JSON object. `--quick`: the tiny checkpoint, 2 clips, 4 tokens (a smoke test).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from common import emit, finish_args
from omni_fast.api import OmniModel, inference_dtype
from omni_fast.config import SamplingParams
from omni_fast.model.checkpoint import load_checkpoint
from omni_fast.testing import make_clip, make_tiny_checkpoint, random_r1omni


def run(model: OmniModel, clips: list[Path], batch_size: int, new_tokens: int) -> dict:
    gen = model.loaded.generation
    params = SamplingParams(n=1, temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                            repetition_penalty=gen.repetition_penalty)
    model.generate(clips[:1], sampling=dataclasses.replace(params, max_tokens=2), batch_size=1)  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = model.generate(clips, sampling=params, batch_size=batch_size)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    per_clip = {k: sum(getattr(r.timings, k) for r in results) / len(results) for k in ("media", "encode", "generate")}
    finite = all(bool(torch.isfinite(c.logprobs).all()) for r in results for c in r.completions)
    tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    return {"batch_size": batch_size, "clips_per_s": len(clips) / seconds, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "per_clip_s": per_clip, "logprobs_finite": finite}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny checkpoint, 2 clips, 4 tokens (smoke test)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda: float16 at the real shape; cpu: the tiny checkpoint in float32")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for --device cpu")
    ap.add_argument("--clips", type=int, default=16, help="clips recognised by each path")
    ap.add_argument("--batch_size", type=int, default=8, help="clips per batch of the batched path")
    ap.add_argument("--new_tokens", type=int, default=128, help="tokens generated per clip")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = finish_args(ap.parse_args(argv))
    if args.quick:
        args.clips, args.batch_size, args.new_tokens = 2, 2, 4
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    tiny = make_tiny_checkpoint(work / "tiny")
    dtype = inference_dtype(device)
    if device.type == "cuda":
        loaded, shape = random_r1omni(tiny, device, dtype), "R1-Omni-0.5B (random weights)"
    else:
        loaded, shape = load_checkpoint(tiny, device=device, dtype=dtype), "tiny test checkpoint"
    model = OmniModel(loaded)
    size = (160, 120) if args.quick else (640, 360)
    clips = [make_clip(work / f"clip{i}.mp4", seconds=1.0 if args.quick else 3.0, fps=25, size=size, seed=i)
             for i in range(args.clips)]
    one = run(model, clips, 1, args.new_tokens)
    batched = run(model, clips, args.batch_size, args.new_tokens)
    rows = [{"path": "one clip at a time (reference loop)", **one},
            {"path": f"batches of {args.batch_size}", **batched, "speedup": batched["clips_per_s"] / one["clips_per_s"]}]
    table = [[r["path"], r["clips_per_s"], r["tokens_per_s"], r["per_clip_s"]["media"], r["per_clip_s"]["encode"],
              r["per_clip_s"]["generate"], str(r["logprobs_finite"])] for r in rows]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return emit("infer", ["path", "clips/s", "tok/s", "media s/clip", "encode s/clip", "generate s/clip",
                          "finite"], table,
                {"device": device_name, "dtype": str(dtype), "shape": shape, "quick": args.quick,
                 "clips": args.clips, "new_tokens": args.new_tokens, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
