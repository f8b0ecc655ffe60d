"""GRPO group advantages in one launch: rewards [K, B*G] summed over K and normalised per group of G.

The same semantics are implemented natively in csrc/ (CUDA and C++ CPU); omni_fast.ops picks one.
Each group's mean is computed shifted by the group's first reward, so a group of identical rewards gets a mean
exactly equal to them and an advantage of exactly 0 whatever G is.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton  # a sibling: the kernels import nothing else of omni_fast

SCALES = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _group_tile(rewards_ptr, blk, K, stride_k, group_size, n_groups,
                BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr):
    """Groups blk * BLOCK_G + [0, BLOCK_G): offsets, mask, v - mean, mean and sum (v - mean)^2 per group."""
    groups = blk * BLOCK_G + tl.arange(0, BLOCK_G)
    elems = tl.arange(0, BLOCK_E)
    idx = groups[:, None] * group_size + elems[None, :]                                # (BLOCK_G, BLOCK_E)
    mask = (groups < n_groups)[:, None] & (elems < group_size)[None, :]
    v = tl.zeros([BLOCK_G, BLOCK_E], dtype=tl.float32)
    for k in range(K):
        v += tl.load(rewards_ptr + k * stride_k + idx, mask=mask, other=0.0).to(tl.float32)
    shift = tl.sum(tl.where(elems[None, :] == 0, v, 0.0), axis=1)
    mean = shift + tl.sum(tl.where(mask, v - shift[:, None], 0.0), axis=1) / group_size
    dev = tl.where(mask, v - mean[:, None], 0.0)
    return idx, mask, dev, mean, tl.sum(dev * dev, axis=1)


@triton.jit
def _group_advantage_kernel(
    rewards_ptr, out_ptr, K, M, stride_k, group_size, eps,
    SCALE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[i] = (v[i] - mean_g) / (std + eps), v = sum_k rewards[k, :], groups of group_size consecutive values.

    mean_g = v_first + sum_g (v - v_first) / G;  std_g = sqrt(sum_g (v - mean_g)^2 / (G - 1)).
    SCALE 0 (group): std = std_g.  SCALE 1 (batch): std = unbiased std of all M values (merged from the
    group moments, Chan et al.); launched as one program.  SCALE 2 (none): out = v - mean_g.
    rewards [K, M] (unit stride along M), out fp32 [M]. Program p handles group blocks p, p + P, ...
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_groups = M // group_size
    n_blocks = tl.cdiv(n_groups, BLOCK_G)
    denom = 1.0
    if SCALE == 1:
        count = tl.zeros([], dtype=tl.float32)
        mu = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        for blk in range(pid, n_blocks, n_prog):
            groups = blk * BLOCK_G + tl.arange(0, BLOCK_G)
            valid = groups < n_groups
            _, _, _, mean_g, m2_g = _group_tile(rewards_ptr, blk, K, stride_k, group_size, n_groups,
                                                BLOCK_G, BLOCK_E)
            n_valid = tl.sum(valid.to(tl.float32), axis=0)
            mu_b = tl.sum(tl.where(valid, mean_g, 0.0), axis=0) / n_valid
            spread = tl.where(valid, mean_g - mu_b, 0.0)
            m2_b = tl.sum(m2_g, axis=0) + group_size * tl.sum(spread * spread, axis=0)
            count_b = n_valid * group_size
            delta = mu_b - mu
            total = count + count_b
            mu += delta * count_b / total
            m2 += m2_b + delta * delta * count * count_b / total
            count = total
        denom = tl.sqrt(m2 / (M - 1)) + eps
    for blk in range(pid, n_blocks, n_prog):
        idx, mask, dev, _, m2_g = _group_tile(rewards_ptr, blk, K, stride_k, group_size, n_groups,
                                              BLOCK_G, BLOCK_E)
        if SCALE == 0:
            adv = dev / (tl.sqrt(m2_g / (group_size - 1)) + eps)[:, None]
        elif SCALE == 1:
            adv = dev / denom
        else:
            adv = dev
        tl.store(out_ptr + idx, adv, mask=mask)


def group_advantage(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """Triton path. rewards [K, B*G] (float, unit stride along B*G) -> advantages fp32 [B*G]."""
    assert rewards.ndim == 2 and rewards.stride(1) == 1, "rewards must be [K, B*G] with unit stride along B*G"
    assert rewards.dtype.is_floating_point, f"rewards must be float, got {rewards.dtype}"
    assert group_size >= 2 and rewards.shape[1] % group_size == 0, \
        f"B*G={rewards.shape[1]} must be a multiple of group_size={group_size} >= 2"
    assert scale in SCALES, f"scale must be one of {list(SCALES)}, got {scale!r}"
    k, m = rewards.shape
    out = torch.empty(m, device=rewards.device, dtype=torch.float32)
    if m == 0:
        return out
    block_e = triton.next_power_of_2(group_size)
    tile = 8192 if scale == "batch" else 1024
    block_g = max(1, tile // block_e)
    n_blocks = triton.cdiv(m // group_size, block_g)
    grid = (1,) if scale == "batch" else (n_blocks,)
    _group_advantage_kernel[grid](rewards, out, k, m, rewards.stride(0), group_size, eps,
                                  SCALE=SCALES[scale], BLOCK_G=block_g, BLOCK_E=block_e,
                                  num_warps=8 if scale == "batch" else 4)
    return out


def group_advantage_ref(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                        scale: str = "group") -> torch.Tensor:
    """The reference trainer's definition, in torch. rewards [B*G] or [K, B*G] (summed over K).

    group: (r - mean_g) / (std_g + eps); batch: (r - mean_g) / (std(r) + eps); none: r - mean_g.
    std is unbiased (N - 1). Computes in float32, or float64 for float64 rewards. The group mean is taken
    shifted by the group's first reward (the same number in exact arithmetic), so that identical rewards give
    exactly 0 here too.
    """
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    r = r.sum(0) if r.ndim == 2 else r                                                   # (B*G,)
    grouped = r.view(-1, group_size)                                                     # (B, G)
    first = grouped[:, :1]
    advantages = r - (first + (grouped - first).mean(1, keepdim=True)).view(-1).repeat_interleave(group_size)
    if scale == "none":
        return advantages
    std = grouped.std(1).repeat_interleave(group_size) if scale == "group" else r.std().expand_as(r)
    return advantages / (std + eps)
