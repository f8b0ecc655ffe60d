"""Cascade (shared-prefix) decode attention.

One decode step for B rows (samples). Row b belongs to prompt group g = groups[b]; its keys are the group's
prefix (prefix_k[g, :prefix_lens[g]], written once at prefill and shared by all the group's samples) followed
by its own generated keys (gen_k[slots[b], :gen_lens[b]]). Output:

    out[b, h] = softmax(q[b, h] . [K_prefix(g); K_gen(b)]^T * scale) @ [V_prefix(g); V_gen(b)]

GQA: query head h reads KV head h // (Hq / Hkv). The Triton kernel computes the prefix part once per
(group, KV head) for all the group's rows and query heads, the generated part per row, and merges the two
partial results by their log-sum-exp.
"""
from __future__ import annotations

import torch


def cascade_attention_ref(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_lens: torch.Tensor,
                          groups: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor, slots: torch.Tensor,
                          gen_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, D]; prefix_k/v [P, Tp, Hkv, D]; prefix_lens [P]; groups [B]; gen_k/v [S, Tg, Hkv, D];
    slots [B]; gen_lens [B] (valid generated keys, the current token included) -> [B, Hq, D] in q's dtype.
    Plain torch, in fp32 (fp64 for fp64 inputs): the definition of correct."""
    b, hq, d = q.shape
    hkv = prefix_k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    rep = hq // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).view(b, hkv, rep, d)  # (B, Hkv, rep, D)
    kp, vp = prefix_k[groups].to(acc), prefix_v[groups].to(acc)  # (B, Tp, Hkv, D)
    kg, vg = gen_k[slots].to(acc), gen_v[slots].to(acc)  # (B, Tg, Hkv, D)
    keys, values = torch.cat([kp, kg], dim=1), torch.cat([vp, vg], dim=1)  # (B, Tp+Tg, Hkv, D)
    tp, tg = kp.shape[1], kg.shape[1]
    valid = torch.cat([torch.arange(tp, device=q.device)[None] < prefix_lens[groups][:, None],
                       torch.arange(tg, device=q.device)[None] < gen_lens[:, None]], dim=1)  # (B, Tp+Tg)
    scores = torch.einsum("bhrd,bthd->bhrt", qf, keys) * scale  # (B, Hkv, rep, T)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhrt,bthd->bhrd", torch.softmax(scores, dim=-1), values)
    return out.reshape(b, hq, d).to(q.dtype)
