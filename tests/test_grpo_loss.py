"""The GRPO loss against a loop-based reference written from the reference trainer's formulas, its
gradient direction, and the fused path (log-probs straight from the LM head)."""
import itertools
import math

import pytest
import torch

from omni_fast import ops
from omni_fast.grpo.loss import NORMALIZERS, LossOutput, grpo_loss, k3_kl
from omni_fast.kernels.selective_logprob import selective_logprob_ref

EOS = 151645


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """float [B, T]: 1 at positions up to and including the first EOS of each row, 0 after; all 1 without EOS
    (masks of ragged lengths for these tests; the trainer's mask comes from the completion lengths)."""
    is_eos = completion_ids == eos_token_id                                             # (B, T)
    length = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), length)                  # (B,)
    positions = torch.arange(length, device=completion_ids.device)
    return (positions[None, :] <= first[:, None]).to(torch.float32)


def fused_grpo_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, completion_ids: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                    **loss_kwargs) -> LossOutput:
    """Policy log-probs straight from the LM head (ops.selective_logprob, no [B*T, V] logits) into grpo_loss:
    hidden [B, T, H] already shifted to predict completion_ids [B, T]."""
    logp = ops.selective_logprob(hidden, lm_head_weight, completion_ids, temperature)   # (B, T) fp32
    return grpo_loss(logp, advantages, mask, **loss_kwargs)


def _loop_loss(logp, adv, mask, ref, old, beta, eps_low, eps_high, loss_type, max_len, num_items):
    """One token at a time, in Python floats."""
    batch, length = len(logp), len(logp[0])
    per_sequence, total, count, clipped = [], 0.0, 0, 0
    for b in range(batch):
        seq_sum, seq_count = 0.0, 0
        for t in range(length):
            if not mask[b][t]:
                continue
            lp, a = logp[b][t], adv[b]
            if old is None:
                objective = a                                       # exp(lp - lp) * a
            else:
                ratio = math.exp(lp - old[b][t])
                objective = min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a)
                clipped += (ratio < 1 - eps_low and a < 0) or (ratio > 1 + eps_high and a > 0)
            if beta and ref is not None:
                d = ref[b][t] - lp
                objective -= beta * (math.exp(d) - d - 1)
            seq_sum -= objective
            seq_count += 1
        per_sequence.append(seq_sum / max(seq_count, 1))
        total, count = total + seq_sum, count + seq_count
    loss = {"grpo": sum(per_sequence) / batch, "bnpo": total / max(count, 1),
            "dr_grpo": total / (batch * (max_len or length)), "dapo": total / (num_items or count)}[loss_type]
    return loss, clipped / max(count, 1)


def _batch(batch=6, length=11):
    logp = -torch.rand(batch, length) * 3
    ref = logp + torch.randn(batch, length) * 0.3
    old = logp + torch.randn(batch, length) * 0.3
    ids = torch.randint(0, 1000, (batch, length))
    for b, position in enumerate((3, 0, length - 1, 5)):                  # rows 4, 5: no EOS
        ids[b, position] = EOS
    ids[0, 7] = EOS                                                         # a second EOS is ignored
    advantages = torch.randn(batch)
    return logp, advantages, completion_mask(ids, EOS), ref, old


def test_completion_mask_up_to_and_including_the_first_eos():
    ids = torch.tensor([[5, 7, EOS, 3, EOS], [1, 2, 3, 4, 5], [EOS, 1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(completion_mask(ids, EOS), expected)


def test_k3_kl_is_nonnegative_and_zero_at_ref():
    logp, ref = -torch.rand(100) * 5, -torch.rand(100) * 5
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.all(k3_kl(logp, logp) == 0)


@pytest.mark.parametrize("logp,ref", [(-1.0, -3.0), (-3.0, -1.0), (-0.5, -0.25), (-2.0, -0.1), (-0.1, -4.0)])
def test_k3_kl_exact_values(logp, ref):
    """k3 is exp(ref - logp) - (ref - logp) - 1, ref minus policy: not symmetric, so the sign matters."""
    d = ref - logp
    expected = math.exp(d) - d - 1
    swapped = math.exp(-d) + d - 1
    assert abs(expected - swapped) > 1e-3                                   # the pairs tell the two orders apart
    out = k3_kl(torch.tensor([logp], dtype=torch.float64), torch.tensor([ref], dtype=torch.float64)).item()
    assert out == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("beta", (0.04, 0.3))
@pytest.mark.parametrize("loss_type", sorted(NORMALIZERS))
@pytest.mark.parametrize("clipped,with_ref", list(itertools.product((False, True), (False, True))))
def test_loss_equals_loop_reference(loss_type, clipped, with_ref, beta):
    logp, advantages, mask, ref, old = (x.double() for x in _batch())
    kwargs = dict(ref_logp=ref if with_ref else None, old_logp=old if clipped else None, beta=beta,
                  eps_low=0.2, eps_high=0.28, loss_type=loss_type, max_completion_length=16,
                  num_items_in_batch=41 if loss_type == "dapo" else None)
    out = grpo_loss(logp, advantages, mask, **kwargs)
    expected, clip_ratio = _loop_loss(logp.tolist(), advantages.tolist(), mask.tolist(),
                                      ref.tolist() if with_ref else None, old.tolist() if clipped else None,
                                      beta, 0.2, 0.28, loss_type, 16, kwargs["num_items_in_batch"])
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out.clip_ratio.item() == pytest.approx(clip_ratio, abs=1e-12)
    if with_ref:
        kl = _loop_loss(logp.tolist(), [0.0] * len(ref), mask.tolist(), ref.tolist(), None, 1.0, 0, 0,
                        "grpo", None, None)[0]                  # A = 0, beta = 1: the per-sequence mean of k3
        assert out.kl.item() == pytest.approx(kl, rel=1e-12)


def test_reference_form_defaults():
    """R1-Omni: beta 0.04, no old log-probs, per-sequence mean; the value is -mean_b A_b + beta * KL term."""
    logp, advantages, mask, ref, _ = (x.double() for x in _batch())
    out = grpo_loss(logp, advantages, mask, ref_logp=ref)
    kl = ((k3_kl(logp, ref) * mask).sum(1) / mask.sum(1)).mean()
    assert out.loss.item() == pytest.approx((-advantages.mean() + 0.04 * kl).item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", sorted(NORMALIZERS))
def test_gradient_raises_logp_of_positive_advantage_tokens(loss_type):
    logp, advantages, mask, ref, old = _batch()
    advantages[0], advantages[1] = 1.0, -1.0
    logp.requires_grad_()
    loss = grpo_loss(logp, advantages, mask, ref_logp=logp.detach(), loss_type=loss_type).loss
    (grad,) = torch.autograd.grad(loss, logp)
    ascent = -grad * advantages[:, None].sign()                             # > 0: logp moves with the sign of A
    assert (ascent[mask.bool()] > 0).all()
    assert torch.all(grad[~mask.bool()] == 0)


def test_fused_path_moves_each_token_with_its_advantage():
    """Through the LM head: a small step on the hidden states raises logp exactly where A > 0 (each token's
    logp depends on its own hidden row only, so the first-order change is lr * A_t * w_t * |dlogp_t/dh_t|^2)."""
    batch, length, hidden_size, vocab = 4, 9, 64, 1000
    hidden = torch.randn(batch, length, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size) * 0.25
    ids = torch.randint(0, vocab - 1, (batch, length))
    ids[0, 4] = vocab - 1
    mask = completion_mask(ids, vocab - 1)
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    with ops.force_backend("triton", "selective_logprob"):
        out = fused_grpo_loss(hidden, weight, ids, advantages, mask, beta=0.0)
        (grad,) = torch.autograd.grad(out.loss, hidden)
        before = ops.selective_logprob(hidden.detach(), weight, ids)
        after = ops.selective_logprob(hidden.detach() - 1e-2 * grad, weight, ids)
    change = (after - before) * advantages[:, None].sign()
    assert (change[mask.bool()] > 0).all()
    assert torch.all(change[~mask.bool()] == 0)


def _unfused(hidden, weight, ids, advantages, mask, ref):
    """torch: full logits -> log_softmax -> gather -> grpo_loss, in the dtype of hidden and weight."""
    h, w = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    logp = selective_logprob_ref(h.view(-1, h.shape[-1]), w, ids.view(-1)).view(ids.shape)
    out = grpo_loss(logp, advantages.to(logp.dtype), mask, ref_logp=ref.to(logp.dtype))
    return out.loss, torch.autograd.grad(out.loss, (h, w))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_fused_path_equals_unfused(dtype):
    """Loss and gradients of the fused path vs float64: error <= 2x (loss) / 3x (grads) that of torch's unfused
    path in the same dtype, floored at one fp32 rounding of the output scale (as test_selective_logprob)."""
    batch, length, hidden_size, vocab = 3, 7, 96, 1000
    hidden = torch.randn(batch, length, hidden_size).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) * 0.2).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, (batch, length))
    mask = completion_mask(ids, 5)
    advantages = torch.randn(batch)
    policy = selective_logprob_ref(hidden.detach().double().view(-1, hidden_size), weight.detach().double(),
                                   ids.view(-1)).view(batch, length)
    ref = (policy + 0.1 * torch.randn(batch, length)).float()           # a reference model near the policy
    with ops.force_backend("triton", "selective_logprob"):
        fused = fused_grpo_loss(hidden, weight, ids, advantages, mask, ref_logp=ref)
    grads = torch.autograd.grad(fused.loss, (hidden, weight))
    ref_loss, ref_grads = _unfused(hidden.double(), weight.double(), ids, advantages, mask, ref)
    low_loss, low_grads = _unfused(hidden, weight, ids, advantages, mask, ref)
    for factor, ours, low, exact in [(2, fused.loss, low_loss, ref_loss), *zip((3, 3), grads, low_grads, ref_grads)]:
        err, err_low = ((x.double() - exact).abs().max().item() for x in (ours, low))
        assert err <= factor * max(err_low, torch.finfo(torch.float32).eps * exact.abs().max().item()), (err, err_low)


def test_unknown_loss_type_is_rejected():
    logp, advantages, mask, _, _ = _batch()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, advantages, mask, loss_type="ppo")


@pytest.mark.parametrize("loss_type", sorted(NORMALIZERS))
def test_step_totals_make_any_split_equal_the_whole_batch(loss_type):
    """sum over micro-batches of grpo_loss(micro, the step's totals) == grpo_loss(whole step batch), for
    micro-batches of unequal sizes and token counts (what lets any per-device batch / accumulation split give
    the same update)."""
    logp, advantages, mask, ref, old = (x.double() for x in _batch(batch=7, length=9))
    mask[4, 3:] = 0                                                          # ragged token counts
    tokens = float(mask.sum())
    kw = dict(beta=0.3, loss_type=loss_type, max_completion_length=12, num_items_in_batch=tokens)
    whole = grpo_loss(logp, advantages, mask, ref_logp=ref, **kw).loss
    total = 0.0
    for lo, hi in ((0, 1), (1, 4), (4, 7)):
        total += grpo_loss(logp[lo:hi], advantages[lo:hi], mask[lo:hi], ref_logp=ref[lo:hi], num_sequences=7,
                           **kw).loss
    assert float(total) == pytest.approx(float(whole), rel=1e-12)
