"""What a generate() call asks for and returns: prompt groups, their sample rows, and the completions."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_fast.config import SamplingParams


@dataclass(slots=True)
class Completion:
    token_ids: list[int]  # generated ids, up to and including the stop token
    logprobs: torch.Tensor  # (len(token_ids),) float32, log p of each sampled token (see kernels/sampling.py)
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens reached)


def row_seed(seed: int, sample: int) -> int:
    """A 63-bit seed per sample row from the request's seed and the sample's index in its group only, so a
    request's completions do not depend on what else shares the batch."""
    x = (seed * 0x9E3779B97F4A7C15 + sample * 0x94D049BB133111EB + 0xBF58476D1CE4E5B9) % (1 << 64)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


@dataclass(slots=True)
class SampleRows:
    """The decode rows of one batch of prompt groups: row r is sample j of group groups[r]."""
    groups: torch.Tensor  # (S,) int64 prompt index of each row
    seeds: torch.Tensor  # (S,) int64
    temperature: torch.Tensor  # (S,) float32
    top_k: torch.Tensor  # (S,) int64
    top_p: torch.Tensor  # (S,) float32
    repetition_penalty: torch.Tensor  # (S,) float32
    max_tokens: torch.Tensor  # (S,) int64
    stop_ids: torch.Tensor  # (S, n_stop) int64, padded with -1
    max_len: int  # longest max_tokens

    @classmethod
    def build(cls, params: list[SamplingParams], default_stop: tuple[int, ...], device: torch.device,
              base_seeds: list[int]) -> SampleRows:
        groups, seeds, stops = [], [], []
        for g, (sp, base) in enumerate(zip(params, base_seeds)):
            stop = () if sp.ignore_eos else (sp.stop_token_ids if sp.stop_token_ids is not None else default_stop)
            for j in range(sp.n):
                groups.append(g)
                seeds.append(row_seed(base, j))
                stops.append(stop)
        per_row = [params[g] for g in groups]
        width = max(1, max(len(s) for s in stops))

        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(groups=col(groups, torch.int64), seeds=col(seeds, torch.int64),
                   temperature=col([p.temperature for p in per_row], torch.float32),
                   top_k=col([p.top_k for p in per_row], torch.int64),
                   top_p=col([p.top_p for p in per_row], torch.float32),
                   repetition_penalty=col([p.repetition_penalty for p in per_row], torch.float32),
                   max_tokens=col([p.max_tokens for p in per_row], torch.int64),
                   stop_ids=col([list(s) + [-1] * (width - len(s)) for s in stops], torch.int64),
                   max_len=max(p.max_tokens for p in params))

    def __len__(self) -> int:
        return self.groups.numel()

    def select(self, rows: torch.Tensor) -> SampleRows:
        """The same table restricted to `rows` (gathered once per change of the active set, not every step)."""
        gathered = {f: getattr(self, f)[rows] for f in ("groups", "seeds", "temperature", "top_k", "top_p",
                                                         "repetition_penalty", "max_tokens", "stop_ids")}
        return SampleRows(**gathered, max_len=self.max_len)
