"""Causal self-attention for the decoder's plain forward, the shared-prefix log-probs and the engine's prefill
chunks.

No Triton kernel of ours: the fast path is flash-attn's kernel where that package is installed (GQA native,
fp16 / bf16 only); the reference is torch's scaled_dot_product_attention. omni_fast.ops picks one.
Layout: q [B, Tq, Hq, D], k / v [B, Tk, Hkv, D] -> [B, Tq, Hq, D], Hq a multiple of Hkv, Tk >= Tq: the queries
are the last Tq of the Tk positions (flash-attn's alignment; a prefill chunk after earlier ones), so query i
sees keys <= i + Tk - Tq.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn's kernel on the [B, T, H, D] layout (the same alignment when Tk > Tq); fp32 inputs, which it
    lacks, run the reference."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return causal_attention_ref(q, k, v)
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=True)


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal self-attention through SDPA: q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] -> [B, Tq, Hq, D]."""
    tq, tk = q.shape[1], k.shape[1]
    mask = None if tq == tk else torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=mask is None, enable_gqa=True)
    return out.transpose(1, 2)
