"""Fused residual add + RMSNorm: Triton (interpreter here, GPU in the gpu class) vs the torch reference in fp64."""
import pytest
import torch

from numerics import assert_within_torch_error, fp64
from omni_fast import ops
from omni_fast.kernels.rms_norm import add_rms_norm_ref

CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter rounds fp32 -> bf16 by truncation: bf16 on GPU only


def _inputs(shape, dtype, device, residual=True):
    x = torch.randn(*shape, device=device).to(dtype)
    r = torch.randn(*shape, device=device).to(dtype) if residual else None
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(dtype)
    return x, r, w


def _check(shape, dtype, device, residual):
    x, r, w = _inputs(shape, dtype, device, residual)
    out, s = ops.add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_s = add_rms_norm_ref(fp64(x), fp64(r), fp64(w), 1e-6)
    low_out, low_s = add_rms_norm_ref(x, r, w, 1e-6)
    assert_within_torch_error(out, low_out, ref_out)
    assert torch.equal(s, low_s)  # the residual stream is one rounded add, exactly as torch's


@pytest.mark.parametrize("shape", [(1, 64), (37, 896), (5, 3, 100)])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("residual", [True, False])
def test_triton_interpreter(shape, dtype, residual):
    with ops.force_backend("triton", "add_rms_norm"):
        _check(shape, dtype, "cpu", residual)


def test_reference_is_transformers_qwen2_rmsnorm():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(2, 7, 96), torch.randn(2, 7, 96)
    out, s = add_rms_norm_ref(x, r, norm.weight, 1e-6)
    assert torch.equal(s, r + x) and torch.equal(out, norm(r + x))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 896), (256, 896), (8192, 896), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu(shape, dtype):
    _check(shape, dtype, "cuda", True)


def _rms_norm_grads_fp64(s, w, g, eps):
    """d(sum g * w * s / rms(s))/ds and /dw written out in fp64: rms = sqrt(mean(s^2) + eps),
    ds = w g / rms - s * sum(w g s) / (H rms^3), dw = sum over rows of g s / rms."""
    s, w, g = s.double(), w.double(), g.double()
    rms = (s.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    wg = w * g
    ds = wg / rms - s * (wg * s).sum(-1, keepdim=True) / (s.shape[-1] * rms ** 3)
    return ds, (g * s / rms).reshape(-1, s.shape[-1]).sum(0)


def test_forward_only_kernels_yield_to_autograd():
    """With a gradient to compute, the dispatch runs the differentiable torch reference even if Triton is forced."""
    x = torch.randn(3, 64, requires_grad=True)
    w = torch.ones(64)
    with ops.force_backend("triton", "add_rms_norm"):
        out, _ = ops.add_rms_norm(x, None, w, 1e-6)
        out.sum().backward()
        assert x.grad is not None
        expected, _ = _rms_norm_grads_fp64(x.detach(), w, torch.ones(3, 64), 1e-6)
        assert torch.allclose(x.grad.double(), expected, rtol=1e-5, atol=1e-6), (x.grad.double() - expected).abs().max()
        with torch.no_grad():
            assert torch.allclose(ops.add_rms_norm(x, None, w, 1e-6)[0], out, atol=1e-5)


@pytest.mark.parametrize("residual", [True, False])
def test_gradients_equal_the_fp64_formula(residual):
    """Through the dispatch (Triton forced, so autograd takes the reference): the gradients of x, the residual
    and the weight against the analytic fp64 gradient, for a random upstream gradient."""
    x, r, w = _inputs((5, 96), torch.float32, "cpu", residual)
    x.requires_grad_()
    w.requires_grad_()
    if r is not None:
        r.requires_grad_()
    g = torch.randn(5, 96)
    with ops.force_backend("triton", "add_rms_norm"):
        out, _ = ops.add_rms_norm(x, r, w, 1e-6)
    (out * g).sum().backward()
    s = x.detach() if r is None else x.detach() + r.detach()
    ds, dw = _rms_norm_grads_fp64(s, w.detach(), g, 1e-6)
    for got, exp in [(x.grad, ds), (w.grad, dw)] + ([(r.grad, ds)] if r is not None else []):
        err = (got.double() - exp).abs().max().item()
        assert err <= 8 * torch.finfo(torch.float32).eps * exp.abs().max().item(), err
