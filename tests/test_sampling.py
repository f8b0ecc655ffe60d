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


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kw", CASES)
def test_reference_distribution(kw, backend):
    with ops.force_backend(backend, "sample"):
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


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_per_row_steps_draw_each_row_at_its_own_token_index(backend):
    """A batch whose rows draw at different token indices gives, row by row, the draw of that row alone at its
    index: what lets a request join a running batch at any step and keep its tokens. Equal indices for two
    copies of a row give equal draws, different ones (almost surely) not."""
    logits, temperature, top_k, top_p, seeds = _mixed_batch(19, 4099)
    steps = torch.tensor([0, 5, 11, 300, 7] * 4)[:19]
    with ops.force_backend(backend, "sample"):
        tokens, lp = ops.sample(logits, temperature, top_k, top_p, seeds, steps)
        for r in range(19):
            sl = slice(r, r + 1)
            alone = ops.sample(logits[sl], temperature[sl], top_k[sl], top_p[sl], seeds[sl], int(steps[r]))
            assert tokens[r] == alone[0][0] and torch.allclose(lp[r], alone[1][0], atol=1e-6), r
        twice = logits[1:2].expand(64, -1).contiguous()
        ones = torch.ones(64)
        a, _ = ops.sample(twice, ones, torch.zeros(64, dtype=torch.long), ones, seeds[1].repeat(64),
                          torch.arange(64))
        b, _ = ops.sample(twice, ones, torch.zeros(64, dtype=torch.long), ones, seeds[1].repeat(64), 3)
    assert len(set(b.tolist())) == 1 and len(set(a.tolist())) > 1


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


def _cpu_and_ref(args, step, filters=None):
    from omni_fast.kernels.sampling import sample_cpu

    return sample_cpu(*args, step=step, filters=filters), sample_ref(*args, step=step, filters=filters)


def _assert_same_draws(args, steps=(0, 5, 11)):
    for step in steps:
        (tokens, lp), (ref_tokens, ref_lp) = _cpu_and_ref(args, step)
        assert torch.equal(tokens, ref_tokens), (step, tokens, ref_tokens)
        assert torch.equal(lp, ref_lp), (step, (lp - ref_lp).abs().max())


class TestCPUPath:
    """sample_cpu, the CPU dispatch of ops.sample: the reference's tokens and log-probs bit for bit (the same
    hashed noise at the same ids, the same threshold, the same log-softmax)."""

    def test_is_the_cpu_dispatch(self):
        from omni_fast.kernels.sampling import sample_cpu

        assert ops.backends("sample", "cpu") == ["cpu", "torch"]
        assert ops._pick("sample", torch.device("cpu")) is sample_cpu

    @pytest.mark.parametrize("b,v", [(1, 1000), (19, 4099), (7, 151), (12, 151936)])
    def test_mixed_rows_equal_reference(self, b, v):
        """Greedy, plain temperature, top-k, top-k + top-p and top-p-only rows in one batch."""
        _assert_same_draws(_mixed_batch(b, v))

    @pytest.mark.parametrize("top_k,top_p", [(50, 1.0), (1, 1.0), (5, 0.5), (0, 1.0)])
    def test_uniform_settings_equal_reference(self, top_k, top_p):
        logits, _, _, _, seeds = _mixed_batch(9, 3001, seed=3)
        args = (logits, torch.full((9,), 0.8), torch.full((9,), top_k), torch.full((9,), top_p), seeds)
        _assert_same_draws(args)
        (tokens, _), _ = _cpu_and_ref(args, 2, filters=(top_k, top_p < 1, False))
        assert torch.equal(tokens, sample_ref(*args, step=2)[0])

    def test_ties_at_the_top_k_boundary(self):
        """Integer logits: many tokens tie with the k-th, all of them kept (more than the k candidates)."""
        g = torch.Generator().manual_seed(4)
        logits = torch.randint(0, 4, (8, 997), generator=g).float()
        top_k = torch.tensor([3, 5, 1, 50, 3, 5, 1, 50])
        top_p = torch.tensor([1.0, 0.9, 1.0, 0.7, 1.0, 1.0, 0.5, 1.0])
        args = (logits, torch.ones(8), top_k, top_p, torch.arange(8) * 31 + 7)
        _assert_same_draws(args, steps=range(6))

    def test_top_p_nucleus_wider_than_the_first_candidates(self):
        """A nearly flat distribution: the 0.9 nucleus holds most of the vocabulary, past the first topk."""
        g = torch.Generator().manual_seed(5)
        logits = torch.randn(4, 20011, generator=g) * 0.05
        args = (logits, torch.ones(4), torch.zeros(4, dtype=torch.long), torch.tensor([0.9, 0.99, 0.3, 1.0]),
                torch.arange(4) + 100)
        _assert_same_draws(args)

    def test_large_and_negative_logits(self):
        logits, t, k, p, seeds = _mixed_batch(10, 2003, seed=6)
        _assert_same_draws((logits * 200 - 50, t, k, p, seeds))

    def test_nucleus_threshold_differs_only_at_rounding_boundaries(self):
        """The one place the CPU path is not the reference's arithmetic: a top-p-only row's probabilities are
        exp(x - logsumexp) instead of a softmax of the sorted row. Wherever the thresholds differ, the
        reference's mass before the boundary token must be within 1e-5 of top_p."""
        from omni_fast.kernels.sampling import _candidate_threshold, batch_filters

        g = torch.Generator().manual_seed(7)
        logits = torch.randn(64, 5000, generator=g) * 2
        top_p = torch.rand(64, generator=g) * 0.98 + 0.01
        top_k = torch.zeros(64, dtype=torch.long)
        t = torch.ones(64, 1)
        thr, _ = _candidate_threshold(logits, logits / t, t, top_k, top_p, batch_filters(top_k, top_p))
        ref = keep_threshold(logits, torch.ones(64), top_k, top_p)
        probs = torch.softmax(logits.double(), dim=1)
        for r in (thr != ref).nonzero()[:, 0].tolist():
            lo = min(thr[r], ref[r])
            before = probs[r][logits[r] > lo].sum()
            assert abs(before - top_p[r]) < 1e-5, (r, before, top_p[r])
        assert (thr == ref).float().mean() > 0.9

    def test_equal_scores_pick_the_smallest_id(self):
        """Two kept tokens with the same logit and the same hashed noise (a collision of the 24-bit uniform):
        their scores tie exactly and the reference's argmax takes the smaller id, whatever order topk
        returned them in."""
        from omni_fast.kernels.sampling import uniform_noise_ref

        v = 30011
        u = uniform_noise_ref(torch.tensor([12345]), 0, v)[0]
        values, order = u.sort()
        same = (values[1:] == values[:-1]).nonzero()[:, 0]
        assert same.numel(), "no collision in this vocabulary"
        i, j = sorted(order[same[0]:same[0] + 2].tolist())
        logits = torch.full((1, v), -10.0)
        logits[0, [i, j]] = 5.0
        args = (logits, torch.ones(1), torch.tensor([2]), torch.ones(1), torch.tensor([12345]))
        (tokens, _), (ref_tokens, _) = _cpu_and_ref(args, 0)
        assert ref_tokens.item() == i and tokens.item() == i
