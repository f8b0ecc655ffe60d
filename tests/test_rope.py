"""Rotary embedding of q and k in one launch vs the torch (transformers) arithmetic, fp64 reference."""
import pytest
import torch

from numerics import assert_within_torch_error, fp64
from omni_fast import ops
from omni_fast.kernels.rope import rope_ref
from omni_fast.model.qwen2 import Rotary


def _inputs(lead, hq, hkv, d, dtype, device):
    qkv = torch.randn(*lead, (hq + 2 * hkv) * d, device=device).to(dtype)  # packed, as the model slices it
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    positions = torch.randint(0, 4000, lead, device=device)
    cos, sin = Rotary(d, 1e6, 4096)(positions, dtype)
    return q.view(*lead, hq, d), k.view(*lead, hkv, d), cos, sin


def _check(lead, hq, hkv, d, dtype, device):
    q, k, cos, sin = _inputs(lead, hq, hkv, d, dtype, device)
    oq, ok = ops.rope(q, k, cos, sin)
    rq, rk = rope_ref(fp64(q), fp64(k), fp64(cos), fp64(sin))
    lq, lk = rope_ref(q, k, cos, sin)
    assert_within_torch_error(oq, lq, rq)
    assert_within_torch_error(ok, lk, rk)


@pytest.mark.parametrize("lead,hq,hkv,d", [((1,), 14, 2, 64), ((3, 37), 14, 2, 64), ((19,), 4, 1, 16), ((2, 5), 12, 4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter(lead, hq, hkv, d, dtype):
    with ops.force_backend("triton", "rope"):
        _check(lead, hq, hkv, d, dtype, "cpu")


def test_reference_is_transformers_apply_rotary_pos_emb():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    q, k, cos, sin = _inputs((2, 9), 14, 2, 64, torch.float32, "cpu")
    eq, ek = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # HF layout (B, H, T, D)
    rq, rk = rope_ref(q, k, cos, sin)
    assert torch.equal(rq, eq.transpose(1, 2)) and torch.equal(rk, ek.transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("lead", [(8,), (256,), (32, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu(lead, dtype):
    _check(lead, 14, 2, 64, dtype, "cuda")
