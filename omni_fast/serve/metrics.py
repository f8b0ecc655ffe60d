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
Each Metrics has its own registry, so servers (and tests) in one process do not share counts.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, waiting: Callable[[], float], running: Callable[[], float], rows: Callable[[], float]):
        """waiting / running / rows: read at each scrape (the server's own counts)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("omni_fast:requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        for name, doc, fn in (("omni_fast:num_requests_waiting", "Requests waiting for their first token", waiting),
                              ("omni_fast:num_requests_running", "Requests streaming tokens", running),
                              ("omni_fast:num_rows_running", "Sample rows of the running requests", rows)):
            Gauge(name, doc, registry=r).set_function(fn)
        self.ttft = Histogram("omni_fast:time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("omni_fast:time_per_output_token_seconds", "Seconds per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("omni_fast:e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("omni_fast:prompt_tokens", "Prompt positions (text + video + audio)", registry=r)
        self.generation_tokens = Counter("omni_fast:generation_tokens", "Generated tokens", registry=r)

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
