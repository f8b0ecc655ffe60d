"""SwiGLU's activation: silu(gate) * up from the packed gate_up projection, in one launch.

    gate_up [*, 2I] = [gate | up]  ->  out [*, I] = silu(gate) * up

silu is computed in fp32 and rounded to the activation dtype before the product, as the eager
`F.silu(gate) * up` does in bf16.
"""
from __future__ import annotations

import torch

from ._triton import tl, triton  # a sibling: the kernels import nothing else of omni_fast


@triton.jit
def _silu_mul_fwd_kernel(GU, Out, stride_gu, stride_o, I, BLOCK: tl.constexpr):
    """Row n, columns [pid1 * BLOCK, ...): out = round(silu(gate)) * up."""
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    dt = Out.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (act * u).to(dt), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton path; arguments as silu_mul_ref."""
    shape = gate_up.shape
    assert shape[-1] % 2 == 0, f"gate_up's last dimension must be even, got {shape[-1]}"
    gu = gate_up.reshape(-1, shape[-1])
    assert gu.stride(-1) == 1, "gate_up must be contiguous in its last dimension"
    inter = shape[-1] // 2
    out = torch.empty(gu.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_fwd_kernel[(gu.shape[0], triton.cdiv(inter, block))](gu, out, gu.stride(0), out.stride(0), inter,
                                                                   BLOCK=block, num_warps=4)
    return out.view(*shape[:-1], inter)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [*, 2I] -> silu(gate) * up [*, I]. Plain torch."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
