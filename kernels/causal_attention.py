"""Causal self-attention over [B, T] for the decoder's plain forward and the shared-prefix log-probs.

No Triton kernel of ours: the fast path is flash-attn's kernel where that package is installed (GQA native,
fp16 / bf16 only); the reference is torch's scaled_dot_product_attention. omni_fast.ops picks one.
Layout: q [B, T, Hq, D], k / v [B, T, Hkv, D] -> [B, T, Hq, D], Hq a multiple of Hkv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn's kernel on the [B, T, H, D] layout; fp32 inputs, which it lacks, run the reference."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return causal_attention_ref(q, k, v)
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=True)


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal self-attention through SDPA: q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)
