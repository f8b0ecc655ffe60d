"""LoRA (use_peft) against full fine-tuning: peak memory per rank of one GRPO step, and what a decode step costs
with the adapters applied in the engine's linears against the same weights merged.

Memory: grpo/step.py's grpo_step (the trainer's step: towers, rollout, reference, policy, AdamW), B = 1 prompt x
G = 8 completions of N tokens (ignore EOS), run twice (AdamW's moments exist from the first), in a fresh process
per mode, the same inputs: full fine-tuning (a frozen reference copy of the trained weights, gradients, fp32
masters for bf16 parameters, AdamW moments) against LoRA on the decoder's linears (rank 16: only the adapters
have gradients and moments; the reference is the adapters off). The peak is CUDA's max_memory_allocated over the
process on a GPU; on the CPU the process's peak resident set (ru_maxrss) less its resident set before the model
is built. Beside the measurement, the bytes per rank before activations and the KV cache, computed from the
parameter counts, for the measured model, R1-Omni-0.5B (its real shape, counted on the meta device) and a 7B
HumanOmni (Qwen2.5-7B's decoder; 7.8B trained and 1.05B frozen tower parameters in full fine-tuning).

Decode: the engine's decode step (CUDA graphs on a GPU) on 1 prompt x 8 samples, N new tokens, the decoder with
LoRA adapters (random A, B) against the plain decoder, which is what merged weights cost.

Shapes:
    python benchmarks/bench_lora.py                      # GPU: the real R1-Omni-0.5B shape, bf16, random weights
    python benchmarks/bench_lora.py --device cpu         # CPU: the 0.5B decoder's widths with 2 of its 24 layers,
                                                         # the tiny checkpoint's towers, fp32
    python benchmarks/bench_lora.py --quick              # the tiny checkpoint (a smoke run, not a measurement)
Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common import emit, finish_args

CPU_LAYERS = 2  # --device cpu: the 0.5B decoder with this many of its 24 layers
LORA_R = 16
BF16, FP32 = 2, 4
# a 7B HumanOmni (README's FSDP figure): Qwen2.5-7B decoder shape, trained and frozen parameter totals
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4)
TRAINED_7B, FROZEN_7B = 7.8e9, 1.05e9


def adapter_params(shape: dict, r: int = LORA_R) -> int:
    """LoRA parameters on the decoder's linears: r x (in + out) per adapted linear, q/k/v and gate/up packed."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    per_layer = r * ((h + h + 2 * kv) + (h + h) + (h + 2 * i) + (i + h))
    return per_layer * shape["num_hidden_layers"]


def bytes_per_rank(trained: float, frozen: float, adapters: float, dtype_bytes: int) -> dict:
    """Bytes per rank before activations and the KV cache, under DDP (the whole model on every rank), as the
    trainer holds them: weights; full fine-tuning adds a reference copy of the trained weights, their gradients,
    fp32 masters and the masters' gradients (bf16 only) and AdamW's two moments; LoRA adds the same for the
    adapters alone."""
    masters = 2 * FP32 if dtype_bytes != FP32 else 0

    def per_param(n):
        return n * (dtype_bytes + masters + 2 * FP32)  # gradient, masters + their gradients, moments
    weights = (trained + frozen) * dtype_bytes
    return {"full": weights + trained * dtype_bytes + per_param(trained),
            "lora": weights + adapters * dtype_bytes + per_param(adapters)}


# --- one mode, in a process of its own -----------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build(args, device: torch.device, dtype: torch.dtype):
    from omni_fast.model.checkpoint import load_checkpoint
    from omni_fast.testing import make_tiny_checkpoint, random_r1omni

    tiny = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    if args.quick:
        return load_checkpoint(tiny, device=device, dtype=dtype)
    layers = CPU_LAYERS if device.type == "cpu" else None
    return random_r1omni(tiny, device, dtype, num_hidden_layers=layers, tiny_towers=device.type == "cpu")


def child(args) -> dict:
    from omni_fast.config import GRPOConfig
    from omni_fast.distributed import DistContext
    from omni_fast.grpo.step import build_context, grpo_step, train_dtype
    import contextlib

    device = torch.device(args.device)
    cfg = GRPOConfig(num_generations=8, max_completion_length=args.completion_length, lr_scheduler_type="constant",
                     use_peft=args.child == "lora", lora_r=LORA_R, reward_funcs=("format",))
    dtype = train_dtype(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = _rss_bytes()
    loaded = build(args, device, dtype)
    counts = {"params": sum(p.numel() for p in loaded.model.parameters()),
              "trained_full": sum(p.numel() for n, p in loaded.model.named_parameters() if "_tower." not in n)}
    reference = None if cfg.use_peft else loaded.model.copy_sharing_towers()
    ctx = build_context(cfg, loaded, DistContext(), reference, total_steps=2)
    ctx.ignore_eos = True
    counts["trained"] = sum(p.numel() for _, p in ctx.trainable)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(1, loaded.config.num_frames, 3, 224, 224, generator=gen).to(device, dtype)
    mel = torch.randn(1, loaded.model.towers.audio.num_mel_bins, 3000, generator=gen).mul_(0.5).to(device, dtype)
    micro = [SimpleNamespace(frames=frames, mel=mel, records=[SimpleNamespace(label="happy", index=0)])]
    t0 = time.perf_counter()
    for step in (1, 2):
        list(grpo_step(ctx, micro, step, lambda name: contextlib.nullcontext()))
    seconds = (time.perf_counter() - t0) / 2
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    return {"mode": args.child, "peak_bytes": peak, "step_s": seconds, "dtype": str(dtype), **counts}


def run_child(mode: str, args) -> dict:
    argv = [sys.executable, __file__, "--child", mode, "--device", args.device, "--threads", str(args.threads),
            "--completion_length", str(args.completion_length)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_lora: the {mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- decode: adapters applied against merged ------------------------------------------------------------------
def decode_ms(args, device: torch.device, dtype: torch.dtype) -> dict:
    from omni_fast.config import EngineConfig, SamplingParams
    from omni_fast.engine.engine import Engine
    from omni_fast.model import lora
    from omni_fast.testing import QWEN25_05B, TINY_DECODER, random_decoder

    shape = dict(TINY_DECODER if args.quick else QWEN25_05B)
    if device.type == "cpu" and not args.quick:
        shape["num_hidden_layers"] = CPU_LAYERS
    n = args.completion_length
    out = {}
    for mode in ("merged", "applied"):
        model = random_decoder(shape, device, dtype)
        if mode == "applied":
            adapters = lora.apply(model, LORA_R, 2 * LORA_R, 0.0, lora.DECODER_TARGETS)
            with torch.no_grad():
                for _, p in adapters:
                    p.normal_(0, 0.01)
        engine = Engine(model, EngineConfig(), (0,))
        prompt = torch.randn(1000, shape["hidden_size"], device=device, dtype=dtype) * 0.1

        def seconds(tokens: int) -> float:
            params = SamplingParams(n=8, temperature=1.0, top_k=50, max_tokens=tokens, seed=0, ignore_eos=True)
            runs = []
            for _ in range(3):  # the first captures the graphs
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                engine.generate([prompt], params)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - t0)
            return min(runs[1:])
        out[mode] = (seconds(n + 1) - seconds(1)) / n * 1e3  # the prefill and first token taken out
        del engine, model
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny checkpoint on the CPU (a smoke run)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="where to measure (cpu: the reduced CPU shape)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for --device cpu")
    ap.add_argument("--completion_length", type=int, default=None, help="N (default: 8 quick, 32 cpu, 256 cuda)")
    ap.add_argument("--child", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = finish_args(ap.parse_args(argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_lora: no CUDA device; --device cpu measures the reduced CPU shape")
    args.completion_length = args.completion_length or (8 if args.quick else 32 if args.device == "cpu" else 256)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    runs = {mode: run_child(mode, args) for mode in ("full", "lora")}
    full, lora_run = runs["full"], runs["lora"]
    dtype_bytes = BF16 if dtype == torch.bfloat16 else FP32
    measured_model = bytes_per_rank(full["trained"], full["params"] - full["trained"], lora_run["trained"],
                                    dtype_bytes)
    r05 = _r1omni_counts()
    computed = {"measured model": measured_model,
                "R1-Omni-0.5B bf16": bytes_per_rank(r05["trained"], r05["frozen"], r05["adapters"], BF16),
                "7B HumanOmni bf16": bytes_per_rank(TRAINED_7B, FROZEN_7B, adapter_params(QWEN25_7B), BF16)}
    decode = decode_ms(args, device, dtype)
    gib = 2 ** 30
    rows = [["measured peak (GiB)", full["peak_bytes"] / gib, lora_run["peak_bytes"] / gib,
             full["peak_bytes"] / lora_run["peak_bytes"]]]
    rows += [[f"computed: {name} (GiB)", v["full"] / gib, v["lora"] / gib, v["full"] / v["lora"]]
             for name, v in computed.items()]
    rows.append(["step s", full["step_s"], lora_run["step_s"], full["step_s"] / lora_run["step_s"]])
    shape = "tiny checkpoint" if args.quick else ("R1-Omni-0.5B shape" if device.type == "cuda" else
                                                   f"0.5B decoder widths, {CPU_LAYERS} of 24 layers, tiny towers")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"GRPO step per rank, full fine-tuning vs LoRA r={LORA_R} ({shape}, {dtype}, {name}; B=1 x G=8, "
          f"N={args.completion_length})")
    print(f"decode step, 1 prompt x 8 samples: merged weights {decode['merged']:.3f} ms, adapters applied "
          f"{decode['applied']:.3f} ms ({decode['applied'] / decode['merged']:.2f}x)")
    return emit("lora", ["", "full", "lora", "full/lora"], rows, {
        "device": name, "dtype": str(dtype), "quick": args.quick, "shape": shape,
        "rows": [{"figure": r[0], "full": r[1], "lora": r[2], "full_over_lora": r[3]} for r in rows]
        + [{"figure": "decode step ms (merged vs adapters applied)", "merged_ms": decode["merged"],
            "applied_ms": decode["applied"]}],
        "completion_length": args.completion_length, "lora_r": LORA_R, "runs": runs,
        "computed_bytes": computed, "r1omni_05b_counts": r05, "decode_ms": decode,
    }, args.out)


def _r1omni_counts() -> dict:
    """Parameter counts of the real R1-Omni-0.5B shape, built on the meta device (no memory)."""
    from transformers import BertConfig, SiglipVisionConfig, WhisperConfig

    from omni_fast.config import ModelConfig
    from omni_fast.model.omni import HumanOmniForCausalLM, TowerConfigs
    from omni_fast.model.towers import SIGLIP_BASE_PATCH16_224, WHISPER_LARGE_V3
    from omni_fast.testing import QWEN25_05B

    cfg = ModelConfig(**QWEN25_05B, audio_hidden_size=WHISPER_LARGE_V3["d_model"])
    towers = TowerConfigs(vision=SiglipVisionConfig(**SIGLIP_BASE_PATCH16_224), audio=WhisperConfig(**WHISPER_LARGE_V3),
                          bert=BertConfig())
    with torch.device("meta"):
        model = HumanOmniForCausalLM(cfg, towers)
    frozen = sum(p.numel() for n, p in model.named_parameters() if "_tower." in n)
    total = sum(p.numel() for p in model.parameters())
    return {"trained": total - frozen, "frozen": frozen, "adapters": adapter_params(QWEN25_05B)}


if __name__ == "__main__":
    main()
