"""selective_logprob against the float64 definition: error <= 2x torch's own error in the input dtype for the
forward (logp, lse, entropy), 3x for the gradients (flash-attention's rule, STYLE.md).

The yardstick is floored at one fp32 rounding of the output's scale (eps_fp32 * max|ref|): for fp32 inputs
torch's max error is itself a few roundings, and with N = 1 it is decided by the luck of one element.
"""
import itertools
import math

import pytest
import torch

from omni_fast import ops
from omni_fast.kernels import selective_logprob as slp
from omni_fast.kernels.selective_logprob import SelectiveLogprobConfig, gpu_config, selective_logprob_ref

SHAPES = list(itertools.product((1, 37, 1000), (1000, 4099), (64, 96)))      # (N, V, H)
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture
def poisoned(monkeypatch):
    """Make every torch.empty / empty_like return NaN (float) or a huge value (int): an output element that a
    kernel forgets to write cannot pass for a right one left over from an earlier call."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(math.nan) if t.is_floating_point() else t.fill_(2**30)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def _inputs(n, v, h, dtype, device="cpu", requires_grad=True):
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) * (2.0 / h**0.5)).to(dtype)        # logits ~ N(0, 4)
    targets = torch.randint(0, v, (n,), device=device)
    return hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), targets


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


def _tol(factor, low, ref):
    return factor * max(_err(low, ref), torch.finfo(torch.float32).eps * ref.abs().max().item())


def _grads(fn, hidden, weight, targets, grad_out, temperature):
    """fn's logp and its gradients w.r.t. (hidden, weight) for upstream grad_out, on fresh leaf copies."""
    h = hidden.detach().clone().requires_grad_(hidden.requires_grad)
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    logp = fn(h, w, targets, temperature)
    leaves = [x for x in (h, w) if x.requires_grad]
    grads = iter(torch.autograd.grad(logp, leaves, grad_out.to(logp.dtype)))
    return logp.detach(), [next(grads) if x.requires_grad else None for x in (h, w)]


def _check(fn, hidden, weight, targets, temperature=1.0):
    """fn (ours) vs float64, with torch in the input dtype as the yardstick."""
    grad_out = torch.randn(targets.shape, device=targets.device)
    ref, ref_grads = _grads(selective_logprob_ref, hidden.double(), weight.double(), targets, grad_out.double(),
                            temperature)
    low, low_grads = _grads(selective_logprob_ref, hidden, weight, targets, grad_out, temperature)
    ours, our_grads = _grads(fn, hidden, weight, targets, grad_out, temperature)
    assert ours.dtype == torch.float32 and ours.shape == targets.shape
    assert _err(ours, ref) <= _tol(2, low, ref), (_err(ours, ref), _err(low, ref))
    for name, g, g_low, g_ref in zip(("dH", "dW"), our_grads, low_grads, ref_grads):
        if g_ref is None:
            assert g is None
            continue
        assert g.dtype == hidden.dtype and g.shape == g_ref.shape
        assert _err(g, g_ref) <= _tol(3, g_low, g_ref), (name, _err(g, g_ref), _err(g_low, g_ref))


def _triton(hidden, weight, targets, temperature):
    with ops.force_backend("triton", "selective_logprob"):
        return ops.selective_logprob(hidden, weight, targets, temperature)


class TestReferencePath:
    """The Triton kernels (TRITON_INTERPRET=1 without a GPU) and the torch fallback, on CPU tensors."""

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("n,v,h", SHAPES)
    def test_triton_forward_and_grads(self, poisoned, n, v, h, dtype):
        _check(_triton, *_inputs(n, v, h, dtype))

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_small_blocks_many_splits_and_chunks(self, poisoned, dtype):
        config = SelectiveLogprobConfig(block_n=16, block_v=32, block_h=32, splits=5, chunk_v=96, dh_block_m=16,
                                        dh_block_h=32, dh_block_k=32, num_warps=4, num_stages=1)

        def fn(hidden, weight, targets, temperature):
            return slp.selective_logprob(hidden, weight, targets, temperature, config=config)

        _check(fn, *_inputs(37, 1000, 96, dtype), temperature=0.7)

    @pytest.mark.parametrize("backend", ("triton", "cpu", "torch"))
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_stats_lse_and_entropy(self, poisoned, dtype, backend):
        hidden, weight, targets = _inputs(37, 4099, 64, dtype, requires_grad=False)
        ref = selective_logprob_ref(hidden.double(), weight.double(), targets, 1.3, with_stats=True)
        low = selective_logprob_ref(hidden, weight, targets, 1.3, with_stats=True)
        with ops.force_backend(backend, "selective_logprob"):  # with_stats: the backends' (logp, lse, entropy)
            ours = ops._pick("selective_logprob", hidden.device)(hidden, weight, targets, 1.3, with_stats=True)
        for name, x, x_low, x_ref in zip(("logp", "lse", "entropy"), ours, low, ref):
            assert x.dtype == torch.float32
            assert _err(x, x_ref) <= _tol(2, x_low, x_ref), (name, _err(x, x_ref), _err(x_low, x_ref))

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_frozen_weight_forms_no_weight_grad(self, poisoned, monkeypatch, dtype):
        hidden, weight, targets = _inputs(37, 1000, 64, dtype)
        weight.requires_grad_(False)
        calls = []
        mm = torch.mm
        monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or mm(*a, **k))
        _check(_triton, hidden, weight, targets)
        assert not calls, "the weight-gradient GEMM ran for a frozen weight"

    def test_strided_hidden_and_leading_dims(self, poisoned):
        wide = torch.randn(2, 19, 160)
        hidden = wide[..., 16:112].requires_grad_()                                  # (2, 19, 96), row stride 160
        weight = (torch.randn(1000, 96) * 0.2).requires_grad_()
        targets = torch.randint(0, 1000, (2, 19))
        _check(_triton, hidden, weight, targets)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_torch_fallback(self, dtype):
        _check(slp.selective_logprob_torch, *_inputs(37, 4099, 96, dtype), temperature=0.9)

    def test_cpu_dispatch_is_the_cpu_path(self):
        assert ops.backends("selective_logprob", "cpu") == ["cpu", "torch"]
        assert ops._pick("selective_logprob", torch.device("cpu")) is slp.selective_logprob_cpu

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("n,v,h", SHAPES)
    def test_cpu_path_forward_and_grads(self, poisoned, n, v, h, dtype):
        _check(slp.selective_logprob_cpu, *_inputs(n, v, h, dtype), temperature=0.8)

    @pytest.mark.parametrize("keep_bytes", (0, 2**31), ids=("recomputed", "kept"))
    def test_cpu_path_many_vocabulary_chunks(self, poisoned, monkeypatch, keep_bytes):
        """Chunks of 3-4 columns (the last one short), with the logits kept for the backward or recomputed."""
        monkeypatch.setattr(slp, "_CPU_CHUNK_LOGITS", 37 * 3 + 5)
        monkeypatch.setattr(slp, "_CPU_KEEP_BYTES", keep_bytes)
        _check(slp.selective_logprob_cpu, *_inputs(37, 1000, 64, torch.float32), temperature=1.3)

    def test_cpu_path_frozen_weight_and_leading_dims(self, poisoned):
        hidden, weight, targets = _inputs(38, 1000, 64, torch.float32)
        weight.requires_grad_(False)
        _check(slp.selective_logprob_cpu, hidden.detach().view(2, 19, 64).requires_grad_(), weight,
               targets.view(2, 19))

    @pytest.mark.parametrize("temperature", (1.0, 0.7))
    def test_cpu_dispatch_equals_an_fp64_log_softmax_gather(self, temperature):
        """The CPU dispatch against the definition written out here in fp64 (not through selective_logprob_ref),
        forward and gradients, with plain fp32 torch as the yardstick."""
        hidden, weight, targets = _inputs(5, 123, 64, torch.float32)
        grad_out = torch.randn(5)

        def direct(h, w, t, temp):
            return torch.log_softmax((h @ w.t()) / temp, dim=-1)[torch.arange(t.shape[0]), t]

        ref, ref_grads = _grads(direct, hidden.double(), weight.double(), targets, grad_out.double(), temperature)
        low, low_grads = _grads(direct, hidden, weight, targets, grad_out, temperature)
        ours, our_grads = _grads(ops.selective_logprob, hidden, weight, targets, grad_out, temperature)
        assert ours.dtype == torch.float32 and ours.shape == targets.shape
        assert _err(ours, ref) <= _tol(2, low, ref), (_err(ours, ref), _err(low, ref))
        for name, g, g_low, g_ref in zip(("dH", "dW"), our_grads, low_grads, ref_grads):
            assert _err(g, g_ref) <= _tol(3, g_low, g_ref), (name, _err(g, g_ref), _err(g_low, g_ref))

    def test_gpu_config_bounds_the_backward_workspace(self):
        config = gpu_config(10240, 151936, 896, torch.bfloat16, sm_count=132)
        assert 10240 * config.chunk_v * 2 <= 256 * 2**20
        assert config.chunk_v % config.block_v == 0 and config.splits == 7


@pytest.mark.gpu
class TestComparePaths:
    """Triton on the GPU (bf16 on tensor cores, fp32 with IEEE dots) against float64."""

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("n,v,h", SHAPES + [(2048, 151936, 896)])
    def test_triton_cuda(self, n, v, h, dtype):
        _check(_triton, *_inputs(n, v, h, dtype, device="cuda"), temperature=0.9)

    def test_triton_cuda_frozen_weight_and_stats(self):
        hidden, weight, targets = _inputs(1000, 151936, 896, torch.bfloat16, device="cuda")
        weight.requires_grad_(False)
        _check(_triton, hidden, weight, targets)
        ref = selective_logprob_ref(hidden.double(), weight.double(), targets, 1.0, with_stats=True)
        low = selective_logprob_ref(hidden.detach(), weight, targets, 1.0, with_stats=True)
        ours = slp.selective_logprob(hidden, weight, targets, with_stats=True)
        for x, x_low, x_ref in zip(ours, low, ref):
            assert _err(x, x_ref) <= _tol(2, x_low, x_ref)


def test_cpu_path_second_backward_recomputes():
    """The CPU path turns its kept logits into d_logits in place; a retained graph's second backward must
    recompute them and give the same gradients."""
    hidden, weight, targets = _inputs(19, 1000, 64, torch.float32)
    logp = slp.selective_logprob_cpu(hidden, weight, targets, 0.9)
    grad_out = torch.randn(19)
    first = torch.autograd.grad(logp, (hidden, weight), grad_out, retain_graph=True)
    second = torch.autograd.grad(logp, (hidden, weight), grad_out)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
