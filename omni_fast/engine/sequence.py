"""What the engine holds per request (its prompt, sampling parameters and samples, their tokens and KV blocks)
and what it returns (RequestOutput, Completion)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from omni_fast.config import SamplingParams
from omni_fast.engine.block_manager import CachedPrefix


@dataclass(slots=True)
class Completion:
    token_ids: list[int]  # generated ids, up to and including the stop token
    logprobs: torch.Tensor  # (len(token_ids),) float32, log p of each sampled token (see kernels/sampling.py)
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens reached)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[list[int]]  # per sample, the tokens it generated this step ([] for none)
    finished: bool  # every sample has finished
    completions: list[Completion] | None  # the n completions, once finished
    num_cached_tokens: int = 0  # prompt positions read from the prefix cache instead of prefilled (vLLM's name)


def row_seed(seed: int, sample: int) -> int:
    """A 63-bit seed per sample row from the request's seed and the sample's index in its group only, so a
    request's completions do not depend on what else shares the batch."""
    x = (seed * 0x9E3779B97F4A7C15 + sample * 0x94D049BB133111EB + 0xBF58476D1CE4E5B9) % (1 << 64)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (holds no KV)
    PREFILLING = "prefilling"  # admitted: its prompt (or a preempted sample's tokens) is being prefilled
    RUNNING = "running"  # decoding one token per live sample each step
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sample:
    index: int  # j among the request's n samples
    seed: int  # row_seed(request seed, j)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # KV blocks of its generated tokens
    cached: int = 0  # generated tokens whose keys are in the pool (len(token_ids) - 1 when decoding)
    row: int = -1  # its row of the sampler's and block tables' state while admitted
    finish_reason: str | None = None
    reported: int = 0  # tokens already returned in a RequestOutput

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: torch.Tensor  # (T, hidden) embeddings
    params: SamplingParams
    stop_ids: frozenset[int]
    cache_key: str | None
    arrival: int  # order of add_request calls (first come, first served)
    samples: list[Sample]
    status: Status = Status.WAITING
    prefix_blocks: list[int] = field(default_factory=list)  # the prompt's KV blocks (the cache entry's, if any)
    prefix_entry: CachedPrefix | None = None  # the prefix cache entry it reads
    prompt_done: int = 0  # prompt positions whose KV is in the pool
    group: int = -1  # its row of the prefix block table while admitted
    num_cached_tokens: int | None = None  # prompt positions its first admission read from the prefix cache

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[0]

    @property
    def live(self) -> list[Sample]:
        return [s for s in self.samples if s.finish_reason is None]

    @property
    def fresh(self) -> bool:
        """No token drawn yet: its first token comes from the prompt's last position."""
        return not self.samples[0].token_ids

    @property
    def prefilled(self) -> bool:
        """The prompt's KV and every live sample's generated KV (all but its last token) are in the pool."""
        return self.prompt_done == self.prompt_len and all(
            s.cached >= len(s.token_ids) - 1 for s in self.samples if s.finish_reason is None)

    def completions(self) -> list[Completion]:
        return [Completion(token_ids=list(s.token_ids), logprobs=torch.tensor(s.logprobs, dtype=torch.float32),
                           finish_reason=s.finish_reason or "length") for s in self.samples]
