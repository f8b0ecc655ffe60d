"""Runs the decoder for the engine: prefill of a batch of prompts into the prefix cache, and one decode step
for a batch of sample rows, replayed from CUDA graphs captured per batch-size bucket on a GPU."""
from __future__ import annotations

import torch

from omni_fast.config import EngineConfig
from omni_fast.engine.kv_cache import DecodeContext, KVCache, PrefillContext
from omni_fast.model.qwen2 import Qwen2LM


class ModelRunner:
    def __init__(self, model: Qwen2LM, config: EngineConfig):
        cfg = model.config
        weight = model.lm_head_weight
        self.model, self.config = model, config
        self.cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, weight.dtype, weight.device)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def reserve(self, prompts: int, prefix_len: int, samples: int, gen_len: int) -> None:
        self.cache.ensure(prompts, prefix_len, samples, gen_len)

    def prefill(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        """Prompt embeddings, each (T_i, H) -> next-token logits at each prompt's last position (P, V) float32.
        Keys/values land in prefix slots 0..P-1."""
        lens = [p.shape[0] for p in prompts]
        t = max(lens)
        embeds = torch.zeros(len(prompts), t, prompts[0].shape[1], dtype=self.cache.dtype, device=self.device)
        for i, p in enumerate(prompts):
            embeds[i, : lens[i]] = p
        positions = torch.arange(t, device=self.device).expand(len(prompts), t)
        hidden = self.model.model(embeds, positions, PrefillContext(self.cache))  # (P, T, H)
        last = hidden[torch.arange(len(prompts), device=self.device), torch.tensor(lens, device=self.device) - 1]
        return self.model.logits(last).float()

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """One token per row: tokens/positions (B,) -> logits (B, V) float32."""
        hidden = self.model.model(self.model.embed(tokens), positions, ctx)  # (B, H)
        return self.model.logits(hidden).float()
