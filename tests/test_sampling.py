"""Sampling: distributions of the reference, the Triton kernel equal to the reference draw for draw, thresholds."""
import pytest
import torch

from omni_fast import ops
from omni_fast.kernels.sampling import keep_threshold, sample_ref

N_DRAWS = 6000
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.8, 1.2])


def _draw(logits_row, temperature=1.0, top_k=0, top_p=1.0, n=N_DRAWS):
    logits = logits_row[None].expand(n, -1).contiguous()
    ones = torch.ones(n)
    return ops.sample(logits, ones * temperature, (ones * top_k).long(), ones * top_p,
                      torch.arange(n) * 7919 + 11, 3)


def _expected(logits, temperature=1.0, top_k=0, top_p=1.0):
    """HF's warper order written out: temperature, top-k, top-p over the renormalised survivors."""
    scaled = logits.double() / temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if top_k:
        keep &= scaled >= scaled.topk(top_k).values[-1]
    if top_p < 1:
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), 0)
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]
        nucleus = torch.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
    probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), 0)
    return probs


CASES = [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0), dict(top_k=4), dict(top_p=0.7),
         dict(temperature=1.5, top_k=6, top_p=0.9)]


@pytest.mark.parametrize("kw", CASES)
def test_reference_distribution(kw):
    tokens, logprobs = _draw(LOGITS, **kw)
    freq = torch.bincount(tokens, minlength=10).double() / N_DRAWS
    expected = _expected(LOGITS, **kw)
    sigma = (expected * (1 - expected) / N_DRAWS).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (freq, expected)
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn
    t = kw.get("temperature", 1.0)
    assert torch.allclose(logprobs, torch.log_softmax(LOGITS / t, 0)[tokens], atol=1e-6)


def _mixed_batch(b, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, v, generator=g) * 3
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3] * b)[:b]
    top_k = torch.tensor([0, 0, 50, 5, 0, 1] * b)[:b]
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.3] * b)[:b]
    return logits, temperature, top_k, top_p, torch.randint(0, 2**62, (b,), generator=g)


@pytest.mark.parametrize("b,v", [(1, 1000), (19, 4099), (7, 151)])
def test_triton_equals_reference_draw_for_draw(b, v):
    args = _mixed_batch(b, v)
    ref_tokens, ref_lp = sample_ref(*args, step=5)
    with ops.force_backend("triton", "sample"):
        tokens, lp = ops.sample(*args, step=5)
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(lp, ref_lp, atol=1e-5)


@pytest.mark.parametrize("kw", [CASES[1], CASES[5]])
def test_triton_distribution(kw):
    with ops.force_backend("triton", "sample"):
        tokens, _ = _draw(LOGITS, n=1500, **kw)
    freq = torch.bincount(tokens, minlength=10).double() / 1500
    expected = _expected(LOGITS, **kw)
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / 1500).sqrt() + 1e-12).all()


def test_threshold_semantics():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]] * 4 + [[0.0, 0.0, 0.0, 5.0]])
    thr = keep_threshold(logits, torch.ones(5), torch.tensor([2, 0, 0, 2, 0]),
                         torch.tensor([1.0, 0.6, 0.7, 0.6, 1.0]))
    p = torch.softmax(logits[0], 0)  # 0.644, 0.087, 0.237, 0.032
    assert thr[0] == 2.0  # top-2 keeps 3.0 and 2.0
    assert thr[1] == 3.0  # 3.0 alone already has 0.644 >= 0.6
    assert p[0] < 0.7 and thr[2] == 2.0  # 0.644 < 0.7: the next token joins the nucleus
    assert thr[3] == 3.0  # top-2 first, then renormalised: 3.0 holds 0.73 >= 0.6 of the survivors' mass
    assert thr[4] == float("-inf")


def test_greedy_rows_beside_sampled_rows():
    logits = torch.randn(4, 50)
    tokens, logprobs = ops.sample(logits, torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long),
                                  torch.ones(4), torch.arange(4), 0)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.allclose(logprobs[0], torch.log_softmax(logits[0], 0).max())


@pytest.mark.gpu
@pytest.mark.parametrize("b,v", [(8, 151936), (256, 151936), (3, 1000)])
def test_gpu_kernel_equals_reference(b, v):
    args = [a.cuda() for a in _mixed_batch(b, v)]
    ref_tokens, ref_lp = sample_ref(*args, step=11)
    tokens, lp = ops.sample(*args, step=11)
    assert (tokens == ref_tokens).float().mean() == 1.0
    assert torch.allclose(lp, ref_lp, atol=1e-4)
