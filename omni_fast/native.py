"""The native ops of omni_fast._C, each wrapped once as a torch.library custom op with a fake (meta) twin.

omni_fast.ops points its "cuda" and "cpu" backends here; it only does so when omni_fast._C has the matching
`<op>_cuda` / `<op>_cpu` symbol. Importing this module registers the ops (and imports omni_fast._C).
"""
from __future__ import annotations

import torch

from omni_fast import _C

_SCALE_CODES = {"group": 0, "batch": 1, "none": 2}


@torch.library.custom_op("omni_fast::group_advantage", mutates_args=())
def group_advantage(rewards: torch.Tensor, group_size: int, eps: float, scale: str) -> torch.Tensor:
    """rewards [K, B*G] -> advantages fp32 [B*G] (csrc/kernels/group_advantage.cuh)."""
    op = _C.group_advantage_cuda if rewards.is_cuda else _C.group_advantage_cpu
    return op(rewards, group_size, eps, _SCALE_CODES[scale])


@group_advantage.register_fake
def _group_advantage_fake(rewards: torch.Tensor, group_size: int, eps: float, scale: str) -> torch.Tensor:
    return rewards.new_empty(rewards.shape[-1:], dtype=torch.float32)
