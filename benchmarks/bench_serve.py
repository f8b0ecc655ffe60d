"""Serving throughput and latency of `omni-fast serve` (in the manner of vLLM's benchmark_serving): Poisson arrivals
at several rates, clips drawn from a pool with repeats, against the same server admitting one request at a time
with its caches off and against HF generate per request, all in the same run.

The server is omni_fast.serve's own (uvicorn, the FastAPI app, the media pool, the engine loop) in a process of its
own, started as `omni-fast serve` starts it but on a model built in that process (so the GPU run can use random
weights of the real shape); this process is the client: requests over HTTP on 127.0.0.1, streamed
(`stream: true`), each clip named by its path (--allowed_local_media_path; no upload cost on either side),
greedy, `ignore_eos` so every request generates exactly --max_tokens tokens. Servers:

  ours           the defaults: continuous batching, the prefix cache, the encoder cache in memory and a
                 tower-feature store (--tower_cache_dir, empty at start) in front of the towers, so a repeated clip
                 is neither decoded nor encoded and a repeated clip and question is not prefilled
  one at a time  --max_num_seqs 1 --no_enable_prefix_caching --encoder_cache_bytes 0, no store: one request in the
                 engine at a time, every clip decoded, encoded and prefilled (media decoding still overlaps in the
                 worker pool)
  HF generate    per request, in arrival order: PyAV decoding, towers and projectors (OmniModel.prompt_embeds), then
                 transformers' generate on the same weights (the checkpoint's repetition penalty, which HF
                 applies to the generated tokens only when given embeddings); each request's service time is
                 measured alone, on a machine the servers have left, then queued at each rate (a model of a
                 one-request-at-a-time server without HTTP or overlap of decoding, stated as such)

Each run draws --requests requests over a pool of --pool clips and two questions (the same draw for every run);
ours gets a fresh pool for every run (new bytes: cold caches), the cache-less baseline reuses one. `inf` sends
every request at once (maximum throughput); the other rates are multiples (--rates) of the one-at-a-time
server's capacity, its requests/s at `inf` (x1: the rate where it saturates). Reported per
run: requests/s (requests / (last finish - first arrival)), output tokens/s, time to first token (arrival ->
first streamed text) and time per output token ((last - first) / (tokens - 1)), p50 / p99, and the cache hits
the server's /metrics counted ("clip hits": clips found in the tower-feature store, neither decoded nor
encoded). The targets (issue 20): at x1, ours keeps p99 TTFT under 2x its unloaded p99 (the same stream sent one
after another), and at `inf` it serves >= 3x the requests/s of one-at-a-time. Requests for a clip another
request is decoding share that decoding (omni_fast.serve.inputs.Decoding).

    python benchmarks/bench_serve.py --device cpu      # the tiny checkpoint in float32, 1 torch thread per process
    python benchmarks/bench_serve.py                   # GPU: the real R1-Omni-0.5B shape, random float16 weights

Last stdout line: one JSON object. `--quick`: the tiny checkpoint, 4 requests, 4 tokens (a smoke test). On a
shared machine keep --threads 1: two torch threads per process on two busy cores made the tiny model's decode
steps 10-20x slower here (OpenMP threads waiting for each other).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from common import emit, finish_args
from omni_fast.testing import make_clip, make_tiny_checkpoint

QUESTIONS = ("As an emotional recognition expert; throughout the video, which emotion conveyed by the characters "
             "is the most obvious to you? Output the thinking process in <think> </think> and final emotion in "
             "<answer> </answer> tags.", "Which emotion does the person show? Explain, then answer.")
MODEL = "bench"
COLUMNS = ["run", "rate/s", "req/s", "tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms",
           "prefix hits", "clip hits", "errors"]


# --- the server, in a process of its own ----------------------------------------------------------------------------
def _serve_main(spec: dict, conn) -> None:
    """In the server process: the model (the tiny checkpoint, or the real shape with random weights), the server's
    state around it, a socket on a free port of 127.0.0.1 (sent back), then uvicorn until SIGTERM drains it."""
    torch.set_num_threads(spec["threads"])
    from omni_fast.api import DEFAULT_ENCODER_CACHE_BYTES, OmniModel, inference_dtype
    from omni_fast.config import EngineConfig
    from omni_fast.model.checkpoint import load_checkpoint
    from omni_fast.serve.config import ServeConfig
    from omni_fast.serve.server import bind, make_state, server_for
    from omni_fast.testing import random_r1omni

    device = torch.device(spec["device"])
    dtype = inference_dtype(device)
    loaded = (random_r1omni(spec["ckpt"], device, dtype) if spec["real_shape"]
              else load_checkpoint(spec["ckpt"], device=device, dtype=dtype))
    engine = EngineConfig(max_num_seqs=spec["max_num_seqs"], kv_cache_memory=spec["kv_cache_memory"])
    model = OmniModel(loaded, engine, tower_cache_dir=spec["store"],
                      encoder_cache_bytes=DEFAULT_ENCODER_CACHE_BYTES if spec["prefix"] else 0)
    config = ServeConfig(port=0, served_model_name=MODEL, allowed_local_media_path=spec["media"],
                         max_num_seqs=spec["max_num_seqs"], max_queue=100_000, request_timeout=3600.0,
                         enable_prefix_caching=spec["prefix"])
    sock = bind("127.0.0.1", 0)
    server = server_for(make_state(model, config), announce=False)
    conn.send(sock.getsockname()[1])
    server.run(sockets=[sock])


class Server:
    def __init__(self, label: str, spec: dict):
        ctx = multiprocessing.get_context("spawn")
        self.label = label
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_main, args=(spec, child), daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 900
        while not parent.poll(0.5):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the {label} server did not start (exit code {self.proc.exitcode})")
        self.url = f"http://127.0.0.1:{parent.recv()}"

    def metrics(self) -> dict[str, float]:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=60).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM: the server's drain
            self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()


# --- the client -----------------------------------------------------------------------------------------------------
async def _one(client, url: str, clip: Path, question: str, max_tokens: int, delay: float) -> dict:
    await asyncio.sleep(delay)
    body = {"model": MODEL, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(clip)}},
                                                      {"type": "text", "text": question}]}]}
    start = time.perf_counter()
    first, tokens, error = None, 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
        else:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"start": start, "end": end, "ttft": (first or end) - start, "e2e": end - start, "tokens": tokens,
            "error": error}


async def _drive(url: str, requests: list[tuple[float, Path, str]], max_tokens: int, closed: bool) -> list[dict]:
    """Send the requests at their arrival times (closed: each one after the previous finished, the arrival times
    ignored)."""
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits, trust_env=False) as client:
        if closed:
            return [await _one(client, url, clip, q, max_tokens, 0.0) for _, clip, q in requests]
        return await asyncio.gather(*(_one(client, url, clip, q, max_tokens, t) for t, clip, q in requests))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": statistics.median(values), "p99": qs[98]}


def summarize(records: list[dict], first_arrival: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    wall = max(r["end"] for r in ok) - first_arrival if ok else float("nan")
    tokens = sum(r["tokens"] for r in ok)
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {"requests": len(records), "errors": len(records) - len(ok), "requests_per_s": len(ok) / wall,
            "output_tokens_per_s": tokens / wall, "ttft_s": percentiles([r["ttft"] for r in ok]),
            "tpot_ms": {k: v * 1e3 for k, v in percentiles(tpot).items()},
            "e2e_s": percentiles([r["e2e"] for r in ok]),
            "first_error": next((r["error"] for r in records if r["error"] is not None), None)}


def cache_hits(before: dict, after: dict) -> dict:
    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    q, e = delta("omni_fast:prefix_cache_queries_total"), delta("omni_fast:encoder_cache_queries_total")
    return {"prefix_hit_ratio": delta("omni_fast:prefix_cache_hits_total") / q if q else 0.0,
            "clip_hit_ratio": delta("omni_fast:encoder_cache_hits_total") / e if e else 0.0}


def run(server: Server, requests: list[tuple[float, Path, str]], max_tokens: int, closed: bool = False) -> dict:
    before = server.metrics()
    t0 = time.perf_counter()
    records = asyncio.run(_drive(server.url, requests, max_tokens, closed))
    return {**summarize(records, t0), **cache_hits(before, server.metrics())}


# --- the workload ---------------------------------------------------------------------------------------------------
def draws(count: int, pool: int, seed: int) -> list[tuple[int, int]]:
    """(clip index, question index) per request: uniform over the pool and the questions, so clips repeat."""
    rng = random.Random(seed)
    return [(rng.randrange(pool), rng.randrange(len(QUESTIONS))) for _ in range(count)]


def arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Poisson arrival times (s) at `rate` requests/s; all at 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * count
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.expovariate(rate)
    return out


class Pools:
    """Clip pools under one folder (the servers' --allowed_local_media_path): pool k is --pool new clips."""

    def __init__(self, root: Path, args):
        self.root, self.args, self.made = root, args, 0

    def new(self, count: int | None = None) -> list[Path]:
        a, folder = self.args, self.root / f"pool{self.made}"
        clips = [make_clip(folder / f"clip{i}.mp4", seconds=a.clip_seconds, size=a.clip_size,
                           seed=1000 * self.made + i) for i in range(count or a.pool)]
        self.made += 1
        return clips


def stream_of(pool: list[Path], picks: list[tuple[int, int]], times: list[float]) -> list[tuple[float, Path, str]]:
    return [(t, pool[c], QUESTIONS[q]) for t, (c, q) in zip(times, picks)]


# --- HF generate per request ----------------------------------------------------------------------------------------
def hf_service(args, ckpt: Path, device: torch.device, requests: list[tuple[float, Path, str]]) -> list[dict]:
    """Each request alone through the reference path: its seconds to the first token and in all."""
    from transformers import LogitsProcessorList

    from omni_fast.api import OmniModel, inference_dtype
    from omni_fast.config import EngineConfig
    from omni_fast.media.pyav import load_clip
    from omni_fast.model.checkpoint import load_checkpoint
    from omni_fast.testing import random_r1omni, transformers_twin

    warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")  # as HF applies it: said above
    dtype = inference_dtype(device)
    loaded = random_r1omni(ckpt, device, dtype) if args.real_shape else load_checkpoint(ckpt, device=device,
                                                                                         dtype=dtype)
    model = OmniModel(loaded, EngineConfig(kv_cache_memory=1 << 20, cuda_graphs=False))  # its engine is not used
    hf = transformers_twin(loaded.model)
    gen = loaded.generation
    out = []

    def first_token(stamps):
        def processor(input_ids, scores):
            stamps.append(time.perf_counter())
            return scores
        return LogitsProcessorList([processor])

    for i, (_, path, question) in enumerate([requests[0]] + requests):  # the first one again, as a warm-up
        t0 = time.perf_counter()
        clip = load_clip(path, aspect="stretch", num_frames=model.config.num_frames,
                         n_mels=loaded.model.towers.audio.num_mel_bins)
        embeds = model.prompt_embeds(clip.frames[None], clip.mel[None], [question])[0]
        stamps: list[float] = []
        with torch.inference_mode():
            hf.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long,
                                                                             device=device),
                        do_sample=False, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                        repetition_penalty=gen.repetition_penalty, pad_token_id=gen.eos_token_ids[0],
                        logits_processor=first_token(stamps))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            out.append({"first_s": stamps[0] - t0, "total_s": time.perf_counter() - t0})
    return out


def hf_queue(service: list[dict], times: list[float], max_tokens: int) -> dict:
    """The measured service times queued first come first served at the given arrival times."""
    free, records = 0.0, []
    for t, s in zip(times, service):
        start = max(t, free)
        free = start + s["total_s"]
        records.append({"start": t, "end": free, "ttft": start - t + s["first_s"], "e2e": free - t,
                        "tokens": max_tokens, "error": None})
    return {**summarize(records, 0.0), "prefix_hit_ratio": 0.0, "clip_hit_ratio": 0.0}


# --- the runs -------------------------------------------------------------------------------------------------------
def table_row(label: str, rate: float, r: dict) -> list:
    return [label, rate, r["requests_per_s"], r["output_tokens_per_s"], r["ttft_s"]["p50"], r["ttft_s"]["p99"],
            r["tpot_ms"]["p50"], r["tpot_ms"]["p99"], r["prefix_hit_ratio"], r["clip_hit_ratio"], r["errors"]]


def spec_of(args, ckpt: Path, media: Path, ours: bool, store: Path | None) -> dict:
    return {"ckpt": str(ckpt), "real_shape": args.real_shape, "device": args.device, "threads": args.threads,
            "max_num_seqs": args.max_num_seqs if ours else 1, "kv_cache_memory": args.kv_cache_memory,
            "prefix": ours, "store": None if store is None else str(store), "media": str(media)}


def warm(server: Server, pools: Pools, args) -> None:
    """Two requests on clips of their own: first-call costs (thread pools, kernels, the towers' fingerprint)."""
    clips = pools.new(2)
    run(server, stream_of(clips, [(0, 0), (1, 1)], [0.0, 0.0]), args.max_tokens, closed=True)


def measure(label: str, server: Server, pools: Pools, args, picks, factors, capacity: float | None,
            fresh: bool) -> list[dict]:
    """The unloaded stream (one after another), then one open-loop run per rate (capacity x factor); without a
    capacity, the all-at-once run comes first and its requests/s is the capacity (the rate where the server
    saturates)."""
    pool = pools.new()
    out = [{"server": label, "rate_factor": 0.0, "rate": 0.0, "unloaded": True,
            **run(server, stream_of(pool, picks, [0.0] * len(picks)), args.max_tokens, closed=True)}]
    order = sorted(factors, key=lambda f: (not math.isinf(f), f)) if capacity is None else factors
    for k, factor in enumerate(order):
        rate = math.inf if math.isinf(factor) else capacity * factor
        pool = pools.new() if fresh else pool
        times = arrivals(len(picks), rate, args.seed + 1 + factors.index(factor))
        print(f"  {label}: {rate:.3g} requests/s ...", file=sys.stderr, flush=True)
        out.append({"server": label, "rate_factor": factor, "rate": rate, "unloaded": False,
                    **run(server, stream_of(pool, picks, times), args.max_tokens)})
        capacity = capacity or out[-1]["requests_per_s"]
    return out


def targets(rows: list[dict]) -> dict:
    def find(server, factor):
        return next(r for r in rows if r["server"] == server and r["rate_factor"] == factor)

    unloaded, at_sat = find("ours", 0.0), find("ours", 1.0)
    ratio_ttft = at_sat["ttft_s"]["p99"] / unloaded["ttft_s"]["p99"]
    ratio_rps = find("ours", math.inf)["requests_per_s"] / find("one at a time", math.inf)["requests_per_s"]
    return {"saturation_rate": at_sat["rate"], "ours_unloaded_ttft_p99_s": unloaded["ttft_s"]["p99"],
            "ours_ttft_p99_at_saturation_s": at_sat["ttft_s"]["p99"], "ttft_ratio": ratio_ttft,
            "ttft_target_met": ratio_ttft < 2.0, "max_requests_per_s_ratio": ratio_rps,
            "throughput_target_met": ratio_rps >= 3.0}


def _finite(row: dict) -> dict:
    """A row for the JSON line: an infinite rate as the string "inf" (JSON has no infinity); no empty error."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()
            if k != "first_error" or v}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny checkpoint, 4 requests, 4 tokens (smoke test)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda: the real shape with random float16 weights; cpu: the tiny checkpoint in float32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads of each server process and of the HF path (--device cpu); the server's "
                         "loop thread, media workers and this client already share the cores")
    ap.add_argument("--requests", type=int, default=48, help="requests per run")
    ap.add_argument("--pool", type=int, default=8, help="distinct clips per pool (requests draw from it)")
    ap.add_argument("--max_tokens", type=int, default=128, help="tokens generated per request (EOS ignored)")
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0, math.inf],
                    help="arrival rates as multiples of the one-at-a-time server's capacity (inf: all at once); "
                         "1 and inf are always run (the targets)")
    ap.add_argument("--max_num_seqs", type=int, default=64, help="ours: sample rows the engine runs at once")
    ap.add_argument("--kv_cache_memory", type=int, default=None,
                    help="bytes of each server's KV pool (default: 256 MiB on the CPU, the engine's sizing on a GPU)")
    ap.add_argument("--clip_seconds", type=float, default=3.0)
    ap.add_argument("--clip_size", type=int, nargs=2, default=[640, 360], metavar=("W", "H"))
    ap.add_argument("--no_hf", action="store_true", help="leave out the HF generate baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = finish_args(ap.parse_args(argv))
    if args.quick:
        args.requests, args.pool, args.max_tokens, args.rates = 4, 2, 4, [1.0, math.inf]
        args.clip_seconds, args.clip_size, args.kv_cache_memory = 1.0, [160, 120], 16 << 20
    if args.kv_cache_memory is None and args.device == "cpu":
        args.kv_cache_memory = 256 << 20
    factors = sorted(set(args.rates) | {1.0, math.inf})
    args.real_shape = args.device == "cuda"
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    ckpt = make_tiny_checkpoint(work / "tiny")
    media = work / "media"
    media.mkdir()
    pools = Pools(media, args)
    picks = draws(args.requests, args.pool, args.seed)
    shape = ("R1-Omni-0.5B (random float16 weights)" if args.real_shape
             else "tiny test checkpoint (float32: 2-layer decoder, hidden 64, tiny towers)")
    print(f"bench_serve: {shape} on {args.device}; {args.requests} requests per run over {args.pool} clips "
          f"({args.clip_size[0]}x{args.clip_size[1]}, {args.clip_seconds:g} s) and {len(QUESTIONS)} questions, "
          f"{args.max_tokens} tokens each", file=sys.stderr, flush=True)
    rows = []
    baseline = Server("one at a time", spec_of(args, ckpt, media, False, None))
    try:
        warm(baseline, pools, args)
        rows += measure("one at a time", baseline, pools, args, picks, factors, None, fresh=False)
    finally:
        baseline.close()
    capacity = next(r["requests_per_s"] for r in rows if math.isinf(r["rate_factor"]))
    ours = Server("ours", spec_of(args, ckpt, media, True, work / "tower-cache"))
    try:
        warm(ours, pools, args)
        rows += measure("ours", ours, pools, args, picks, factors, capacity, fresh=True)
    finally:
        ours.close()
    if not args.no_hf:
        print("  HF generate: each request alone ...", file=sys.stderr, flush=True)
        stream = stream_of(pools.new(), picks, [0.0] * len(picks))
        service = hf_service(args, ckpt, device, stream)
        for k, factor in enumerate(factors):
            rate = capacity * factor
            rows.append({"server": "HF generate (queued)", "rate_factor": factor, "rate": rate, "unloaded": False,
                         **hf_queue(service, arrivals(len(picks), rate, args.seed + 1 + k), args.max_tokens)})
    table = [table_row(f"{r['server']} " + ("unloaded" if r["unloaded"] else f"x{r['rate_factor']:g}"), r["rate"], r)
             for r in rows]
    result = {"device": str(device), "quick": args.quick, "shape": shape, "requests": args.requests,
              "pool": args.pool, "questions": len(QUESTIONS), "max_tokens": args.max_tokens,
              "clip": {"seconds": args.clip_seconds, "size": args.clip_size}, "threads": args.threads,
              "capacity_one_at_a_time": capacity, "targets": targets(rows),
              "rows": [_finite(r) for r in rows]}
    return emit("serve", COLUMNS, table, result, args.out)


if __name__ == "__main__":
    main()
