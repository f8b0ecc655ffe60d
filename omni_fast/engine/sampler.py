"""Turns logits into tokens: the repetition penalty (when a row asks for one), then ops.sample (greedy /
temperature / top-k / top-p; kernels/sampling.py), each row drawing with its own seed at its own token index.

The sampling parameters live in per-row device tensors, written when a sample is admitted (its row of
block_manager.BlockTables) and gathered by row each step, so a step uploads only its row ids and token
indices."""
from __future__ import annotations

import torch

from omni_fast import ops
from omni_fast.config import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor on the generated tokens: a seen token's logit is divided by the
    penalty when positive and multiplied by it when negative. logits [B, V], seen [B, V] bool, penalty [B]."""
    p = penalty[:, None].to(logits.dtype)
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def batch_filters(params: list[SamplingParams]) -> tuple[int, bool, bool]:
    """ops.sample_filters of the rows of these requests, from their parameters on the host (no device sync)."""
    return (max(p.top_k for p in params), any(p.top_p < 1 for p in params),
            any(p.top_p < 1 and p.top_k <= 0 for p in params))


class Sampler:
    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.temperature = torch.ones(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.penalty = torch.ones(rows, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        self.seen: torch.Tensor | None = None  # (rows, V) bool, tokens each row generated (only with a penalty)

    def assign(self, rows: list[int], params: list[SamplingParams], seeds: list[int],
               tokens: list[list[int]]) -> None:
        """Admitted samples: row, its request's parameters, its seed, the tokens it already generated."""
        if not rows:
            return
        idx = torch.tensor(rows, device=self.device)
        for name, values, dtype in (("temperature", [p.temperature for p in params], torch.float32),
                                    ("top_k", [p.top_k for p in params], torch.int64),
                                    ("top_p", [p.top_p for p in params], torch.float32),
                                    ("penalty", [p.repetition_penalty for p in params], torch.float32),
                                    ("seeds", seeds, torch.int64)):
            getattr(self, name)[idx] = torch.tensor(values, dtype=dtype, device=self.device)
        if any(p.repetition_penalty != 1.0 for p in params):
            if self.seen is None:
                self.seen = torch.zeros(self.temperature.numel(), self.vocab, dtype=torch.bool, device=self.device)
            self.seen[idx] = False
            for r, ids in zip(rows, tokens):
                if ids:
                    self.seen[r, torch.tensor(ids, device=self.device)] = True

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor,
                 filters: tuple[int, bool, bool], penalty: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] of sample rows `rows` [B] drawing token index `steps` [B] -> (tokens [B], logprobs [B]).
        filters: batch_filters of the rows; penalty: whether any of them has a repetition penalty."""
        logits = logits.float()
        if penalty:
            logits = apply_repetition_penalty(logits, self.seen[rows], self.penalty[rows])
        tokens, logprobs = ops.sample(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows],
                                      self.seeds[rows], steps, filters)
        if penalty:
            self.seen[rows, tokens] = True
        return tokens, logprobs
