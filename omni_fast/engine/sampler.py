"""Turns a decode step's logits into tokens: the repetition penalty (when a row asks for one), then
ops.sample (greedy / temperature / top-k / top-p with per-row seeds; kernels/sampling.py)."""
from __future__ import annotations

import torch

from omni_fast import ops
from omni_fast.engine.sequence import SampleRows


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor on the generated tokens: a seen token's logit is divided by the
    penalty when positive and multiplied by it when negative. logits [B, V], seen [B, V] bool, penalty [B]."""
    p = penalty[:, None].to(logits.dtype)
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


class Sampler:
    def __init__(self, rows: SampleRows, vocab: int):
        self.rows = rows
        use_penalty = bool((rows.repetition_penalty != 1.0).any())
        self.filters = ops.sample_filters(rows.top_k, rows.top_p)  # once per batch: the steps then never sync
        self.seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=rows.groups.device) if use_penalty else None

    def __call__(self, logits: torch.Tensor, active: torch.Tensor, rows: SampleRows,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] for the rows `active` [B] (whose parameters are `rows`, self.rows.select(active)) at
        generation step `step` -> (tokens [B], logprobs [B])."""
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen[active], rows.repetition_penalty)
        tokens, logprobs = ops.sample(logits, rows.temperature, rows.top_k, rows.top_p, rows.seeds, step,
                                      self.filters)
        if self.seen is not None:
            self.seen[active, tokens] = True
        return tokens, logprobs
