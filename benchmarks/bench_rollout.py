"""Rollout throughput: omni_fast's engine against HF transformers' generate, same weights, same run.

Qwen2.5-0.5B shape (the R1-Omni-0.5B decoder), random bf16 weights, 1,000-embedding prompts (a multimodal
prompt is ~90 text + 392 video + 500 audio embeddings), n = 8 samples per prompt, temperature 1.0 and
top_k 50 (R1-Omni's rollout setting), 512 new tokens forced (ignore EOS); 1, 8 and 32 prompts per batch.
HF generate (num_return_sequences=8, the reference trainer's call) runs fewer new tokens (--hf_tokens) to keep
the run short: its figure is ms per decode step, which does not depend on the count.

Reported per config: prefill time, ms per decode step, tokens/s (new tokens / (prefill + decode)), and the
fraction of the HBM roofline: the bytes a decode step must read (all weights once + the prefix KV once per
group + each sample's own KV) at the card's measured copy bandwidth.
Last stdout line: one JSON object. `--quick` runs a tiny model on the CPU (a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import time

import torch

from common import HBM_BYTES_PER_S, emit, time_ms
from omni_fast.config import EngineConfig, SamplingParams
from omni_fast.engine.engine import Engine
from omni_fast.model.qwen2 import Qwen2LM
from omni_fast.testing import QWEN25_05B, TINY_DECODER, random_decoder, transformers_twin

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_bytes(model: Qwen2LM, prompts: int, n: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes one decode step must read on average: every weight once, each prefix once per group, each sample's
    own keys/values (half the completion on average)."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token_kv = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * model.lm_head_weight.element_size()
    return weights + per_token_kv * (prompts * prompt_len + prompts * n * new_tokens / 2)


def bench_engine(model, prompts: int, n: int, prompt_len: int, new_tokens: int, device, seed: int = 0) -> dict:
    engine = Engine(model, EngineConfig(max_prompts=prompts, max_samples=prompts * n))
    hidden = model.config.hidden_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    embeds = [torch.randn(prompt_len, hidden, generator=g).mul_(0.1).to(device, model.lm_head_weight.dtype)
              for _ in range(prompts)]
    params = SamplingParams(n=n, temperature=1.0, top_k=50, max_tokens=new_tokens, ignore_eos=True, seed=seed)
    engine.runner.reserve(prompts, prompt_len, prompts * n, new_tokens)
    with torch.inference_mode():
        engine.generate(embeds, SamplingParams(n=n, temperature=1.0, top_k=50, max_tokens=8, ignore_eos=True))  # warm-up, graph capture
        prefill_s = time_ms(lambda: engine.runner.prefill(embeds), device, warmup=1, reps=5) / 1e3
        t0 = time.perf_counter()
        out = engine.generate(embeds, params)
        sync(device)
        total_s = time.perf_counter() - t0
    produced = sum(len(c.token_ids) for group in out for c in group)
    assert produced == prompts * n * new_tokens, produced
    step_ms = (total_s - prefill_s) / max(1, new_tokens - 1) * 1e3
    roofline_ms = decode_bytes(model, prompts, n, prompt_len, new_tokens) / HBM_BYTES_PER_S * 1e3
    return {"prefill_ms": prefill_s * 1e3, "step_ms": step_ms, "tokens_per_s": produced / total_s,
            "roofline_step_ms": roofline_ms, "roofline_fraction": roofline_ms / step_ms}


def bench_hf(hf, model, prompts: int, n: int, prompt_len: int, new_tokens: int, device, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    embeds = torch.randn(prompts, prompt_len, model.config.hidden_size, generator=g).mul_(0.1).to(
        device, model.lm_head_weight.dtype)
    kw = dict(inputs_embeds=embeds, attention_mask=torch.ones(prompts, prompt_len, dtype=torch.long, device=device),
              do_sample=True, temperature=1.0, top_k=50, num_return_sequences=n, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(**kw, max_new_tokens=2, min_new_tokens=2)  # warm-up
        copies = embeds.repeat_interleave(n, 0)  # what generate prefills: every copy of every prompt
        prefill_s = time_ms(lambda: hf(inputs_embeds=copies, logits_to_keep=1), device, warmup=1, reps=3) / 1e3
        t0 = time.perf_counter()
        hf.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        sync(device)
        total_s = time.perf_counter() - t0
    step_ms = (total_s - prefill_s) / max(1, new_tokens - 1) * 1e3
    return {"prefill_ms": prefill_s * 1e3, "step_ms": step_ms, "tokens_per_s": prompts * n / (step_ms / 1e3),
            "new_tokens": new_tokens}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU, a few tokens (smoke test)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=1000)
    ap.add_argument("--new_tokens", type=int, default=512)
    ap.add_argument("--hf_tokens", type=int, default=32, help="new tokens for the HF baseline (0: skip it)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        device, shape, dtype = torch.device("cpu"), TINY_DECODER, torch.float32
        args.prompts, args.n, args.prompt_len, args.new_tokens, args.hf_tokens = [1, 2], 2, 24, 6, 4
    else:
        device, shape, dtype = torch.device("cuda"), QWEN25_05B, torch.bfloat16
    model = random_decoder(shape, device, dtype)
    twin = transformers_twin(model) if args.hf_tokens else None  # HF's model with the same weights
    rows = []
    for p in args.prompts:
        ours = bench_engine(model, p, args.n, args.prompt_len, args.new_tokens, device)
        hf = bench_hf(twin, model, p, args.n, args.prompt_len, args.hf_tokens, device) if args.hf_tokens else None
        rows.append({"prompts": p, "n": args.n, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "omni_fast": ours, "hf_generate": hf,
                     "speedup_per_step": hf["step_ms"] / ours["step_ms"] if hf else None})
    table = [[f"{r['prompts']} x {r['n']}", r["omni_fast"]["prefill_ms"], r["omni_fast"]["step_ms"],
              r["omni_fast"]["tokens_per_s"], r["omni_fast"]["roofline_fraction"],
              (r["hf_generate"] or {}).get("step_ms", float("nan")),
              (r["hf_generate"] or {}).get("tokens_per_s", float("nan")), r["speedup_per_step"] or float("nan")]
             for r in rows]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = emit("rollout", ["prompts x n", "prefill ms", "ms/step", "tok/s", "roofline", "HF ms/step", "HF tok/s",
                              "speedup/step"], table,
                  {"device": device_name, "dtype": str(dtype), "quick": args.quick, "rows": rows}, args.out)
    return result


if __name__ == "__main__":
    main()
