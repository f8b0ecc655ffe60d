"""The shared-prefix forward (omni_fast.grpo.logprobs) against the naive per-row forward, which is itself
checked against the definition (one forward per token).

The test decoder is made sensitive on purpose: weights of std 0.2 (not random_decoder's 0.02, under which
attention is nearly uniform and a wrong mask or position barely moves the output), head_dim 16 with RoPE
base 1e4 (its fastest pair turns 1 rad per position), GQA 4:2 (so a wrong KV-head mapping shows), a vocabulary
of 97 and an untied-head variant. `test_single_point_bugs_are_detected` runs the comparison against
deliberately broken versions and requires each to miss by far more than the tolerance.
"""
import copy

import pytest
import torch

from numerics import assert_within_torch_error
from omni_fast.grpo import logprobs
from omni_fast.grpo.logprobs import (completion_logprobs, naive_completion_logprobs, packed_positions,
                                     shared_prefix_mask)
from omni_fast.testing import random_decoder

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=97, mm_hidden_size=8, rope_theta=1e4)
PREFIX_LENS, GROUP, WIDTH = (7, 13, 5), 4, 11
LENGTHS = [0, 11, 3, 5, 11, 1, 7, 2, 9, 10, 4, 6]  # a 0, full rows, ragged; (B*G,) = (12,)


def _decoder(tied: bool = True, seed: int = 0) -> torch.nn.Module:
    lm = random_decoder(dict(SHAPE, tie_word_embeddings=tied), seed=seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.2)
    return lm


@pytest.fixture(scope="module")
def lm():
    return _decoder()


def _batch(prefix_lens=PREFIX_LENS, group=GROUP, width=WIDTH, lengths=LENGTHS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    prefixes = [torch.randn(p, SHAPE["hidden_size"], generator=gen) for p in prefix_lens]
    completions = torch.randint(0, SHAPE["vocab_size"], (len(prefix_lens) * group, width), generator=gen)
    return prefixes, completions, torch.tensor(lengths)


def _with_grads(fn, lm, prefixes, completions, lengths, group, upstream, temperature=1.0):
    """fn's values and its gradients w.r.t. every prefix and every parameter for one upstream gradient."""
    prefixes = [p.detach().clone().requires_grad_() for p in prefixes]
    out = fn(lm, prefixes, completions, lengths, group, temperature)
    leaves = prefixes + list(lm.parameters())
    return out.detach(), torch.autograd.grad(out, leaves, upstream.to(out.dtype))


def test_decoder_is_fp32_gqa():
    lm = _decoder()
    assert lm.model.embed_tokens.weight.dtype == torch.float32
    cfg = lm.config
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (16, 4, 2)


def test_packed_positions_exact():
    got = packed_positions((3, 1), group_size=2, width=2)
    #                       prefix 0   prefix 1  group 0 rows    group 1 rows
    assert got.tolist() == [0, 1, 2] + [0] + [3, 4, 3, 4] + [1, 2, 1, 2]
    assert got.dtype == torch.int64


def test_shared_prefix_mask_exact():
    expected = [[1, 1, 1, 1, 0],   # query 0: the 3 prefix keys and itself
                [1, 1, 1, 1, 1]]
    assert shared_prefix_mask(3, 2).int().tolist() == expected
    assert shared_prefix_mask(2, 0).shape == (0, 2)


def test_naive_is_the_definition(lm):
    """naive_completion_logprobs against one forward per token: log_softmax(lm(prefix + c[:t])[-1] / T)[c[t]]."""
    prefixes, completions, lengths = _batch(prefix_lens=(4, 6), group=2, width=5, lengths=[5, 0, 2, 4])
    temperature = 0.7
    with torch.no_grad():
        naive = naive_completion_logprobs(lm, prefixes, completions, lengths, 2, temperature)
        expected = torch.zeros_like(naive)
        for r in range(completions.shape[0]):
            for t in range(int(lengths[r])):
                embeds = torch.cat((prefixes[r // 2], lm.embed(completions[r, :t])))
                logits = lm(embeds[None])[0, -1] / temperature
                expected[r, t] = torch.log_softmax(logits, -1)[completions[r, t]]
    assert (naive - expected).abs().max() <= 1e-5
    assert (naive != 0).sum() == lengths.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("prefix_lens,group,width,lengths", [
    (PREFIX_LENS, GROUP, WIDTH, LENGTHS),
    ((1, 9), 3, 6, [6, 0, 1, 6, 5, 2]),    # a one-token prefix: the first predictor is position 0
    ((3, 2), 2, 1, [1, 0, 1, 1]),          # C = 1: only the prefixes are fed
])
def test_values_and_gradients_match_naive(lm, temperature, prefix_lens, group, width, lengths):
    """fp32 vs the fp64 naive forward: within 2x (values) / 3x (gradients) of the fp32 naive forward's error."""
    prefixes, completions, lengths = _batch(prefix_lens, group, width, lengths)
    upstream = torch.randn(completions.shape)
    ours, ours_grads = _with_grads(completion_logprobs, lm, prefixes, completions, lengths, group, upstream,
                                   temperature)
    naive, naive_grads = _with_grads(naive_completion_logprobs, lm, prefixes, completions, lengths, group,
                                     upstream, temperature)
    lm64 = copy.deepcopy(lm).double()
    ref, ref_grads = _with_grads(naive_completion_logprobs, lm64, [p.double() for p in prefixes], completions,
                                 lengths, group, upstream.double(), temperature)
    assert ours.dtype == torch.float32 and ours.shape == completions.shape
    assert (ours - naive).abs().max() <= 1e-5
    assert_within_torch_error(ours, naive, ref.double())
    names = [f"prefixes[{i}]" for i in range(len(prefixes))] + [n for n, _ in lm.named_parameters()]
    for name, g, g_naive, g_ref in zip(names, ours_grads, naive_grads, ref_grads, strict=True):
        assert g_ref.abs().max() > 0, name  # every leaf takes part
        try:
            assert_within_torch_error(g, g_naive, g_ref, factor=3.0)
        except AssertionError as e:
            raise AssertionError(f"gradient of {name}: {e}") from None


def test_temperature_is_applied(lm):
    prefixes, completions, lengths = _batch()
    with torch.no_grad():
        cold = completion_logprobs(lm, prefixes, completions, lengths, GROUP, 0.7)
        plain = completion_logprobs(lm, prefixes, completions, lengths, GROUP)
        naive = naive_completion_logprobs(lm, prefixes, completions, lengths, GROUP, 0.7)
    assert (cold - naive).abs().max() <= 1e-5
    assert (cold - plain).abs().max() > 0.1


def test_zero_past_lengths_and_pad_ids_do_not_matter(lm):
    prefixes, completions, lengths = _batch()
    upstream = torch.randn(completions.shape)
    pad = torch.arange(WIDTH)[None, :] >= lengths[:, None]                             # (B*G, C)
    repadded = torch.where(pad, (completions + 1 + torch.arange(WIDTH)) % SHAPE["vocab_size"], completions)
    assert (repadded != completions)[pad].all()
    out, grads = _with_grads(completion_logprobs, lm, prefixes, completions, lengths, GROUP, upstream)
    out2, grads2 = _with_grads(completion_logprobs, lm, prefixes, repadded, lengths, GROUP, upstream)
    assert (out[pad] == 0).all() and not out[pad].signbit().any() and (out[~pad] < 0).all()  # +0, not logp * 0
    assert (out - out2).abs().max() <= 1e-6
    for g, g2 in zip(grads, grads2, strict=True):
        assert (g - g2).abs().max() <= 1e-6 * max(1.0, g.abs().max().item())


def test_lengths_as_list_and_no_grad(lm):
    prefixes, completions, lengths = _batch()
    with torch.no_grad():  # the reference model's call
        as_tensor = completion_logprobs(lm, prefixes, completions, lengths, GROUP)
        as_list = completion_logprobs(lm, prefixes, completions, LENGTHS, GROUP)
    assert torch.equal(as_tensor, as_list)


def test_untied_head_is_used():
    lm = _decoder(tied=False)
    prefixes, completions, lengths = _batch()
    with torch.no_grad():
        ours = completion_logprobs(lm, prefixes, completions, lengths, GROUP)
        naive = naive_completion_logprobs(lm, prefixes, completions, lengths, GROUP)
    assert (ours - naive).abs().max() <= 1e-5


def test_prefix_computed_once_per_group(lm):
    """The decoder runs once, over sum(P_b) + B*G*(C-1) tokens (each completion's last token only a target)."""
    prefixes, completions, lengths = _batch()
    seen, embedded = [], []
    hooks = [lm.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape))),
             lm.model.embed_tokens.register_forward_hook(lambda m, args, out: embedded.append(args[0].numel()))]
    try:
        with torch.no_grad():
            completion_logprobs(lm, prefixes, completions, lengths, GROUP)
    finally:
        for h in hooks:
            h.remove()
    rows = len(PREFIX_LENS) * GROUP
    assert seen == [(sum(PREFIX_LENS) + rows * (WIDTH - 1), SHAPE["hidden_size"])]
    assert embedded == [rows * (WIDTH - 1)]


def _positions_off_by_one(prefix_lens, group_size, width, device="cpu"):
    n = sum(prefix_lens)
    pos = packed_positions(prefix_lens, group_size, width, device)
    return torch.cat((pos[:n], pos[n:] + 1))


def _mask_without_diagonal(prefix_len, width, device="cpu"):
    mask = shared_prefix_mask(prefix_len, width, device)
    mask[:, prefix_len:] &= ~torch.eye(width, dtype=torch.bool, device=device)
    return mask


def _mask_without_first_prefix_key(prefix_len, width, device="cpu"):
    mask = shared_prefix_mask(prefix_len, width, device).clone()
    mask[:, 0] = False
    return mask


def _tiled_kv_heads(q, prefix_k, prefix_v, k, v):  # kv head h % Hkv instead of h // (Hq / Hkv)
    rep = q.shape[2] // k.shape[2]
    g = q.shape[0]
    keys = torch.cat((prefix_k[None].expand(g, -1, -1, -1), k), 1).repeat(1, 1, rep, 1)
    values = torch.cat((prefix_v[None].expand(g, -1, -1, -1), v), 1).repeat(1, 1, rep, 1)
    mask = shared_prefix_mask(prefix_k.shape[0], q.shape[1], q.device)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2),
                                                           values.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("name,fake", [
    ("packed_positions", _positions_off_by_one),
    ("shared_prefix_mask", _mask_without_diagonal),
    ("shared_prefix_mask", _mask_without_first_prefix_key),
    ("completion_attention", _tiled_kv_heads),
])
def test_single_point_bugs_are_detected(lm, monkeypatch, name, fake):
    """Each broken variant misses the naive forward by far more than the 1e-5 the comparisons allow."""
    prefixes, completions, lengths = _batch()
    with torch.no_grad():
        naive = naive_completion_logprobs(lm, prefixes, completions, lengths, GROUP)
        monkeypatch.setattr(logprobs, name, fake)
        broken = completion_logprobs(lm, prefixes, completions, lengths, GROUP)
    assert (broken - naive).abs().max() > 1e-3


@pytest.mark.parametrize("change,argument", [
    (dict(group_size=0), "group_size"),
    (dict(group_size=5), "completions"),                                    # 15 rows expected, 12 given
    (dict(completions=torch.zeros(12, 11)), "completions"),                 # float ids
    (dict(completions=torch.zeros(12, dtype=torch.int64)), "completions"),  # 1-D
    (dict(completions=torch.full((12, 11), 97)), "completions"),            # id out of the vocabulary
    (dict(lengths=torch.full((12,), 12)), "lengths"),                       # > C
    (dict(lengths=torch.full((12,), -1)), "lengths"),
    (dict(lengths=torch.zeros(11, dtype=torch.int64)), "lengths"),          # wrong count
    (dict(lengths=torch.zeros(12)), "lengths"),                             # float
    (dict(prefixes="widths"), r"prefixes\[1\]"),                            # wrong width
    (dict(prefixes="empty"), r"prefixes\[2\]"),                             # P = 0
    (dict(prefixes=[]), "prefixes"),
    (dict(temperature=0.0), "temperature"),
])
@pytest.mark.parametrize("fn", [completion_logprobs, naive_completion_logprobs])
def test_bad_inputs_name_the_argument(lm, fn, change, argument):
    prefixes, completions, lengths = _batch()
    args = dict(prefixes=prefixes, completions=completions, lengths=lengths, group_size=GROUP, temperature=1.0)
    if change.get("prefixes") == "widths":
        change = dict(prefixes=[prefixes[0], torch.randn(13, 63), prefixes[2]])
    elif change.get("prefixes") == "empty":
        change = dict(prefixes=prefixes[:2] + [torch.randn(0, 64)])
    args.update(change)
    with pytest.raises(ValueError, match=argument):
        fn(lm, **args)


def test_bf16_within_torch_error(lm):
    """bf16 model: values within 2x of the naive bf16 forward's error against fp64, prefix gradients 3x."""
    prefixes, completions, lengths = _batch()
    upstream = torch.randn(completions.shape)
    lm16, lm64 = copy.deepcopy(lm).bfloat16(), copy.deepcopy(lm).double()
    ours, ours_g = _with_grads(completion_logprobs, lm16, prefixes, completions, lengths, GROUP, upstream)
    naive, naive_g = _with_grads(naive_completion_logprobs, lm16, prefixes, completions, lengths, GROUP, upstream)
    ref, ref_g = _with_grads(naive_completion_logprobs, lm64, [p.double() for p in prefixes], completions,
                             lengths, GROUP, upstream.double())
    assert ours.dtype == torch.float32
    assert_within_torch_error(ours, naive, ref.double())
    for g, g_naive, g_ref in zip(ours_g[:3], naive_g[:3], ref_g[:3], strict=True):  # prefix grads are fp32
        assert_within_torch_error(g, g_naive, g_ref, factor=3.0)


@pytest.mark.gpu
def test_cuda_bf16_matches_naive():
    """On CUDA (flash-attn prefix, memory-efficient SDPA with a mask, Triton LM head): within torch's error.
    bf16 only: in fp32 the Triton head's tl.dot is TF32 on an H100, the naive forward's cuBLAS GEMM is not."""
    lm = _decoder().cuda()
    prefixes, completions, lengths = _batch()
    prefixes, completions, lengths = [p.cuda() for p in prefixes], completions.cuda(), lengths.cuda()
    upstream = torch.randn(completions.shape, device="cuda")
    low = lm.bfloat16()
    ours, ours_g = _with_grads(completion_logprobs, low, prefixes, completions, lengths, GROUP, upstream)
    naive, naive_g = _with_grads(naive_completion_logprobs, low, prefixes, completions, lengths, GROUP, upstream)
    lm64 = copy.deepcopy(low).double()
    ref, ref_g = _with_grads(naive_completion_logprobs, lm64, [p.double() for p in prefixes], completions,
                             lengths, GROUP, upstream.double())
    assert_within_torch_error(ours, naive, ref.double())
    for g, g_naive, g_ref in zip(ours_g[:3], naive_g[:3], ref_g[:3], strict=True):
        assert_within_torch_error(g, g_naive, g_ref, factor=3.0)
