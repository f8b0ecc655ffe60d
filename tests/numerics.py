"""The tolerance rule of STYLE.md: our low-precision result may be at most `factor` times as far from the
fp64 reference as plain torch in the same low precision is.

In fp32 torch's own error is about one ulp, the size of the differences that the order of a reduction alone
makes between two correct implementations; so the baseline is never taken below one fp32 ulp of the output's
scale (eps_fp32 * max|ref|, as test_selective_logprob floors it), whatever the output dtype. In bf16/fp16
torch's rounding error is far above that floor and the rule applies as is: the floor is not taken in the
low-precision eps, which (4 * eps_fp16 = 0.4%) would let a 0.3% error in an fp16 output pass.
"""
import torch


def fp64(t):
    return t.double() if torch.is_tensor(t) and t.is_floating_point() else t


def assert_within_torch_error(ours: torch.Tensor, torch_lowp: torch.Tensor, ref64: torch.Tensor, factor: float = 2.0):
    assert ours.shape == ref64.shape, (ours.shape, ref64.shape)
    assert ours.dtype == torch_lowp.dtype, (ours.dtype, torch_lowp.dtype)
    err = (ours.double() - ref64).abs().max().item()
    floor = torch.finfo(torch.float32).eps * ref64.abs().max().item()
    base = max((torch_lowp.double() - ref64).abs().max().item(), floor)
    assert err <= factor * base, f"error {err:.3g} > {factor} x torch's {base:.3g}"
