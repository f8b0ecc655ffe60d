"""group_advantages on every backend against the float64 reference: error <= 2x that of torch in float32
(floored at one fp32 rounding of the output scale), identical-reward groups exactly 0, bad input rejected."""
import itertools
import math
import os

import pytest
import torch

from omni_fast import ops
from omni_fast.grpo.advantage import group_advantages
from omni_fast.kernels.group_advantage import group_advantage_ref

SCALES = ("group", "batch", "none")
CASES = list(itertools.product((1, 2), (2, 8, 16), SCALES))              # (K, G, scale)


def _backends(device):
    return [b for b in ("cuda", "cpu", "triton", "torch") if b == "triton" or b in ops.backends("group_advantage", device)]


def _run(backend, rewards, group_size, scale):
    with ops.force_backend(backend, "group_advantage"):
        return group_advantages(rewards, group_size, scale=scale)


def _rewards(k, n_groups, group_size, device="cpu"):
    rewards = torch.rand(k, n_groups * group_size, device=device) * 2 - 0.5
    return rewards[0] if k == 1 else rewards


def _check(backend, rewards, group_size, scale):
    ours = _run(backend, rewards, group_size, scale)
    ref = group_advantage_ref(rewards.double(), group_size, scale=scale)
    low = group_advantage_ref(rewards.float(), group_size, scale=scale)
    err, err_low = ((x.double() - ref).abs().max().item() for x in (ours, low))
    floor = torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert err <= 2 * max(err_low, floor), (backend, err, err_low)


class TestReferencePath:
    """The C++ CPU op, Triton under the interpreter and the torch reference, on CPU tensors."""

    @pytest.mark.parametrize("backend", _backends("cpu"))
    @pytest.mark.parametrize("k,group_size,scale", CASES)
    def test_matches_reference(self, backend, k, group_size, scale):
        _check(backend, _rewards(k, 19, group_size), group_size, scale)

    @pytest.mark.parametrize("backend", _backends("cpu"))
    @pytest.mark.parametrize("group_size", (2, 6, 8, 16))
    @pytest.mark.parametrize("scale", SCALES)
    def test_identical_rewards_give_exactly_zero(self, backend, group_size, scale):
        rewards = torch.rand(2, 7 * group_size) * 3
        rewards[:, 2 * group_size:3 * group_size] = rewards[:, 2 * group_size:2 * group_size + 1]  # group 2: equal
        ours = _run(backend, rewards, group_size, scale)
        assert torch.all(ours[2 * group_size:3 * group_size] == 0)
        assert torch.isfinite(ours).all()

    @pytest.mark.parametrize("backend", _backends("cpu"))
    def test_r1_omni_rewards(self, backend):
        """Accuracy + format rewards in {0, 1}: sums in {0, 1, 2}, including all-0 and all-2 groups."""
        rewards = torch.randint(0, 2, (2, 16 * 8)).float()
        rewards[:, :8] = 0
        rewards[:, 8:16] = 1
        _check(backend, rewards, 8, "group")
        ours = _run(backend, rewards, 8, "group")
        assert torch.all(ours[:16] == 0)

    @pytest.mark.parametrize("backend", _backends("cpu"))
    @pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16), ids=str)
    def test_other_reward_dtypes_give_float32(self, backend, dtype):
        rewards = _rewards(2, 5, 8).to(dtype)
        ours = _run(backend, rewards, 8, "group")
        ref = group_advantage_ref(rewards.double(), 8)
        assert ours.dtype == torch.float32
        assert (ours.double() - ref).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * ref.abs().max()

    @pytest.mark.parametrize("backend", _backends("cpu"))
    @pytest.mark.parametrize("k,group_size", [(1, 2), (1, 8), (2, 5), (3, 16)])
    def test_group_scale_equals_the_formula_in_python(self, backend, k, group_size):
        """Independent of group_advantage_ref: the default scale="group" is (r - mean_g) / (std_g + eps), std
        unbiased (N - 1), r the rewards summed over K, computed here in Python floats."""
        rewards = torch.rand(k, 6 * group_size) * 2 - 0.5
        summed = [sum(float(rewards[j, i]) for j in range(k)) for i in range(rewards.shape[1])]
        expected = []
        for g0 in range(0, len(summed), group_size):
            group = summed[g0:g0 + group_size]
            mean = sum(group) / group_size
            std = math.sqrt(sum((v - mean) ** 2 for v in group) / (group_size - 1))
            expected += [(v - mean) / (std + 1e-4) for v in group]
        with ops.force_backend(backend, "group_advantage"):
            ours = group_advantages(rewards[0] if k == 1 else rewards, group_size)
        expected = torch.tensor(expected, dtype=torch.float64)
        err = (ours.double() - expected).abs().max().item()
        assert err <= 1e-5 * expected.abs().max().item(), (backend, err)

    def test_batch_and_none_definitions(self):
        rewards = _rewards(1, 4, 8)
        centred = rewards - rewards.view(-1, 8).mean(1).repeat_interleave(8)
        torch.testing.assert_close(group_advantages(rewards, 8, scale="none"), centred)
        torch.testing.assert_close(group_advantages(rewards, 8, scale="batch"), centred / (rewards.std() + 1e-4))

    @pytest.mark.parametrize("bad", [
        dict(rewards=torch.rand(10), group_size=4),                           # 10 not a multiple of 4
        dict(rewards=torch.rand(8), group_size=1),                            # a group of 1 has no std
        dict(rewards=torch.rand(8), group_size=4, scale="global"),            # unknown scale
        dict(rewards=torch.ones(8, dtype=torch.int64), group_size=4),         # not float
        dict(rewards=torch.rand(2, 2, 8), group_size=4),                      # 3-D
    ])
    def test_rejects_bad_input(self, bad):
        with pytest.raises((ValueError, TypeError)):
            group_advantages(**bad)

    def test_native_cpu_op_is_built_and_registered(self):
        if os.environ.get("OMNI_FAST_NO_EXT") == "1":
            pytest.skip("built without the native extension")
        assert "cpu" in ops.backends("group_advantage", "cpu")
        from omni_fast.kernels import native
        torch.library.opcheck(native.group_advantage, (torch.rand(2, 24), 8, 1e-4, "group"))
        torch.library.opcheck(native.group_advantage, (torch.rand(1, 24), 4, 1e-4, "batch"))

    def test_native_cpu_op_checks_name_the_tensor(self):
        if "cpu" not in ops.backends("group_advantage", "cpu"):
            pytest.skip("built without the native extension")
        from omni_fast.kernels import native
        with pytest.raises(RuntimeError, match="rewards"):
            native.group_advantage(torch.rand(2, 3, 8), 4, 1e-4, "group")


@pytest.mark.gpu
class TestComparePaths:
    """The CUDA op and Triton on the GPU against the same reference."""

    @pytest.mark.parametrize("backend", ("cuda", "triton"))
    @pytest.mark.parametrize("k,group_size,scale", CASES)
    def test_matches_reference(self, backend, k, group_size, scale):
        assert backend in ops.backends("group_advantage", "cuda"), f"{backend} not available on CUDA"
        _check(backend, _rewards(k, 19, group_size, "cuda"), group_size, scale)

    @pytest.mark.parametrize("backend", ("cuda", "triton"))
    @pytest.mark.parametrize("scale", SCALES)
    def test_million_rewards(self, backend, scale):
        rewards = _rewards(2, 2**20 // 8, 8, "cuda")
        _check(backend, rewards, 8, scale)

    @pytest.mark.parametrize("backend", ("cuda", "triton"))
    @pytest.mark.parametrize("group_size", (6, 8, 64, 3000))
    def test_identical_rewards_and_odd_group_sizes(self, backend, group_size):
        rewards = torch.rand(2, 5 * group_size, device="cuda")
        rewards[:, :group_size] = math.pi
        ours = _run(backend, rewards, group_size, "group")
        assert torch.all(ours[:group_size] == 0)
        _check(backend, rewards[:, group_size:], group_size, "group")
