"""Residual add fused with RMSNorm, as each Qwen2 decoder layer does it twice.

    s = x + residual                          (in x's dtype: the residual stream is kept in the model dtype)
    out = weight * (s / sqrt(mean(s^2) + eps)).to(dtype)     (normalisation in fp32, HF's Qwen2RMSNorm)

x, residual, out, s: [N, H]; weight [H]. With residual None, s = x. One launch per call instead of the ~7
elementwise kernels the eager expression costs; one program per row.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton  # a sibling: the kernels import nothing else of omni_fast


@triton.jit
def _add_rms_norm_fwd_kernel(X, R, W, Out, S, stride_x, stride_r, stride_o, stride_s, H, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """Row n: s = x + r rounded to the input dtype; out = w * round(s * rsqrt(mean(s^2) + eps))."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    s = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, 0) / H + eps)
    normed = (s * inv).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * normed).to(Out.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path; arguments as add_rms_norm_ref. Leading dimensions are flattened."""
    shape = x.shape
    h = shape[-1]
    assert weight.shape == (h,), f"weight must be [{h}], got {tuple(weight.shape)}"
    x2 = x.reshape(-1, h)
    assert x2.stride(-1) == 1, "x must be contiguous in its last dimension"
    out = torch.empty_like(x2)
    if residual is not None:
        assert residual.shape == shape and residual.dtype == x.dtype, "residual must match x in shape and dtype"
        r2 = residual.reshape(-1, h)
        assert r2.stride(-1) == 1, "residual must be contiguous in its last dimension"
        s = torch.empty_like(x2)
    else:
        r2, s = x2, x2
    _add_rms_norm_fwd_kernel[(x2.shape[0],)](x2, r2, weight, out, s, x2.stride(0), r2.stride(0), out.stride(0),
                                             s.stride(0), h, eps, HAS_RESIDUAL=residual is not None,
                                             BLOCK=triton.next_power_of_2(h), num_warps=4)
    return out.view(shape), s.view(shape)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (normalised, new residual stream). Plain torch with transformers' Qwen2RMSNorm arithmetic."""
    s = x if residual is None else residual + x
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(s.dtype), s
