"""GRPO advantages: rewards of each completion normalised within its group of G completions of one prompt."""
from __future__ import annotations

import torch

from omni_fast import ops


def check_scale(scale: str) -> None:
    """A ValueError unless `scale` is one the advantage kernels take (kernels/group_advantage.py defines them)."""
    if scale not in ops.advantage_scales():
        raise ValueError(f"scale must be one of {ops.advantage_scales()}, got {scale!r}")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, *,
                     scale: str = "group") -> torch.Tensor:
    """Advantages float32 [B*G] from rewards [B*G] or [K, B*G] (K reward functions, summed), one launch.

    Completions of one prompt are consecutive: group b is rewards[..., b*G:(b+1)*G]. With r the summed rewards,
    mean_g and std_g the mean and unbiased (N-1) standard deviation of r over each group:

      scale="group" (default, the R1-Omni reference trainer): (r - mean_g) / (std_g + eps)
      scale="batch": (r - mean_g) / (std(r) + eps), std(r) the unbiased std of all B*G rewards
                     (TRL's scale_rewards="batch", "Lite-PPO"): groups whose rewards barely differ are not
                     blown up to unit scale
      scale="none":  r - mean_g (Dr. GRPO: no division by any std)

    A group of identical rewards gets advantage exactly 0 (the group mean is computed shifted by the group's
    first reward). group_size must be >= 2 and divide B*G. Runs as the CUDA or C++ op when omni_fast._C has
    it, else Triton (CUDA) or torch, through omni_fast.ops.
    """
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must be [B*G] or [K, B*G], got shape {tuple(rewards.shape)}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a float tensor, got {rewards.dtype}")
    if group_size < 2 or rewards.shape[-1] % group_size:
        raise ValueError(f"B*G={rewards.shape[-1]} must be a multiple of group_size={group_size} >= 2")
    check_scale(scale)
    rewards2d = rewards.reshape(-1, rewards.shape[-1]) if rewards.ndim == 2 else rewards.unsqueeze(0)  # (K, B*G)
    if rewards2d.stride(-1) != 1:
        rewards2d = rewards2d.contiguous()
    return ops.advantages_from_rewards(rewards2d, group_size, float(eps), scale).to(torch.float32)
