"""The rollout engine: greedy equality with transformers' generate, the KV cache and shared prefix against
teacher-forced full passes, stopping, batching, and the sampler's distributions."""
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from kernels.cascade_attention import cascade_attention_ref
from omni_fast import ops
from omni_fast.config import ConfigError, EngineConfig, ModelConfig, SamplingParams
from omni_fast.engine.engine import Engine
from omni_fast.model.qwen2 import Qwen2LM

V, H = 257, 64


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(1)
    hf = Qwen2ForCausalLM(Qwen2Config(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=V, rope_theta=1e6, tie_word_embeddings=True))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.25)
    cfg = ModelConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, mm_hidden_size=8, eos_token_id=3)
    ours = Qwen2LM(cfg).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    return hf.eval(), ours


def _prompts(*lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randn(n, H, generator=g) for n in lengths]


@pytest.mark.parametrize("config", [EngineConfig(), EngineConfig(max_prompts=2, max_samples=3, sync_every=1),
                                    EngineConfig(sync_every=5)])
def test_greedy_equals_transformers_generate(pair, config):
    hf, ours = pair
    prompts = _prompts(5, 37, 1, 12)
    results = Engine(ours, config, stop_token_ids=(3,)).generate(prompts, SamplingParams.greedy_params(max_tokens=30))
    for p, r in zip(prompts, results):
        ref = hf.generate(inputs_embeds=p[None], max_new_tokens=30, do_sample=False, eos_token_id=3, pad_token_id=0)[0]
        assert r[0].token_ids == ref.tolist()
        assert r[0].finish_reason == ("stop" if ref[-1] == 3 else "length")


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_repetition_penalty_equals_transformers(pair):
    hf, ours = pair
    p = _prompts(9)[0]
    got = Engine(ours).generate([p], SamplingParams(temperature=0, max_tokens=25, repetition_penalty=1.3,
                                                    stop_token_ids=(3,)))[0][0].token_ids
    ref = hf.generate(inputs_embeds=p[None], max_new_tokens=25, do_sample=False, eos_token_id=3, pad_token_id=0,
                      repetition_penalty=1.3)[0].tolist()
    assert got == ref


def _teacher_forced_logprobs(model, prompt, tokens, temperature):
    with torch.no_grad():
        embeds = torch.cat([prompt, model.embed(torch.tensor(tokens))])[None]
        logits = model(embeds)[0, prompt.shape[0] - 1:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("n,sync_every", [(1, 16), (3, 1), (8, 4)])
def test_shared_prefix_samples_equal_full_passes(pair, n, sync_every):
    """Every sample's returned log-probs equal a no-cache forward over prompt + its own tokens: each sample reads
    the one shared prefix and only its own generated keys."""
    _, ours = pair
    prompts = _prompts(7, 20, 2)
    params = SamplingParams(n=n, temperature=1.3, top_k=40, max_tokens=18, seed=5)
    results = Engine(ours, EngineConfig(sync_every=sync_every), stop_token_ids=(3,)).generate(prompts, params)
    for p, group in zip(prompts, results):
        assert len(group) == n
        for c in group:
            expected = _teacher_forced_logprobs(ours, p, c.token_ids, 1.3)
            assert torch.allclose(c.logprobs, expected, atol=1e-4), (c.logprobs - expected).abs().max()
    if n > 1:
        assert len({tuple(c.token_ids) for c in results[1]}) > 1


def test_seeds_reproduce_whatever_shares_the_batch(pair):
    _, ours = pair
    engine = Engine(ours, stop_token_ids=(3,))
    a, b = _prompts(6, 11)
    alone = engine.generate([a], SamplingParams(n=4, temperature=1.0, top_k=50, max_tokens=12, seed=7))[0]
    mixed = engine.generate([b, a], [SamplingParams(n=2, temperature=0.7, max_tokens=5, seed=1),
                                     SamplingParams(n=4, temperature=1.0, top_k=50, max_tokens=12, seed=7)])[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in mixed]
    other = engine.generate([a], SamplingParams(n=4, temperature=1.0, top_k=50, max_tokens=12, seed=8))[0]
    assert [c.token_ids for c in other] != [c.token_ids for c in alone]


def test_stop_tokens_max_tokens_and_ignore_eos(pair):
    _, ours = pair
    p = _prompts(10)
    engine = Engine(ours, stop_token_ids=(3,))
    free = engine.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0][0]
    assert len(free.token_ids) == 20 and free.finish_reason == "length"
    stop_at = free.token_ids[6]
    first = free.token_ids.index(stop_at)
    stopped = engine.generate(p, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(stop_at,)))[0][0]
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
    one = engine.generate(p, SamplingParams(temperature=0, max_tokens=1))[0][0]
    assert one.token_ids == free.token_ids[:1] and len(one.logprobs) == 1


def test_bad_requests(pair):
    _, ours = pair
    engine = Engine(ours, EngineConfig(max_samples=4))
    with pytest.raises(ValueError, match="prompt 0 has shape"):
        engine.generate([torch.randn(5, H + 1)], SamplingParams())
    with pytest.raises(ConfigError, match="max_samples"):
        engine.generate(_prompts(3), SamplingParams(n=5))
    with pytest.raises(ConfigError, match="2 prompts but 1"):
        engine.generate(_prompts(3, 4), [SamplingParams()])
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)


# --- cascade attention -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_lens,group_size", [((1,), 1), ((37, 5), 3), ((1000,), 8), ((13, 1, 64), 2)])
def test_cascade_attention_ref_is_attention_over_prefix_then_own_tokens(prefix_lens, group_size):
    hq, hkv, d = 14, 2, 64
    p, tp, tg = len(prefix_lens), max(prefix_lens) + 3, 9
    b = p * group_size
    prefix_k, prefix_v = torch.randn(2, p, tp, hkv, d, dtype=torch.float64).unbind(0)
    gen_k, gen_v = torch.randn(2, b + 2, tg, hkv, d, dtype=torch.float64).unbind(0)
    q = torch.randn(b, hq, d, dtype=torch.float64)
    groups = torch.arange(p).repeat_interleave(group_size)
    slots = torch.randperm(b + 2)[:b]
    gen_lens = torch.randint(1, tg + 1, (b,))
    lens = torch.tensor(prefix_lens)
    out = cascade_attention_ref(q, prefix_k, prefix_v, lens, groups, gen_k, gen_v, slots, gen_lens)
    for r in range(b):
        g, s = groups[r], slots[r]
        k = torch.cat([prefix_k[g, : lens[g]], gen_k[s, : gen_lens[r]]]).repeat_interleave(hq // hkv, dim=1)
        v = torch.cat([prefix_v[g, : lens[g]], gen_v[s, : gen_lens[r]]]).repeat_interleave(hq // hkv, dim=1)
        ref = F.scaled_dot_product_attention(q[r][:, None], k.transpose(0, 1), v.transpose(0, 1))[:, 0]
        assert (out[r] - ref).abs().max() < 1e-10


# --- sampling distributions ------------------------------------------------------------------------------------
N_DRAWS = 6000


def _draw(logits_row, temperature=1.0, top_k=0, top_p=1.0):
    logits = logits_row[None].expand(N_DRAWS, -1).contiguous()
    n = torch.full((N_DRAWS,), 1)
    tokens, logprobs = ops.sample(logits, n * temperature, n * top_k, n * top_p, torch.arange(N_DRAWS) * 7919 + 11,
                                  torch.tensor(3))
    return tokens, logprobs


def _expected(logits, temperature=1.0, top_k=0, top_p=1.0):
    probs = torch.softmax(logits.double() / temperature, 0)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep &= probs >= probs.topk(top_k).values[-1]
    if top_p < 1:
        order = probs.masked_fill(~keep, 0).argsort(descending=True)
        mass = probs.masked_fill(~keep, 0)[order].cumsum(0) - probs.masked_fill(~keep, 0)[order]
        nucleus = torch.zeros_like(keep)
        nucleus[order[mass < top_p]] = True
        keep &= nucleus
    return probs.masked_fill(~keep, 0) / probs.masked_fill(~keep, 0).sum()


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0),
                                dict(top_k=4), dict(top_p=0.7), dict(temperature=1.5, top_k=6, top_p=0.9)])
def test_sampling_distribution(kw):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.8, 1.2])
    tokens, logprobs = _draw(logits, **kw)
    freq = torch.bincount(tokens, minlength=10).double() / N_DRAWS
    expected = _expected(logits, **kw)
    sigma = (expected * (1 - expected) / N_DRAWS).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-9).all(), (freq, expected)
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn
    t = kw.get("temperature", 1.0)
    assert torch.allclose(logprobs, torch.log_softmax(logits / t, 0)[tokens], atol=1e-6)


def test_greedy_rows_beside_sampled_rows():
    logits = torch.randn(4, 50)
    tokens, logprobs = ops.sample(logits, torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long),
                                  torch.ones(4), torch.arange(4), torch.tensor(0))
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.allclose(logprobs[0], torch.log_softmax(logits[0], 0).max())
