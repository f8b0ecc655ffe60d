"""Rollout and serving throughput: omni_fast's continuous-batching engine against its static policy and HF
transformers' generate, same weights, same run.

Qwen2.5-0.5B shape (the R1-Omni-0.5B decoder), random bf16 weights on a GPU, 1,000-embedding prompts (a
multimodal prompt is ~90 text + 392 video + 500 audio embeddings), temperature 1.0 and top_k 50 (R1-Omni's
rollout setting), EOS ignored so every request generates exactly its max_tokens. Workloads (--workload, any of):

  fixed     prompts x n per batch, --new_tokens forced (GPU: 1x8, 8x8, 32x8, 64x8 at 512): prefill time, ms per
            decode step, tokens/s and the fraction of the memory roofline (the bytes a decode step must read - all
            weights once, the prefix KV once per group, each sample's own KV - at the copy bandwidth measured in the
            same run); HF generate (num_return_sequences=n, the reference trainer's call) runs --hf_tokens.
  mixed     --prompts x n (32 x 8), max_tokens drawn uniformly from 16-256 per prompt, all arriving at once, at
            most --max_num_seqs rows (64 on the CPU, 256 on a GPU): the continuous policy against the static one
            (a batch runs until it drains), then HF generate on the workload's first --hf_waves static waves of
            --hf_prompts prompts (one call per wave, max_new_tokens its longest request, the requested tokens
            counted).
  arrivals  a Poisson stream of --arrival_requests requests (n = --arrival_n, max_tokens 16-256) at each rate of
            --rates (requests/s): continuous against static; HF generate serving them one at a time in arrival
            order, its service times (prefill + max_tokens x decode step, both measured in this run) queued per
            rate - a model of a one-request-at-a-time server, stated as such.
  cache     one request (1,000-embedding prompt, n = 8) twice with the same cache_key: time to first token of the
            miss and of the hit, and whether their tokens are equal.

Per request: TTFT (arrival -> first token) and TPOT ((last token - first token) / (tokens - 1)), p50 / p99 over
requests; tokens/s = generated tokens / (last finish - first arrival). mixed and arrivals also report the KV
memory the pool held that the requests' tokens did not fill (pages), beside what slots of max_tokens would
have reserved, averaged over steps. In mixed and arrivals each policy's engine serves the stream on its own
clock, which advances by the measured duration of each of its steps (and jumps to the next arrival when it has
nothing to run), and the two policies' steps alternate: on a machine shared with other work, the load falls on
both alike instead of on whichever ran second.

`--device cpu` measures on the CPU at a reduced shape: 6 of the 24 layers, random fp32 weights, 2 threads:

    python benchmarks/bench_rollout.py --device cpu            # fixed: 1x1 1x8 1x16 4x8, 16 tokens
    python benchmarks/bench_rollout.py --device cpu --workload mixed cache
    python benchmarks/bench_rollout.py --device cpu --workload arrivals

Last stdout line: one JSON object. `--quick` runs a tiny model on the CPU (a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from common import copy_bandwidth, emit, finish_args
from omni_fast.config import EngineConfig, SamplingParams
from omni_fast.engine.engine import Engine
from omni_fast.engine.kv_cache import pool_bytes
from omni_fast.model.qwen2 import Qwen2LM
from omni_fast.testing import QWEN25_05B, TINY_DECODER, random_decoder, transformers_twin

CPU_LAYERS = 6  # --device cpu: the 0.5B shape with this many of its 24 layers
WORKLOADS = ("fixed", "mixed", "arrivals", "cache")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def embeddings(model: Qwen2LM, count: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = model.lm_head_weight
    return [torch.randn(length, model.config.hidden_size, generator=g).mul_(0.1).to(w.device, w.dtype)
            for _ in range(count)]


def rollout_params(n: int, max_tokens: int, seed: int | None = 0) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, top_k=50, max_tokens=max_tokens, ignore_eos=True, seed=seed)


def engine_for(model: Qwen2LM, prompts: int, n: int, prompt_len: int, max_tokens: int, **kw) -> Engine:
    """An engine whose pool holds the whole workload (prompts and every sample at max_tokens) and a margin."""
    dtype = model.lm_head_weight.dtype
    memory = pool_bytes(model.config, dtype, prompts, prompt_len) + pool_bytes(
        model.config, dtype, prompts * n, max_tokens + 16)
    return Engine(model, EngineConfig(kv_cache_memory=memory + (64 << 20), **kw))


# --- fixed: one batch, forced lengths --------------------------------------------------------------------------
def decode_bytes(model: Qwen2LM, prompts: int, n: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes one decode step must read on average: every weight once, each prefix once per group, each sample's
    own keys/values (half the completion on average)."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token_kv = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * model.lm_head_weight.element_size()
    return weights + per_token_kv * (prompts * prompt_len + prompts * n * new_tokens / 2)


class StepClock:
    """Stamps each decode step as it starts (for HF, as a logits processor, when a step's logits are ready): the
    first stamp ends the prefill, the gaps between stamps are decode steps (the engine reads each step's tokens
    on the host, so its stamps are synchronous)."""

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


def bench_fixed(model, prompts: int, n: int, prompt_len: int, new_tokens: int, device, bandwidth: float) -> dict:
    """One timed generate call (the batch prefilled in one step, as one static batch): its prefill ends at the
    first decode step, which is stamped (as HF's)."""
    engine = engine_for(model, prompts, n, prompt_len, new_tokens, max_num_seqs=max(prompts * n, 8),
                        max_num_batched_tokens=prompts * prompt_len)
    embeds = embeddings(model, prompts, prompt_len, 0)
    with torch.inference_mode():
        engine.generate(embeds, rollout_params(n, 8, None))  # warm-up, graph capture
        clock = StepClock(device)
        decode = engine.runner.decode
        engine.runner.decode = lambda inputs: (clock(None, None), decode(inputs))[1]
        sync(device)
        t0 = time.perf_counter()
        out = engine.generate(embeds, rollout_params(n, new_tokens))
        sync(device)
        total_s = time.perf_counter() - t0
    produced = sum(len(c.token_ids) for group in out for c in group)
    assert produced == prompts * n * new_tokens, produced
    step_ms = clock.step_ms(t0 + total_s)
    roofline_ms = decode_bytes(model, prompts, n, prompt_len, new_tokens) / bandwidth * 1e3
    return {"prefill_ms": (clock.stamps[0] - t0) * 1e3, "step_ms": step_ms, "tokens_per_s": produced / total_s,
            "roofline_step_ms": roofline_ms, "roofline_fraction": roofline_ms / step_ms}


def hf_generate(hf, model, prompts: int, n: int, prompt_len: int, new_tokens: int, device, seed: int = 0,
                warm: bool = True) -> dict:
    """One HF generate call, every decode step stamped: prefill ms, ms per decode step, total seconds."""
    from transformers import LogitsProcessorList

    g = torch.Generator(device="cpu").manual_seed(seed)
    embeds = torch.randn(prompts, prompt_len, model.config.hidden_size, generator=g).mul_(0.1).to(
        device, model.lm_head_weight.dtype)
    kw = dict(inputs_embeds=embeds, attention_mask=torch.ones(prompts, prompt_len, dtype=torch.long, device=device),
              do_sample=True, temperature=1.0, top_k=50, num_return_sequences=n, pad_token_id=0)
    with torch.inference_mode():
        if warm:
            hf.generate(**kw, max_new_tokens=2, min_new_tokens=2)
        clock = StepClock(device)
        sync(device)
        t0 = time.perf_counter()
        hf.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    logits_processor=LogitsProcessorList([clock]))
        sync(device)
        total_s = time.perf_counter() - t0
    return {"prefill_ms": (clock.stamps[0] - t0) * 1e3, "step_ms": clock.step_ms(t0 + total_s), "total_s": total_s,
            "first_token_s": clock.stamps[0] - t0}


COLUMNS = ["run", "tok/s", "prefill ms", "ms/step", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms",
           "KV waste", "roofline", "preempted"]


def row(label: str, **figures) -> list:
    """A table row: the figures named by COLUMNS' keys (tok_s, prefill_ms, ...), NaN where a run has none."""
    keys = [c.replace("/", "_").replace(" ", "_") for c in COLUMNS[1:]]
    return [label] + [figures.get(k, float("nan")) for k in keys]


def stream_row(label: str, r: dict) -> list:
    return row(label, tok_s=r["tokens_per_s"], TTFT_p50_s=r["ttft_s"]["p50"], TTFT_p99_s=r["ttft_s"]["p99"],
               TPOT_p50_ms=r["tpot_ms"]["p50"], TPOT_p99_ms=r["tpot_ms"]["p99"], KV_waste=r.get("kv_waste_pages"),
               preempted=r.get("preemptions", float("nan")))


def run_fixed(args, model, twin, device) -> list[list]:
    bandwidth = copy_bandwidth(device.type)
    rows, table = [], []
    for p, n in args.configs:
        ours = bench_fixed(model, p, n, args.prompt_len, args.new_tokens, device, bandwidth)
        hf = None
        if args.hf_tokens:
            hf = hf_generate(twin, model, p, n, args.prompt_len, args.hf_tokens, device)
            hf["tokens_per_s"] = p * n * args.hf_tokens / hf["total_s"]
        rows.append({"prompts": p, "n": n, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "omni_fast": ours, "hf_generate": hf,
                     "speedup_per_step": hf["step_ms"] / ours["step_ms"] if hf else None})
        table.append(row(f"fixed {p} x {n}", tok_s=ours["tokens_per_s"], prefill_ms=ours["prefill_ms"],
                         ms_step=ours["step_ms"], roofline=ours["roofline_fraction"]))
        if hf:
            table.append(row(f"fixed {p} x {n} HF", tok_s=hf["tokens_per_s"], prefill_ms=hf["prefill_ms"],
                             ms_step=hf["step_ms"]))
    args.result["fixed"] = {"copy_GBps": bandwidth / 1e9, "hf_new_tokens": args.hf_tokens, "rows": rows}
    return table


# --- request streams: mixed lengths, arrivals ------------------------------------------------------------------
def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": statistics.median(values), "p99": qs[98]}


class Stream:
    """One engine serving (arrival s, prompt, params) requests on its own clock: a request is added once the
    clock has reached its arrival, each step() advances the clock by its measured duration, an idle engine's
    clock jumps to the next arrival. Records each request's first and last token times and the pool's use
    (pages held vs positions filled, and what slots of max_tokens would reserve) per step."""

    def __init__(self, name: str, engine: Engine, requests: list[tuple[float, torch.Tensor, SamplingParams]]):
        self.name, self.engine, self.requests = name, engine, requests
        self.order = sorted(range(len(requests)), key=lambda i: requests[i][0])
        self.first, self.last, self.tokens = {}, {}, {}
        self.held = self.filled = self.slots = 0.0
        self.clock, self.steps, self.next_i = 0.0, 0, 0

    @property
    def done(self) -> bool:
        return self.next_i == len(self.order) and not self.engine.has_unfinished_requests()

    def advance(self) -> None:
        """Add the requests that have arrived, then one step (or, with nothing to run, jump to the next arrival)."""
        engine, requests = self.engine, self.requests
        while self.next_i < len(self.order) and requests[self.order[self.next_i]][0] <= self.clock:
            i = self.order[self.next_i]
            engine.add_request(str(i), requests[i][1], requests[i][2])
            self.next_i += 1
        if not engine.has_unfinished_requests():
            self.clock = requests[self.order[self.next_i]][0]
            return
        with torch.inference_mode():
            t0 = time.perf_counter()
            outs = engine.step()
            self.clock += time.perf_counter() - t0
        self.steps += 1
        if self.steps % 100 == 0:
            print(f"  {self.name}: step {self.steps}, clock {self.clock:.0f} s: {len(self.tokens)} of {len(requests)} "
                  "requests done", file=sys.stderr)
        self._account(outs)

    def _account(self, outs) -> None:
        admitted, bs = self.engine.scheduler.running, self.engine.config.block_size
        self.held += (self.engine.allocator.num_blocks - self.engine.allocator.num_free) * bs
        self.filled += sum(r.prompt_done + sum(s.cached for s in r.live) for r in admitted)
        self.slots += sum(r.prompt_len + len(r.live) * r.params.max_tokens for r in admitted)
        for o in outs:
            i = int(o.request_id)
            if any(o.new_token_ids):
                self.first.setdefault(i, self.clock)
                self.last[i] = self.clock
            if o.finished:
                self.tokens[i] = sum(len(c.token_ids) for c in o.completions)

    def result(self) -> dict:
        """tokens/s, TTFT and TPOT percentiles, the pool's use averaged over steps."""
        requests, first, last, tokens = self.requests, self.first, self.last, self.tokens
        ttft = [first[i] - requests[i][0] for i in first]
        per_sample = {i: tokens[i] // requests[i][2].n for i in tokens}
        tpot = [(last[i] - first[i]) / (per_sample[i] - 1) for i in tokens if per_sample[i] > 1]
        wall = max(last.values()) - min(r[0] for r in requests)
        return {"requests": len(requests), "tokens": sum(tokens.values()), "wall_s": wall,
                "tokens_per_s": sum(tokens.values()) / wall, "ttft_s": percentiles(ttft),
                "tpot_ms": {k: v * 1e3 for k, v in percentiles(tpot).items()}, "steps": self.steps,
                "preemptions": self.engine.scheduler.preemptions,
                "kv_waste_pages": 1 - self.filled / self.held if self.held else 0.0,
                "kv_waste_slots": 1 - self.filled / self.slots if self.slots else 0.0}


def mixed_lengths(count: int, seed: int, low: int = 16, high: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(count)]


def run_policies(args, model, requests, n: int, label: str) -> tuple[list[list], dict]:
    """The continuous and the static policy serving the same requests, their steps alternating (Stream)."""
    streams = []
    for policy in ("continuous", "static"):
        engine = engine_for(model, len(requests), n, args.prompt_len, 256, max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens, admission=policy)
        engine.generate(embeddings(model, 1, args.prompt_len, 99), rollout_params(n, 4))  # warm-up
        streams.append(Stream(f"{label} {policy}", engine, requests))
    while not all(s.done for s in streams):
        for s in streams:
            if not s.done:
                s.advance()
    result = {policy: s.result() for policy, s in zip(("continuous", "static"), streams)}
    table = [stream_row(s.name, result[policy]) for policy, s in zip(("continuous", "static"), streams)]
    result["speedup"] = result["continuous"]["tokens_per_s"] / result["static"]["tokens_per_s"]
    return table, result


def hf_waves(args, model, twin, device, lengths: list[int], n: int) -> dict:
    """HF generate on the mixed workload's first static waves (--hf_prompts prompts each, one call per wave,
    max_new_tokens its longest request): requested tokens / seconds, TTFT of those requests, ms per step."""
    t, tokens, ttft, steps = 0.0, 0, [], []
    for w in range(args.hf_waves):
        wave = lengths[w * args.hf_prompts:(w + 1) * args.hf_prompts]
        if not wave:
            break
        r = hf_generate(twin, model, len(wave), n, args.prompt_len, max(wave), device, seed=w, warm=w == 0)
        ttft += [t + r["first_token_s"]] * len(wave)
        t += r["total_s"]
        tokens += n * sum(wave)
        steps.append(r["step_ms"])
    return {"requests": len(ttft), "tokens": tokens, "wall_s": t, "tokens_per_s": tokens / t,
            "ttft_s": percentiles(ttft), "tpot_ms": percentiles(steps)}


def run_mixed(args, model, twin, device) -> list[list]:
    lengths = mixed_lengths(args.prompts, args.seed, args.min_tokens, args.max_tokens)
    prompts = embeddings(model, args.prompts, args.prompt_len, args.seed)
    requests = [(0.0, p, rollout_params(args.n, m, seed=i)) for i, (p, m) in enumerate(zip(prompts, lengths))]
    table, result = run_policies(args, model, requests, args.n, f"mixed {args.prompts} x {args.n}")
    if args.hf_waves and twin is not None:
        hf = result["hf_generate"] = hf_waves(args, model, twin, device, lengths, args.n)
        table.append(stream_row(f"mixed HF, first {hf['requests']} prompts", hf))
    args.result["mixed"] = {"prompts": args.prompts, "n": args.n, "lengths": lengths,
                            "max_num_seqs": args.max_num_seqs, **result}
    return table


def hf_queue(arrivals: list[float], lengths: list[int], n: int, prefill_s: float, step_s: float) -> dict:
    """A server answering one request at a time with HF generate, first come first served: each request takes
    the measured prefill, then max_tokens - 1 measured decode steps."""
    free, ttft, end = 0.0, [], 0.0
    for a, m in sorted(zip(arrivals, lengths)):
        first = max(a, free) + prefill_s
        ttft.append(first - a)
        free = end = first + (m - 1) * step_s
    tokens = n * sum(lengths)
    return {"tokens": tokens, "wall_s": end - min(arrivals), "tokens_per_s": tokens / (end - min(arrivals)),
            "ttft_s": percentiles(ttft), "tpot_ms": percentiles([step_s * 1e3])}


def run_arrivals(args, model, twin, device) -> list[list]:
    lengths = mixed_lengths(args.arrival_requests, args.seed + 1, args.min_tokens, args.max_tokens)
    prompts = embeddings(model, args.arrival_requests, args.prompt_len, args.seed + 1)
    hf = hf_generate(twin, model, 1, args.arrival_n, args.prompt_len, 8, device) if twin is not None else None
    table, out = [], []
    for rate in args.rates:
        rng = random.Random(args.seed + int(rate * 1000))
        arrivals, t = [], 0.0
        for _ in lengths:
            arrivals.append(t)
            t += rng.expovariate(rate)
        requests = [(a, p, rollout_params(args.arrival_n, m, seed=i))
                    for i, (a, p, m) in enumerate(zip(arrivals, prompts, lengths))]
        rows, result = run_policies(args, model, requests, args.arrival_n, f"arrivals {rate:g}/s")
        table += rows
        if hf is not None:
            q = result["hf_generate"] = hf_queue(arrivals, lengths, args.arrival_n, hf["prefill_ms"] / 1e3,
                                                 hf["step_ms"] / 1e3)
            table.append(stream_row(f"arrivals {rate:g}/s HF (queued)", q))
        out.append({"rate": rate, **result})
    args.result["arrivals"] = {"requests": args.arrival_requests, "n": args.arrival_n, "lengths": lengths,
                               "hf_service": hf, "rates": out}
    return table


def run_cache(args, model, device) -> list[list]:
    """The same request twice under one cache_key: the miss prefills the prompt, the hit reads its KV."""
    prompt = embeddings(model, 1, args.prompt_len, args.seed + 2)[0]
    params = rollout_params(args.n, args.cache_tokens, seed=5)
    engine = engine_for(model, 2, args.n, args.prompt_len, args.cache_tokens,
                        max_num_batched_tokens=args.max_num_batched_tokens)
    engine.generate(embeddings(model, 1, args.prompt_len, 99), rollout_params(args.n, 4))  # warm-up
    runs = []
    with torch.inference_mode():
        for name in ("miss", "hit"):
            t0 = time.perf_counter()
            engine.add_request(name, prompt, params, cache_key="clip+question")
            ttft = None
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if ttft is None and any(o.new_token_ids):
                        ttft = time.perf_counter() - t0
                    if o.finished:
                        runs.append((ttft, [c.token_ids for c in o.completions], time.perf_counter() - t0))
    (miss_ttft, miss_tokens, miss_s), (hit_ttft, hit_tokens, hit_s) = runs
    args.result["cache"] = {"prompt_len": args.prompt_len, "n": args.n, "max_tokens": args.cache_tokens,
                            "miss_ttft_s": miss_ttft, "hit_ttft_s": hit_ttft, "ttft_ratio": miss_ttft / hit_ttft,
                            "same_tokens": miss_tokens == hit_tokens, "miss_total_s": miss_s, "hit_total_s": hit_s}
    return [row(f"cache miss 1 x {args.n}", TTFT_p50_s=miss_ttft), row(f"cache hit 1 x {args.n}", TTFT_p50_s=hit_ttft)]


def parse_configs(configs: list[str]) -> list[tuple[int, int]]:
    """["1x8", "4x8"] -> [(1, 8), (4, 8)] (prompts, samples per prompt)."""
    return [tuple(int(v) for v in c.lower().split("x")) for c in configs]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU, every workload tiny (smoke test)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help=f"cpu: the 0.5B shape with {CPU_LAYERS} layers, fp32")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for --device cpu")
    ap.add_argument("--workload", nargs="+", choices=WORKLOADS, default=None,
                    help="default: fixed (all four with --quick)")
    ap.add_argument("--configs", nargs="+", default=None, help="fixed: prompts x n, e.g. 1x8 8x8 (default per device)")
    ap.add_argument("--prompt_len", type=int, default=1000)
    ap.add_argument("--new_tokens", type=int, default=None, help="fixed: default 512 on a GPU, 16 on the CPU")
    ap.add_argument("--hf_tokens", type=int, default=None,
                    help="fixed: new tokens for HF (0: skip it; default 32 on a GPU, --new_tokens on the CPU)")
    ap.add_argument("--prompts", type=int, default=None, help="mixed: prompts (default 64 on a GPU, 32 on the CPU)")
    ap.add_argument("--n", type=int, default=8, help="mixed / cache: samples per prompt")
    ap.add_argument("--min_tokens", type=int, default=16, help="mixed / arrivals: shortest max_tokens")
    ap.add_argument("--max_tokens", type=int, default=256, help="mixed / arrivals: longest max_tokens")
    ap.add_argument("--max_num_seqs", type=int, default=None, help="mixed / arrivals: rows (default 256 GPU, 64 CPU)")
    ap.add_argument("--max_num_batched_tokens", type=int, default=2048, help="prefill positions per step")
    ap.add_argument("--hf_prompts", type=int, default=None, help="mixed: prompts per HF wave (default 8 GPU, 2 CPU)")
    ap.add_argument("--hf_waves", type=int, default=1, help="mixed: HF waves run (0: skip HF)")
    ap.add_argument("--rates", type=float, nargs="+", default=None,
                    help="arrivals: requests per second (default 16 64 256 on a GPU, 0.1 0.3 1 on the CPU)")
    ap.add_argument("--arrival_requests", type=int, default=None, help="arrivals: requests (default 256 GPU, 16 CPU)")
    ap.add_argument("--arrival_n", type=int, default=1, help="arrivals: samples per request")
    ap.add_argument("--cache_tokens", type=int, default=16, help="cache: max_tokens of the repeated request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = finish_args(ap.parse_args(argv))
    gpu = args.device == "cuda"
    defaults = dict(new_tokens=512 if gpu else 16, prompts=64 if gpu else 32, max_num_seqs=256 if gpu else 64,
                    hf_prompts=8 if gpu else 2, rates=[16.0, 64.0, 256.0] if gpu else [0.1, 0.3, 1.0],
                    arrival_requests=256 if gpu else 16, workload=list(WORKLOADS) if args.quick else ["fixed"])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    default_configs = ["1x8", "8x8", "32x8", "64x8"] if gpu else ["1x1", "1x8", "1x16", "4x8"]
    args.configs = parse_configs(args.configs or default_configs)
    if args.hf_tokens is None:
        args.hf_tokens = 32 if gpu else args.new_tokens
    if args.quick:
        args.configs, args.prompt_len, args.new_tokens, args.hf_tokens = [(1, 2), (2, 2)], 24, 6, 4
        args.prompts, args.n, args.min_tokens, args.max_tokens, args.max_num_seqs = 4, 2, 3, 9, 4
        args.hf_prompts, args.rates, args.arrival_requests, args.cache_tokens = 2, [50.0], 4, 4
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        shape, dtype = TINY_DECODER, torch.float32
    elif device.type == "cpu":
        shape, dtype = dict(QWEN25_05B, num_hidden_layers=CPU_LAYERS), torch.float32
    else:
        shape, dtype = QWEN25_05B, torch.bfloat16
    model = random_decoder(shape, device, dtype)
    needs_hf = ("fixed" in args.workload and args.hf_tokens) or ("mixed" in args.workload and args.hf_waves) \
        or "arrivals" in args.workload
    twin = transformers_twin(model) if needs_hf else None  # HF's model with the same weights
    args.result = {}
    table = []
    for workload in args.workload:
        if workload == "cache":
            table += run_cache(args, model, device)
        else:
            table += {"fixed": run_fixed, "mixed": run_mixed, "arrivals": run_arrivals}[workload](args, model, twin,
                                                                                               device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return emit("rollout", COLUMNS, table, {"device": device_name, "dtype": str(dtype), "quick": args.quick,
                                          "shape": shape, "workloads": args.workload, **args.result,
                                          "rows": args.result.get("fixed", {}).get("rows") or table}, args.out)


if __name__ == "__main__":
    main()
