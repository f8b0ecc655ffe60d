"""Rollout throughput: omni_fast's engine against HF transformers' generate, same weights, same run.

Qwen2.5-0.5B shape (the R1-Omni-0.5B decoder), random bf16 weights, 1,000-embedding prompts (a multimodal
prompt is ~90 text + 392 video + 500 audio embeddings), n = 8 samples per prompt, temperature 1.0 and
top_k 50 (R1-Omni's rollout setting), 512 new tokens forced (ignore EOS); 1, 8 and 32 prompts per batch.
HF generate (num_return_sequences=8, the reference trainer's call) runs fewer new tokens (--hf_tokens) to keep
the run short: its figure is ms per decode step, which does not depend on the count.

Reported per config: prefill time, ms per decode step, tokens/s (new tokens / (prefill + decode)), and the
fraction of the memory roofline: the bytes a decode step must read (all weights once + the prefix KV once per
group + each sample's own KV) at the device's copy bandwidth, measured in the same run. HF's prefill and step
times come from one generate call each (every decode step stamped), so each prompt is prefilled once per run.

`--device cpu` measures on the CPU at a reduced shape: the Qwen2.5-0.5B shape with 6 of its 24 layers, random
fp32 weights, 2 threads, 1,000-embedding prompts, top_k 50, 16 new tokens for both engines, configs
(prompts x n) 1x1, 1x8, 1x16, 4x8:

    python benchmarks/bench_rollout.py --device cpu
    python benchmarks/bench_rollout.py --device cpu --configs 1x16 --new_tokens 256

Last stdout line: one JSON object. `--quick` runs a tiny model on the CPU (a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import time

import torch

from common import copy_bandwidth, emit, finish_args
from omni_fast.config import EngineConfig, SamplingParams
from omni_fast.engine.engine import Engine
from omni_fast.model.qwen2 import Qwen2LM
from omni_fast.testing import QWEN25_05B, TINY_DECODER, random_decoder, transformers_twin

CPU_LAYERS = 6  # --device cpu: the 0.5B shape with this many of its 24 layers


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


def bench_engine(model, prompts: int, n: int, prompt_len: int, new_tokens: int, device, bandwidth: float,
                 seed: int = 0) -> dict:
    """One timed generate call: its prefill ends at the first decode step, which is stamped (as HF's)."""
    engine = Engine(model, EngineConfig(max_prompts=prompts, max_samples=prompts * n))
    hidden = model.config.hidden_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    embeds = [torch.randn(prompt_len, hidden, generator=g).mul_(0.1).to(device, model.lm_head_weight.dtype)
              for _ in range(prompts)]
    params = SamplingParams(n=n, temperature=1.0, top_k=50, max_tokens=new_tokens, ignore_eos=True, seed=seed)
    engine.runner.reserve(prompts, prompt_len, prompts * n, new_tokens)
    with torch.inference_mode():
        engine.generate(embeds, SamplingParams(n=n, temperature=1.0, top_k=50, max_tokens=8, ignore_eos=True))  # warm-up, graph capture
        clock = StepClock(device)
        decode = engine.runner.decode
        engine.runner.decode = lambda inputs: (clock(None, None), decode(inputs))[1]
        sync(device)
        t0 = time.perf_counter()
        out = engine.generate(embeds, params)
        sync(device)
        total_s = time.perf_counter() - t0
    produced = sum(len(c.token_ids) for group in out for c in group)
    assert produced == prompts * n * new_tokens, produced
    prefill_s = clock.stamps[0] - t0  # the prefill and the first token's sampling
    step_ms = clock.step_ms(t0 + total_s)
    roofline_ms = decode_bytes(model, prompts, n, prompt_len, new_tokens) / bandwidth * 1e3
    return {"prefill_ms": prefill_s * 1e3, "step_ms": step_ms, "tokens_per_s": produced / total_s,
            "roofline_step_ms": roofline_ms, "roofline_fraction": roofline_ms / step_ms}


class StepClock:
    """Stamps each decode step as it starts (for HF, as a logits processor, when a step's logits are ready): the
    first stamp ends the prefill, the gaps between stamps are decode steps. Only the first stamp syncs a GPU, so
    the engine's steps stay asynchronous (its every-`sync_every` host checks bound the drift of later stamps)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        if not self.stamps:
            sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def step_ms(self, end: float) -> float:
        """Mean ms from one stamp to the next (a forward and a sampling); from the first stamp to `end` when
        there is only one."""
        if len(self.stamps) < 2:
            return (end - self.stamps[0]) * 1e3
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1) * 1e3


def bench_hf(hf, model, prompts: int, n: int, prompt_len: int, new_tokens: int, device, seed: int = 0) -> dict:
    from transformers import LogitsProcessorList

    g = torch.Generator(device="cpu").manual_seed(seed)
    embeds = torch.randn(prompts, prompt_len, model.config.hidden_size, generator=g).mul_(0.1).to(
        device, model.lm_head_weight.dtype)
    kw = dict(inputs_embeds=embeds, attention_mask=torch.ones(prompts, prompt_len, dtype=torch.long, device=device),
              do_sample=True, temperature=1.0, top_k=50, num_return_sequences=n, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(**kw, max_new_tokens=2, min_new_tokens=2)  # warm-up
        clock = StepClock(device)
        sync(device)
        t0 = time.perf_counter()
        hf.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    logits_processor=LogitsProcessorList([clock]))
        sync(device)
        total_s = time.perf_counter() - t0
    prefill_s = clock.stamps[0] - t0
    step_ms = clock.step_ms(t0 + total_s)
    return {"prefill_ms": prefill_s * 1e3, "step_ms": step_ms, "tokens_per_s": prompts * n * new_tokens / total_s,
            "decode_tokens_per_s": prompts * n / (step_ms / 1e3), "new_tokens": new_tokens}


def parse_configs(configs: list[str]) -> list[tuple[int, int]]:
    """["1x8", "4x8"] -> [(1, 8), (4, 8)] (prompts, samples per prompt)."""
    return [tuple(int(v) for v in c.lower().split("x")) for c in configs]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU, a few tokens (smoke test)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help=f"cpu: the 0.5B shape with {CPU_LAYERS} layers, fp32, configs 1x1 1x8 1x16 4x8, 16 tokens")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for --device cpu")
    ap.add_argument("--configs", nargs="+", default=None, help="prompts x n, e.g. 1x8 8x8 (default per device)")
    ap.add_argument("--prompt_len", type=int, default=1000)
    ap.add_argument("--new_tokens", type=int, default=None, help="default: 512 on a GPU, 16 on the CPU")
    ap.add_argument("--hf_tokens", type=int, default=None,
                    help="new tokens for the HF baseline (0: skip it; default: 32 on a GPU, --new_tokens on the CPU)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = finish_args(ap.parse_args(argv))
    device = torch.device(args.device)
    if args.quick:
        shape, dtype = TINY_DECODER, torch.float32
        configs, args.prompt_len, args.new_tokens, args.hf_tokens = [(1, 2), (2, 2)], 24, 6, 4
    elif device.type == "cpu":
        shape, dtype = dict(QWEN25_05B, num_hidden_layers=CPU_LAYERS), torch.float32
        configs = parse_configs(args.configs or ["1x1", "1x8", "1x16", "4x8"])
    else:
        shape, dtype = QWEN25_05B, torch.bfloat16
        configs = parse_configs(args.configs or ["1x8", "8x8", "32x8"])
    if args.new_tokens is None:
        args.new_tokens = 512 if device.type == "cuda" else 16
    if args.hf_tokens is None:
        args.hf_tokens = 32 if device.type == "cuda" else args.new_tokens
    model = random_decoder(shape, device, dtype)
    twin = transformers_twin(model) if args.hf_tokens else None  # HF's model with the same weights
    bandwidth = copy_bandwidth(device.type)
    rows = []
    for p, n in configs:
        ours = bench_engine(model, p, n, args.prompt_len, args.new_tokens, device, bandwidth)
        hf = bench_hf(twin, model, p, n, args.prompt_len, args.hf_tokens, device) if args.hf_tokens else None
        rows.append({"prompts": p, "n": n, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "omni_fast": ours, "hf_generate": hf,
                     "speedup_per_step": hf["step_ms"] / ours["step_ms"] if hf else None})
    nan = float("nan")
    table = []
    for r in rows:
        ours, hf = r["omni_fast"], r["hf_generate"] or {}
        table.append([f"{r['prompts']} x {r['n']}", ours["prefill_ms"], hf.get("prefill_ms", nan), ours["step_ms"],
                      hf.get("step_ms", nan), ours["tokens_per_s"], hf.get("tokens_per_s", nan),
                      ours["roofline_fraction"], r["speedup_per_step"] or nan])
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = emit("rollout", ["prompts x n", "prefill ms", "HF prefill ms", "ms/step", "HF ms/step", "tok/s",
                              "HF tok/s", "roofline", "speedup/step"], table,
                  {"device": device_name, "dtype": str(dtype), "quick": args.quick, "shape": shape,
                   "copy_GBps": bandwidth / 1e9, "hf_new_tokens": args.hf_tokens, "rows": rows}, args.out)
    return result


if __name__ == "__main__":
    main()
