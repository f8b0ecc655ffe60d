"""Prometheus metrics of the server (prometheus_client), served at GET /metrics.

Names follow vLLM's (`vllm:` -> `omni_fast:`), so dashboards built for one read the other:
  omni_fast:requests_total{status}               chat completion requests by HTTP status (200, 400, 429, ...)
  omni_fast:num_requests_waiting                 accepted, not yet streaming a first token (media, encode, queue)
  omni_fast:num_requests_running                 streaming tokens
  omni_fast:num_rows_running                     their sample rows (the sum of their n, less finished samples)
  omni_fast:time_to_first_token_seconds          arrival -> first token, per request
  omni_fast:time_per_output_token_seconds        (end - first token) / (tokens - 1), the longest sample's tokens
  omni_fast:e2e_request_latency_seconds          arrival -> last token
  omni_fast:prompt_tokens_total                  prompt positions (text + video + audio embeddings)
  omni_fast:generation_tokens_total              generated tokens, every sample counted
  omni_fast:num_engine_rows                      sample rows the engine holds (its decode slots in use)
  omni_fast:kv_cache_usage_perc                  fraction of the engine's KV pool held by requests (a cached
                                                 prompt no request reads counts as free: it is evicted on demand)
  omni_fast:prefix_cache_queries_total           prompt positions of requests that carried a prefix-cache key
  omni_fast:prefix_cache_hits_total              those read from the prefix cache (hit ratio: hits / queries)
  omni_fast:encoder_cache_queries_total          clips looked up in the towers' feature caches (the encoder cache,
                                                 the --tower_cache_dir store), where the model has one
  omni_fast:encoder_cache_hits_total             clips found there: neither decoded nor run through a tower
Each Metrics has its own registry, so servers (and tests) in one process do not share counts.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def engine_rows(engine) -> int:
    """Sample rows the engine holds (omni_fast.engine: its scheduler's rows)."""
    return engine.scheduler.rows


def kv_cache_usage(engine) -> float:
    """Fraction of the engine's KV blocks held by requests: the pool less its free blocks and the blocks of cached
    prompts no request reads (which the engine evicts when it needs them), as vLLM counts its usage."""
    pool = engine.allocator
    return (pool.num_blocks - pool.num_free - engine.prefix_cache.evictable_blocks) / pool.num_blocks


class Metrics:
    def __init__(self, waiting: Callable[[], float], running: Callable[[], float], rows: Callable[[], float],
                 engine=None):
        """waiting / running / rows: read at each scrape (the server's own counts); engine: the engine whose rows and
        KV pool are read at each scrape (None: those gauges are left out)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("omni_fast:requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        gauges = [("omni_fast:num_requests_waiting", "Requests waiting for their first token", waiting),
                  ("omni_fast:num_requests_running", "Requests streaming tokens", running),
                  ("omni_fast:num_rows_running", "Sample rows of the running requests", rows)]
        if engine is not None:
            gauges += [("omni_fast:num_engine_rows", "Sample rows the engine holds", lambda: engine_rows(engine)),
                       ("omni_fast:kv_cache_usage_perc", "Fraction of the KV pool held by requests",
                        lambda: kv_cache_usage(engine))]
        for name, doc, fn in gauges:
            Gauge(name, doc, registry=r).set_function(fn)
        self.ttft = Histogram("omni_fast:time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("omni_fast:time_per_output_token_seconds", "Seconds per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("omni_fast:e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("omni_fast:prompt_tokens", "Prompt positions (text + video + audio)", registry=r)
        self.generation_tokens = Counter("omni_fast:generation_tokens", "Generated tokens", registry=r)
        self.prefix_queries = Counter("omni_fast:prefix_cache_queries",
                                      "Prompt positions of requests with a prefix-cache key", registry=r)
        self.prefix_hits = Counter("omni_fast:prefix_cache_hits", "Prompt positions read from the prefix cache",
                                   registry=r)
        self.encoder_queries = Counter("omni_fast:encoder_cache_queries", "Clips looked up in the feature caches",
                                       registry=r)
        self.encoder_hits = Counter("omni_fast:encoder_cache_hits", "Clips whose tower features were cached",
                                    registry=r)

    def finished(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def completed(self, ttft: float, e2e: float, longest: int, prompt_tokens: int, generated: int) -> None:
        """A request that produced its tokens: its latencies and token counts."""
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        if longest > 1:
            self.tpot.observe((e2e - ttft) / (longest - 1))
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)

    def admitted(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A request with a prefix-cache key entered the engine's batch: its prompt, and what the cache held of it."""
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)

    def looked_up(self, found: bool) -> None:
        """A clip was looked up in the towers' feature caches; found: its features were there."""
        self.encoder_queries.inc()
        self.encoder_hits.inc(int(found))

    def render(self) -> bytes:
        return generate_latest(self.registry)
