"""The no-grad half of a GRPO step: completions, their rewards and advantages, and log-probs under a model.

    clip features --policy prefixes (no grad)--> engine: G completions per prompt, prefix prefilled once, a
      whole generation batch of micro-batches in one call (sample_completions; seeds keyed by the run's seed,
      the optimizer step and the prompt's index)
      --decode (skip_special_tokens=True, NOT stripped, as the reference scores them)--> texts
      --score: each completion against its own prompt's label--> rewards [K, B*G]
      --make_rollout: group advantage kernel, padded completions and their mask--> Rollout

The completion mask comes from each completion's own length (its stop token included), whichever stop token
ended it; the reference builds it from <|im_end|> alone and so also trains on the pad tail of a completion
that ended on <|endoftext|>. With mask_truncated_completions (TRL's name; DAPO's overlong filtering) a completion
cut at max_completion_length without a stop token has a mask of 0: it is left out of the loss, while its reward
still counts in its group's mean and std.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_fast import task
from omni_fast.config import SamplingParams
from omni_fast.engine.sequence import Completion, row_seed
from omni_fast.grpo.advantage import group_advantages
from omni_fast.grpo.inputs import ClipFeatures, pad_rows
from omni_fast.grpo.logprobs import completion_logprobs
from omni_fast.grpo.rewards import compute_rewards


@dataclass(slots=True)
class Rollout:
    """One micro-batch's rollouts, everything the reference and policy passes need (filled by make_rollout)."""
    features: ClipFeatures  # the frozen towers' output, computed once
    prompt_ids: list[torch.Tensor]  # per prompt, ids with placeholders
    completions: torch.Tensor  # (B*G, C) int64, padded past `lengths`
    lengths: torch.Tensor  # (B*G,) int64, stop token included
    mask: torch.Tensor  # (B*G, C) float32: t < lengths[r] (a row of 0 for a completion left out of the loss)
    advantages: torch.Tensor  # (B*G,) float32
    rewards: dict[str, list[float]]  # "rewards/<name>" -> one weighted value per completion
    total_rewards: torch.Tensor  # (B*G,) float32, the sum of the weighted rewards
    texts: list[str]  # decoded completions
    truncated: torch.Tensor  # (B*G,) bool: cut at max_completion_length, no stop token

    def __len__(self) -> int:
        """B, its prompts."""
        return len(self.prompt_ids)


def rollout_seed(seed: int, step: int, index: int) -> int:
    """The engine seed of one prompt's group: keyed by the run's seed, the optimizer step and the prompt's
    index in the annotation file, so rollouts do not depend on batching, resumption or the process count."""
    return row_seed(row_seed(seed, step), index)


@dataclass(slots=True)
class RolloutPrompts:
    """One micro-batch's prompts as the engine is handed them."""
    features: ClipFeatures  # its clips' tower features
    prompt_ids: list[torch.Tensor]  # per prompt, ids with placeholders
    indices: list[int]  # the prompts' entries in the annotation file (their rollout seeds)


@torch.no_grad()
def sample_completions(model, engine, batches: list[RolloutPrompts], bert: dict, step: int, cfg,
                       ignore_eos: bool = False) -> list[list[Completion]]:
    """G completions (token ids, stop token included; finish_reason "length" for one cut at max_completion_length)
    of each prompt of several micro-batches, all sampled in one engine call (a generation batch) from the model's
    prompt embeddings -> per micro-batch, its B*G completions, prompt-major. `step` is the optimizer step the rollouts are for, cfg the GRPOConfig; each prompt's seed is
    rollout_seed(seed, step, its index), and the engine's draws depend on a request's own seed only, so the
    completions are the same however the micro-batches are grouped. ignore_eos forces every completion to
    max_completion_length tokens (benchmarks)."""
    prefixes, params = [], []
    for b in batches:
        prefixes += model.prompt_embeddings(b.prompt_ids, b.features.vision, b.features.audio, bert)
        params += [SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_k=cfg.top_k,
                                  top_p=cfg.top_p, max_tokens=cfg.max_completion_length,
                                  seed=rollout_seed(cfg.seed, step, i), ignore_eos=ignore_eos) for i in b.indices]
    groups = iter(engine.generate(prefixes, params))
    return [[c for _ in b.indices for c in next(groups)] for b in batches]


def score(cfg, texts: list[str], lengths: list[int], labels: list[str]) -> dict[str, list[float]]:
    """The weighted rewards (cfg.rewards) of B*G decoded completions of `lengths` tokens, prompt-major:
    completion r is scored against the solution of prompt r // G's label."""
    solutions = [task.solution(label) for label in labels for _ in range(cfg.num_generations)]
    names, weights = zip(*cfg.rewards)
    raw = compute_rewards(names, texts, solutions, completion_lengths=lengths, config=cfg)
    return {k: [w * v for v in values] for (k, values), w in zip(raw.items(), weights)}


def make_rollout(features: ClipFeatures, prompt_ids: list[torch.Tensor], token_ids: list[list[int]],
                 texts: list[str], rewards: dict[str, list[float]], group_size: int, scale: str,
                 pad_id: int, truncated: list[bool] | None = None, mask_truncated: bool = False) -> Rollout:
    """The one place a Rollout is filled: the rewards [K, B*G] summed and normalised per group of G (the group
    advantage kernel, over every completion; no rewards: all zero), the completions padded with pad_id and their
    mask (1 at positions t < each completion's length; all 0 for a truncated completion with mask_truncated)."""
    device = features.vision.device
    values = list(rewards.values()) or [[0.0] * len(token_ids)]
    stacked = torch.tensor(values, dtype=torch.float32, device=device)                  # (K, B*G)
    completions, lengths = pad_rows(token_ids, pad_id, device)
    cut = torch.tensor(truncated or [False] * len(token_ids), dtype=torch.bool, device=device)
    mask = (torch.arange(completions.shape[1], device=device)[None] < lengths[:, None]).float()
    if mask_truncated:
        mask[cut] = 0.0
    return Rollout(features=features, prompt_ids=prompt_ids, completions=completions, lengths=lengths, mask=mask,
                   advantages=group_advantages(stacked, group_size, scale=scale), rewards=rewards,
                   total_rewards=stacked.sum(0), texts=texts, truncated=cut)


def select_groups(ro: Rollout, groups: list[int], group_size: int) -> Rollout:
    """The Rollout of some of `ro`'s prompts (their indices, in order) with their G completions each; every field
    as make_rollout filled it (the advantages are per group, so they stay)."""
    rows = torch.tensor([b * group_size + j for b in groups for j in range(group_size)], dtype=torch.long,
                        device=ro.completions.device)
    at = rows.tolist()
    index = torch.tensor(groups, dtype=torch.long, device=ro.features.vision.device)
    features = ClipFeatures(ro.features.vision[index], ro.features.audio[index])
    return Rollout(features=features, prompt_ids=[ro.prompt_ids[b] for b in groups],
                   completions=ro.completions[rows], lengths=ro.lengths[rows], mask=ro.mask[rows],
                   advantages=ro.advantages[rows], rewards={k: [v[r] for r in at] for k, v in ro.rewards.items()},
                   total_rewards=ro.total_rewards[rows], texts=[ro.texts[r] for r in at], truncated=ro.truncated[rows])


def rollout_logprobs(model, ro: Rollout, bert: dict, group_size: int, temperature: float) -> torch.Tensor:
    """A model's log-probs (B*G, C) of the rollouts' completions, through its own projectors and gate on the
    rollouts' tower features, with the shared-prefix forward: the frozen reference model's pass (the caller
    disables grad) and the policy's."""
    prefixes = model.prompt_embeddings(ro.prompt_ids, ro.features.vision, ro.features.audio, bert)
    return completion_logprobs(model, prefixes, ro.completions, ro.lengths, group_size, temperature)


def rollout_sums(rollouts: list[Rollout], reward_keys: list[str], g: int) -> dict[str, float]:
    """Sums over a rank's rollouts that, added over ranks and divided by their counts, give the step's
    metrics: completions, groups, total reward, each reward, completion length, truncated completions, and the per-group
    (unbiased) reward std that the reference averages into reward_std."""
    sums = {"sequences": 0.0, "groups": 0.0, "reward": 0.0, "reward_std": 0.0, "completion_length": 0.0,
            "truncated": 0.0}
    sums.update({k: 0.0 for k in reward_keys})
    for r in rollouts:
        sums["sequences"] += r.total_rewards.numel()
        sums["groups"] += r.total_rewards.numel() // g
        sums["reward"] += float(r.total_rewards.sum())
        sums["reward_std"] += float(r.total_rewards.view(-1, g).std(dim=1).sum())
        sums["completion_length"] += float(r.lengths.sum())
        sums["truncated"] += float(r.truncated.sum())
        for k in reward_keys:
            sums[k] += sum(r.rewards[k])
    return sums
