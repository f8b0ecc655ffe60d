"""The GRPO loss as pure functions: per-token terms, then one normalisation picked from `NORMALIZERS`.

The default reproduces the R1-Omni reference trainer (humanOmni_grpo_trainer.py, lines 535-588) exactly:

    per_token_kl   = exp(ref - logp) - (ref - logp) - 1                   (k3, ref minus policy)
    per_token_loss = -(exp(logp - logp.detach()) * A - beta * per_token_kl),  beta = 0.04
    loss           = mean over sequences of (sum_t loss * mask / sum_t mask)   ("grpo")

with mask = 1 over each completion's own tokens, its stop token included (the rollout builds it from the
completion lengths; the reference stops the mask at the first <|im_end|>, see the trainer). With old log-probs
(several updates per rollout batch) the policy term is PPO's clipped ratio min(r A, clip(r, 1 - eps_low,
1 + eps_high) A), r = exp(logp - old). Token-level normalisations ("bnpo", "dr_grpo", "dapo") follow TRL's.

A batch that is one micro-batch of an optimizer step is normalised by the step's totals (num_sequences,
num_items_in_batch: every micro-batch of every rank), so the losses of a step's micro-batches add up to the loss
of its whole batch at once: any split into micro-batches and ranks gives the same update.

Shapes: logp, ref_logp, old_logp, mask [B, T] (B = B_prompts * G completions); advantages [B] or [B, T].
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class LossOutput(NamedTuple):
    loss: torch.Tensor          # scalar, differentiable
    kl: torch.Tensor            # masked per-sequence mean of the k3 KL, then batch mean (detached); nan without ref
    clip_ratio: torch.Tensor    # fraction of completion tokens whose ratio was clipped (detached); 0 without old


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def policy_objective(logp: torch.Tensor, advantages: torch.Tensor, old_logp: torch.Tensor | None = None,
                     eps_low: float = 0.2, eps_high: float = 0.2) -> torch.Tensor:
    """Per-token surrogate objective to maximise, [B, T].

    old_logp None (one update per rollout batch, the reference): exp(logp - logp.detach()) * A, whose value is
    A and whose gradient is A * dlogp. Otherwise min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),
    r = exp(logp - old_logp).
    """
    adv = advantages[:, None] if advantages.ndim == 1 else advantages                   # (B, 1) or (B, T)
    if old_logp is None:
        return torch.exp(logp - logp.detach()) * adv
    ratio = torch.exp(logp - old_logp)
    return torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)


def per_token_loss(logp: torch.Tensor, advantages: torch.Tensor, ref_logp: torch.Tensor | None = None,
                   old_logp: torch.Tensor | None = None, beta: float = 0.04, eps_low: float = 0.2,
                   eps_high: float = 0.2) -> torch.Tensor:
    """-(policy objective - beta * k3 KL), [B, T]; the KL term is left out when beta == 0 or ref_logp is None."""
    objective = policy_objective(logp, advantages, old_logp, eps_low, eps_high)
    if beta != 0 and ref_logp is not None:
        objective = objective - beta * k3_kl(logp, ref_logp)
    return -objective


class StepTotals(NamedTuple):
    sequences: int | torch.Tensor  # completions of the whole step (every micro-batch, every rank)
    tokens: int | float | torch.Tensor  # their completion tokens
    max_completion_length: int  # Dr. GRPO's constant length


def _at_least_one(x):
    return x.clamp(min=1) if torch.is_tensor(x) else max(x, 1)


def _sequence_mean(loss, mask, totals: StepTotals):
    return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / _at_least_one(totals.sequences)


def _token_mean(loss, mask, totals: StepTotals):
    return (loss * mask).sum() / _at_least_one(totals.tokens)


def _constant_length(loss, mask, totals: StepTotals):
    return (loss * mask).sum() / (totals.sequences * totals.max_completion_length)


# How the [B, T] per-token losses become one number; the keys are GRPOConfig.loss_type's choices.
NORMALIZERS: dict[str, Callable[[torch.Tensor, torch.Tensor, StepTotals], torch.Tensor]] = {
    # per-sequence masked mean, then mean over the step's sequences (R1-Omni reference; TRL "grpo")
    "grpo": _sequence_mean,
    # mean over the step's completion tokens (TRL "bnpo", which normalises each device's batch by its own
    # tokens: here the micro-batches and ranks of a step add up to the whole batch, so it is dapo's mean)
    "bnpo": _token_mean,
    # sum over tokens / (step sequences * max_completion_length), a constant (Dr. GRPO)
    "dr_grpo": _constant_length,
    # sum over tokens / active tokens of the whole accumulated, all-rank batch (DAPO; TRL's default)
    "dapo": _token_mean,
}
LOSS_TYPES = tuple(NORMALIZERS)


def grpo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, old_logp: torch.Tensor | None = None, beta: float = 0.04,
              eps_low: float = 0.2, eps_high: float = 0.2, loss_type: str = "grpo",
              max_completion_length: int | None = None, num_sequences: int | torch.Tensor | None = None,
              num_items_in_batch: int | float | torch.Tensor | None = None) -> LossOutput:
    """GRPO loss over completion tokens; the defaults are the R1-Omni reference trainer's.

    logp [B, T] policy log-probs of the sampled tokens (with grad), advantages [B] (or [B, T]), mask [B, T]
    (1 over each completion's tokens), ref_logp [B, T] reference-model log-probs (KL term, beta), old_logp
    [B, T] the rollout policy's log-probs (clipped ratio; None for the single on-policy update of the
    reference), loss_type a key of NORMALIZERS. num_sequences and num_items_in_batch are the completions and
    completion tokens of the whole optimizer step this batch is part of (None: this batch's own);
    max_completion_length is Dr. GRPO's constant (None: T).
    """
    if loss_type not in NORMALIZERS:
        raise ValueError(f"loss_type must be one of {sorted(NORMALIZERS)}, got {loss_type!r}")
    mask = mask.to(logp.dtype)
    losses = per_token_loss(logp, advantages, ref_logp, old_logp, beta, eps_low, eps_high)
    totals = StepTotals(sequences=mask.shape[0] if num_sequences is None else num_sequences,
                        tokens=mask.sum() if num_items_in_batch is None else num_items_in_batch,
                        max_completion_length=max_completion_length or mask.shape[1])
    loss = NORMALIZERS[loss_type](losses, mask, totals)
    with torch.no_grad():
        kl = (((k3_kl(logp, ref_logp) * mask).sum(1) / mask.sum(1).clamp(min=1)).mean() if ref_logp is not None
              else torch.full((), float("nan"), device=logp.device))
        clip_ratio = torch.zeros((), device=logp.device)
        if old_logp is not None:
            ratio = torch.exp(logp - old_logp)
            adv = advantages[:, None] if advantages.ndim == 1 else advantages
            clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
            clip_ratio = (clipped.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)
    return LossOutput(loss, kl, clip_ratio)
