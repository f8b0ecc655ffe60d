"""Rotary position embedding on q and k in one launch (transformers' apply_rotary_pos_emb arithmetic).

    out = x * cos + rotate_half(x) * sin,   rotate_half([a, b]) = [-b, a]   (halves of the head dimension)

q [*, Hq, D], k [*, Hkv, D] (views into the packed qkv output are fine: only the last dimension must be
contiguous), cos/sin [*, D] (the rows for each token's position, in the activation dtype). Each product and
the sum are rounded to the activation dtype as the eager expression does.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton  # a sibling: the kernels import nothing else of omni_fast


@triton.jit
def _rope_fwd_kernel(X, Cos, Sin, Out, stride_xt, stride_xh, stride_ct, stride_ot, stride_oh,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, N_HEADS: tl.constexpr):
    """Token t, all heads: out[h, :half] = x1*cos1 - x2*sin1, out[h, half:] = x2*cos2 + x1*sin2."""
    t = tl.program_id(0)
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    hmask = heads < N_HEADS
    base = X + t * stride_xt + heads * stride_xh
    x1 = tl.load(base + cols, mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + cols, mask=hmask, other=0.0).to(tl.float32)
    c1 = tl.load(Cos + t * stride_ct + cols).to(tl.float32)
    c2 = tl.load(Cos + t * stride_ct + HALF + cols).to(tl.float32)
    s1 = tl.load(Sin + t * stride_ct + cols).to(tl.float32)
    s2 = tl.load(Sin + t * stride_ct + HALF + cols).to(tl.float32)
    dt = Out.dtype.element_ty
    lo = (x1 * c1).to(dt).to(tl.float32) + (-(x2 * s1)).to(dt).to(tl.float32)
    hi = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    obase = Out + t * stride_ot + heads * stride_oh
    tl.store(obase + cols, lo.to(dt), mask=hmask)
    tl.store(obase + HALF + cols, hi.to(dt), mask=hmask)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    *lead, heads, d = x.shape
    x2 = x.reshape(-1, heads, d)
    c2, s2 = cos.reshape(-1, d), sin.reshape(-1, d)
    assert x2.stride(-1) == 1 and c2.stride(-1) == 1 and s2.stride() == c2.stride(), "last dims must be contiguous"
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _rope_fwd_kernel[(x2.shape[0],)](x2, c2, s2, out, x2.stride(0), x2.stride(1), c2.stride(0), out.stride(0),
                                     out.stride(1), HALF=d // 2, BLOCK_H=triton.next_power_of_2(heads),
                                     N_HEADS=heads, num_warps=1)
    return out.view(x.shape)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path; arguments as rope_ref."""
    d = q.shape[-1]
    assert k.shape[-1] == d and cos.shape[-1] == d and d % 2 == 0, "q, k, cos and sin must share an even head dim"
    assert q.shape[:-2] == k.shape[:-2] == cos.shape[:-1] == sin.shape[:-1], "token dimensions must agree"
    assert q.dtype == k.dtype == cos.dtype == sin.dtype, "q, k, cos and sin must share a dtype"
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [*, Hq, D], k [*, Hkv, D], cos/sin [*, D] -> rotated (q, k). Plain torch, as transformers computes it."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
