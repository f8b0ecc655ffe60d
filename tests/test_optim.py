"""MasterAdamW's gradient norm and clipping against torch's own clip_grad_norm_ and AdamW (plain tensors; the
FSDP2 shard path is compared with one process in tests/test_distributed.py)."""
import copy

import pytest
import torch

from omni_fast.grpo.optim import MasterAdamW


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).mul_(3.0).to(dtype)
    return params


def _master(params, lr=0.1):
    return MasterAdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, schedule=lambda step: 1.0)


@pytest.mark.parametrize("max_norm", [0.5, 1e3, 0.0])  # clipping active, inactive, disabled
def test_clip_and_step_equal_torch(max_norm):
    ours = _params(torch.float32)
    theirs = copy.deepcopy(ours)
    for a, b in zip(ours, theirs):
        b.grad = a.grad.clone()
    opt = _master(ours)
    norm = opt.clip(max_norm)
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in theirs]))
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(theirs, max_norm, foreach=False)
    assert float(norm) == pytest.approx(float(want), rel=1e-6)  # the pre-clip norm
    assert float(norm) > 0.5  # so max_norm 0.5 really clips
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    reference = torch.optim.AdamW(theirs, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)
    opt.apply()
    reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_bf16_params_step_fp32_masters_and_clip_them():
    params = _params(torch.bfloat16)
    opt = _master(params)
    assert opt.has_copies and all(m.dtype == torch.float32 for m in opt.masters)
    grads = [p.grad.float() for p in params]
    norm = opt.clip(0.5)
    want = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert float(norm) == pytest.approx(float(want), rel=1e-6)
    scale = 0.5 / (float(want) + 1e-6)
    for m, g in zip(opt.masters, grads):
        torch.testing.assert_close(m.grad, g * scale, rtol=1e-6, atol=0)
    before = [m.detach().clone() for m in opt.masters]
    opt.apply()
    for p, m, b in zip(params, opt.masters, before):
        assert not torch.equal(m, b)                        # the master moved
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))  # and was written back in place
        assert p.grad is None and m.grad is None


def test_no_gradient_at_all_has_norm_zero():
    params = _params(torch.float32)
    for p in params:
        p.grad = None
    assert float(_master(params).clip(1.0)) == 0.0
