"""The GRPO loss as pure functions: per-token terms, then one normalisation picked from `NORMALIZERS`.

The default reproduces the R1-Omni reference trainer (humanOmni_grpo_trainer.py, lines 535-588) exactly:

    per_token_kl   = exp(ref - logp) - (ref - logp) - 1                   (k3, ref minus policy)
    per_token_loss = -(exp(logp - logp.detach()) * A - beta * per_token_kl),  beta = 0.04
    loss           = mean over sequences of (sum_t loss * mask / sum_t mask)   ("grpo")

with mask = 1 over each completion's own tokens, its stop token included (the rollout builds it from the
completion lengths; the reference stops the mask at the first <|im_end|>, see the trainer). With old log-probs (several updates
per rollout batch) the policy term is PPO's clipped ratio min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),
r = exp(logp - old). Token-level normalisations ("bnpo", "dr_grpo", "dapo") follow TRL's definitions.

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


def _sequence_mean(loss, mask, max_completion_length, num_items_in_batch):
    return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def _token_mean(loss, mask, max_completion_length, num_items_in_batch):
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def _constant_length(loss, mask, max_completion_length, num_items_in_batch):
    return (loss * mask).sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))


def _global_tokens(loss, mask, max_completion_length, num_items_in_batch):
    total = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return (loss * mask).sum() / (total.clamp(min=1) if torch.is_tensor(total) else max(total, 1))


# How the [B, T] per-token losses become one number.
NORMALIZERS: dict[str, Callable[..., torch.Tensor]] = {
    # per-sequence masked mean, then mean over sequences (R1-Omni reference; TRL "grpo")
    "grpo": _sequence_mean,
    # mean over all completion tokens of the local batch (TRL "bnpo")
    "bnpo": _token_mean,
    # sum over tokens / (B * max_completion_length), a constant (Dr. GRPO; T when max_completion_length is None)
    "dr_grpo": _constant_length,
    # sum over tokens / active tokens of the whole accumulated, all-rank batch (DAPO; TRL's default), passed
    # as num_items_in_batch, or the local token count when it is None
    "dapo": _global_tokens,
}


def grpo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, old_logp: torch.Tensor | None = None, beta: float = 0.04,
              eps_low: float = 0.2, eps_high: float = 0.2, loss_type: str = "grpo",
              max_completion_length: int | None = None,
              num_items_in_batch: int | torch.Tensor | None = None) -> LossOutput:
    """GRPO loss over completion tokens; the defaults are the R1-Omni reference trainer's.

    logp [B, T] policy log-probs of the sampled tokens (with grad), advantages [B] (or [B, T]), mask [B, T]
    (1 over each completion's tokens), ref_logp [B, T] reference-model log-probs (KL term, beta), old_logp [B, T] the
    rollout policy's log-probs (clipped ratio; None for the single on-policy update of the reference),
    loss_type a key of NORMALIZERS.
    """
    if loss_type not in NORMALIZERS:
        raise ValueError(f"loss_type must be one of {sorted(NORMALIZERS)}, got {loss_type!r}")
    mask = mask.to(logp.dtype)
    losses = per_token_loss(logp, advantages, ref_logp, old_logp, beta, eps_low, eps_high)
    loss = NORMALIZERS[loss_type](losses, mask, max_completion_length, num_items_in_batch)
    with torch.no_grad():
        kl = (_sequence_mean(k3_kl(logp, ref_logp), mask, None, None) if ref_logp is not None
              else torch.full((), float("nan"), device=logp.device))
        clip_ratio = torch.zeros((), device=logp.device)
        if old_logp is not None:
            ratio = torch.exp(logp - old_logp)
            adv = advantages[:, None] if advantages.ndim == 1 else advantages
            clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
            clip_ratio = (clipped.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)
    return LossOutput(loss, kl, clip_ratio)


def accumulation_scale(loss_type: str, mask: torch.Tensor, step_sequences: int, step_tokens: float) -> float:
    """The factor for one micro-batch's `grpo_loss` so that the scaled losses of all the micro-batches of an
    optimizer step add up to `grpo_loss` over the whole step's batch at once (same gradient, whatever
    per_device_train_batch_size and gradient_accumulation_steps split it): "grpo" / "dr_grpo" average over
    sequences, so each micro-batch weighs by its share of the step's sequences; "bnpo" averages over tokens,
    so by its share of the tokens; "dapo" already divides by the step's token count (pass it as
    num_items_in_batch) and weighs 1."""
    if loss_type in ("grpo", "dr_grpo"):
        return mask.shape[0] / step_sequences
    if loss_type == "bnpo":
        return float(mask.sum()) / max(step_tokens, 1.0)
    if loss_type == "dapo":
        return 1.0
    raise ValueError(f"loss_type must be one of {sorted(NORMALIZERS)}, got {loss_type!r}")
