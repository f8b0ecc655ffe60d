"""Runs the decoder for the engine: prefill of a batch of prompts into the prefix cache, and decode steps for a
batch of sample rows, replayed from CUDA graphs captured per batch-size bucket on a GPU.

A graph is captured once per bucket (lazily, at the first step that needs it) against static input buffers
and the KV slabs; a step copies its rows into the buffers, pads the rest with rows of the pad prompt / pad
sample (kv_cache.py), replays, and reads the first B rows of the logits. Growing the cache drops the graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_fast.config import EngineConfig
from omni_fast.engine.kv_cache import DecodeContext, KVCache, PrefillContext
from omni_fast.model.qwen2 import Qwen2LM


@dataclass(slots=True)
class DecodeInputs:
    tokens: torch.Tensor  # (B,) ids fed this step
    positions: torch.Tensor  # (B,) their positions in the sequence (prefix length + generated so far)
    slots: torch.Tensor  # (B,) gen-cache rows
    groups: torch.Tensor  # (B,) prompt of each row, non-decreasing
    write_pos: torch.Tensor  # (B,) index of this token among the row's generated tokens

    @classmethod
    def empty(cls, size: int, cache: KVCache) -> DecodeInputs:
        def full(value):
            return torch.full((size,), value, dtype=torch.int64, device=cache.device)
        return cls(full(0), full(0), full(cache.pad_slot), full(cache.pad_group), full(0))

    def fill(self, step: DecodeInputs, cache: KVCache) -> None:
        """Copy a step's rows in front; the rest become pad rows (pad prompt, pad sample, position 0)."""
        n = step.tokens.numel()
        for name, pad in (("tokens", 0), ("positions", 0), ("slots", cache.pad_slot), ("groups", cache.pad_group),
                          ("write_pos", 0)):
            buf = getattr(self, name)
            buf[:n].copy_(getattr(step, name))
            buf[n:].fill_(pad)


class ModelRunner:
    def __init__(self, model: Qwen2LM, config: EngineConfig):
        cfg = model.config
        weight = model.lm_head_weight
        self.model, self.config = model, config
        self.cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, weight.dtype, weight.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, DecodeInputs, torch.Tensor]] = {}
        self.graph_pool = None

    @property
    def device(self) -> torch.device:
        return self.cache.device

    @property
    def use_graphs(self) -> bool:
        return self.config.cuda_graphs and self.device.type == "cuda"

    def reserve(self, prompts: int, prefix_len: int, samples: int, gen_len: int) -> None:
        if self.cache.ensure(prompts, prefix_len, samples, gen_len):
            self.graphs.clear()

    def prefill(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        """Prompt embeddings, each (T_i, H) -> next-token logits at each prompt's last position (P, V) float32.
        Keys/values land in prefix slots 0..P-1; the cache's prefix_lens is set for them."""
        lens = torch.tensor([p.shape[0] for p in prompts], device=self.device)
        t = int(lens.max())
        embeds = torch.zeros(len(prompts), t, prompts[0].shape[1], dtype=self.cache.dtype, device=self.device)
        for i, p in enumerate(prompts):
            embeds[i, : p.shape[0]] = p
        positions = torch.arange(t, device=self.device).expand(len(prompts), t)
        hidden = self.model.model(embeds, positions, PrefillContext(self.cache))  # (P, T, H)
        self.cache.prefix_lens.zero_()
        self.cache.prefix_lens[: len(prompts)] = lens
        last = hidden[torch.arange(len(prompts), device=self.device), lens - 1]
        return self.model.logits(last).float()

    def _forward(self, inputs: DecodeInputs) -> torch.Tensor:
        ctx = DecodeContext.build(self.cache, inputs.slots, inputs.groups, inputs.write_pos)
        hidden = self.model.model(self.model.embed(inputs.tokens), inputs.positions, ctx)  # (B, H)
        return self.model.logits(hidden).float()

    def decode(self, inputs: DecodeInputs) -> torch.Tensor:
        """One token per row -> logits (B, V) float32."""
        n = inputs.tokens.numel()
        buckets = [b for b in self.config.graph_buckets if b >= n]
        if not (self.use_graphs and buckets):
            return self._forward(inputs)
        graph, static, logits = self.graphs.get(buckets[0]) or self._capture(buckets[0])
        static.fill(inputs, self.cache)
        graph.replay()
        return logits[:n]

    def _capture(self, size: int):
        static = DecodeInputs.empty(size, self.cache)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels and warm the GEMM heuristics outside the capture
                self._forward(static)
        torch.cuda.current_stream().wait_stream(stream)
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self._forward(static)
        self.graphs[size] = (graph, static, logits)
        return self.graphs[size]
