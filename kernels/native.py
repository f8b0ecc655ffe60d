"""The native ops of omni_fast._C (csrc/) as torch.library custom ops: one op, one kernel per device type
(`register_kernel`), and a fake (meta) twin for tracing.

omni_fast.ops points its "cuda" and "cpu" backends here; it only does so when omni_fast._C has the matching
`<op>_cuda` / `<op>_cpu` symbol, and the CUDA kernel is registered only when the extension was built with it.
Importing this module registers the ops (and imports omni_fast._C, the one thing of omni_fast a kernel module
imports besides its siblings).
"""
from __future__ import annotations

import torch

from omni_fast import _C

from .group_advantage import SCALES  # the scale codes every group_advantage kernel takes, defined once


@torch.library.custom_op("omni_fast::group_advantage", mutates_args=(), device_types="cpu")
def group_advantage(rewards: torch.Tensor, group_size: int, eps: float, scale: str) -> torch.Tensor:
    """rewards [K, B*G] -> advantages fp32 [B*G] (csrc/cpu/group_advantage.cpp; CUDA: csrc/group_advantage.cu)."""
    return _C.group_advantage_cpu(rewards, group_size, eps, SCALES[scale])


if hasattr(_C, "group_advantage_cuda"):
    @group_advantage.register_kernel("cuda")
    def _group_advantage_cuda(rewards: torch.Tensor, group_size: int, eps: float, scale: str) -> torch.Tensor:
        return _C.group_advantage_cuda(rewards, group_size, eps, SCALES[scale])


@group_advantage.register_fake
def _group_advantage_fake(rewards: torch.Tensor, group_size: int, eps: float, scale: str) -> torch.Tensor:
    return rewards.new_empty(rewards.shape[-1:], dtype=torch.float32)
