"""One epoch of the cold-start SFT stage through the trainer, without the tower-feature store, with it cold and
with it warm, same run: the seconds of the epoch and of its media and towers phases.

    python benchmarks/bench_sft_epoch.py              # 24 DFEW-like clips (640x360, 2-5 s, h264 + aac)
    python benchmarks/bench_sft_epoch.py --quick      # 6 small clips (a smoke run; numbers mean nothing)

The model is the tiny checkpoint (omni_fast.testing.make_tiny_checkpoint: the real input geometry, 8 frames of
224 x 224 and 128 x 3000 log-mel, through towers of a few layers): the towers here cost far less than R1-Omni's,
so the rows measure what the store saves of decoding and of the trainer's own work around the towers; the
towers' share at the real shape comes from bench_grpo_step.py. Each entry is a different clip (an epoch reads each
clip once, as R1-Omni's data does): "none" trains without a store, "cold" with an empty one (the epoch computes
and writes every clip), "warm" with the store "cold" filled (every clip read; nothing decoded or encoded). The
three runs train the same steps from the same checkpoint (their losses are equal; checked). Times are wall
seconds of Trainer.train() and the sums of the steps' phase seconds from its metrics; the three runs take turns
--repeats times (every cold run starts from an empty store) and each figure is the median over its runs, so a
burst of load on a shared machine moves one run, not one row. On a CPU, run it with OMP_WAIT_POLICY=PASSIVE:
with GNU OpenMP's default, the intra-op thread spins after every parallel region, and on a small, shared machine a
run whose decoding threads are idle (the warm one) then pays that spinning in every op (measured on the 2-core
development box: the warm epoch's policy phase 5-8x slower than the cold one's, the same within noise with
PASSIVE). Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import emit
from omni_fast.grpo.trainer import Trainer
from omni_fast.testing import make_clip, make_tiny_checkpoint
from omni_fast.toy import ToyTask, toy_config

PHASES = ("media", "towers", "policy", "optimizer")


def make_task(directory: Path, count: int, quick: bool) -> ToyTask:
    """`count` distinct clips with an SFT target each, in the R1-Omni annotation format."""
    size, seconds = ((160, 90), (1.0,)) if quick else ((640, 360), (2.0, 3.0, 4.0, 5.0))
    (directory / "clips").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        path = directory / "clips" / f"clip{i:03d}.mp4"
        if not path.is_file():
            make_clip(path, seconds=seconds[i % len(seconds)], fps=(25, 30)[i % 2], size=size, seed=i)
        label = ("happy", "sad", "angry")[i % 3]
        entries.append({"video": f"clips/{path.name}", "conversations": [
            {"from": "human", "value": "<video>\n<audio>\nWhich emotion?"},
            {"from": "gpt", "value": f"<think>The scene.</think>\n<answer>{label}</answer>"}]})
    (directory / "sft.json").write_text(json.dumps(entries))
    return ToyTask(root=directory, sft_annotations=directory / "sft.json", grpo_annotations=directory / "sft.json",
                   clips={}, labels=("happy", "sad", "angry"))


def run_epoch(task: ToyTask, ckpt: Path, out: Path, store: Path | None, batch: int, device: str) -> dict:
    cfg = toy_config(task, ckpt, out, "sft", max_steps=-1, num_train_epochs=1, per_device_train_batch_size=batch,
                     progress=False, device=device, media_workers=os.cpu_count() or 1, save_steps=10_000,
                     tower_cache_dir=None if store is None else str(store))
    trainer = Trainer(cfg)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    history = trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    phases = {p: sum(m.get(f"time/{p}", 0.0) for m in history) for p in PHASES}
    return {"epoch_s": seconds, "steps": len(history), "phase_s": phases, "losses": [m["loss"] for m in history],
            "hits": sum(m.get("tower_cache/hits", 0) for m in history),
            "misses": sum(m.get("tower_cache/misses", 0) for m in history)}


def _median(runs: list[dict]) -> dict:
    """The runs of one row: median seconds, the counts and losses of the first (all runs train alike)."""
    out = dict(runs[0])
    out["epoch_s"] = statistics.median(r["epoch_s"] for r in runs)
    out["phase_s"] = {p: statistics.median(r["phase_s"][p] for r in runs) for p in PHASES}
    out["runs"] = len(runs)
    assert all(r["losses"] == runs[0]["losses"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="6 small clips: a smoke run, not a measurement")
    p.add_argument("--clips", type=int, default=24, help="distinct clips (= entries) in the epoch")
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size")
    p.add_argument("--repeats", type=int, default=3, help="epochs per row, taking turns (median reported)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dir", default=None, help="where the clips, checkpoints and store go (default: temporary)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    count = 6 if args.quick else args.clips
    with tempfile.TemporaryDirectory(prefix="bench_sft_epoch-", dir=args.dir) as tmp:
        root = Path(tmp)
        ckpt = make_tiny_checkpoint(root / "tiny")
        task = make_task(root / "task", count, args.quick)
        every: dict[str, list[dict]] = {"none": [], "cold": [], "warm": []}
        for k in range(1 if args.quick else args.repeats):
            for name, store in (("none", None), ("cold", root / f"store-{k}"), ("warm", root / "store-0")):
                every[name].append(run_epoch(task, ckpt, root / f"out-{name}-{k}", store, args.batch, device))
    runs = {name: _median(rs) for name, rs in every.items()}
    assert runs["none"]["losses"] == runs["cold"]["losses"] == runs["warm"]["losses"], "the store changed a loss"
    assert (runs["cold"]["misses"], runs["warm"]["hits"], runs["warm"]["misses"]) == (count, count, 0), runs
    print(f"# SFT, one epoch of {count} distinct clips ({'small' if args.quick else '640x360 2-5 s'} h264 + aac), "
          f"batch {args.batch}, tiny checkpoint, device {device}, {os.cpu_count()} cores, median of "
          f"{runs['none']['runs']} epochs per row; same losses in all runs")
    rows = [[name, r["epoch_s"], *(r["phase_s"][p] for p in PHASES), r["hits"], r["misses"]]
            for name, r in runs.items()]
    speedup = runs["cold"]["epoch_s"] / runs["warm"]["epoch_s"]
    print(f"# epoch seconds, cold store / warm store: {speedup:.2f}")
    emit("sft_epoch", ["store", "epoch s", *(f"{p} s" for p in PHASES), "hits", "misses"], rows,
         {"device": device, "quick": args.quick, "clips": count, "batch": args.batch, "warm_speedup": speedup,
          "rows": [{"store": name, **{k: v for k, v in r.items() if k != "losses"}} for name, r in runs.items()]},
         args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
