"""silu(gate) * up from the packed projection vs torch, fp64 reference."""
import pytest
import torch

from numerics import assert_within_torch_error, fp64
from omni_fast import ops
from omni_fast.kernels.silu_mul import silu_mul_ref


def _check(shape, dtype, device):
    gate_up = (torch.randn(*shape, device=device) * 3).to(dtype)
    out = ops.silu_mul(gate_up)
    assert_within_torch_error(out, silu_mul_ref(gate_up), silu_mul_ref(fp64(gate_up)))


@pytest.mark.parametrize("shape", [(1, 2), (37, 2 * 1000), (3, 5, 2 * 123), (2, 2 * 4864)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter(shape, dtype):
    with ops.force_backend("triton", "silu_mul"):
        _check(shape, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 2 * 4864), (8192, 2 * 4864), (3, 2 * 123)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu(shape, dtype):
    _check(shape, dtype, "cuda")
