"""The rollout engine: greedy equality with transformers' generate, the KV cache and shared prefix against
teacher-forced full passes, stopping, batching, and the sampler's distributions."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

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
    ids = torch.tensor(tokens, device=prompt.device)
    with torch.no_grad():
        embeds = torch.cat([prompt, model.embed(ids)])[None]
        logits = model(embeds)[0, prompt.shape[0] - 1:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, ids[:, None])[:, 0]


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


@pytest.mark.parametrize("sync_every", [1, 4])
def test_each_row_gets_exactly_its_own_max_tokens(pair, sync_every):
    """One batch, per-prompt max_tokens all different (and not the batch's longest): with ignore_eos every
    completion is exactly max_tokens long, so an off-by-one in the per-row stop shows on the shorter rows."""
    _, ours = pair
    prompts = _prompts(4, 9, 2, 6)
    max_tokens = [3, 11, 1, 6]
    params = [SamplingParams(n=1 + i % 2, temperature=1.0, top_k=20, max_tokens=m, seed=i, ignore_eos=True)
              for i, m in enumerate(max_tokens)]
    results = Engine(ours, EngineConfig(sync_every=sync_every), stop_token_ids=(3,)).generate(prompts, params)
    assert [len(group) for group in results] == [1, 2, 1, 2]
    for m, group in zip(max_tokens, results):
        for c in group:
            assert len(c.token_ids) == m and len(c.logprobs) == m and c.finish_reason == "length", (m, c)


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


def test_engine_on_the_triton_kernels(pair):
    """The decode loop with the Triton attention and sampling kernels (interpreter here) gives the torch path's
    tokens and log-probs."""
    from omni_fast import ops

    _, ours = pair
    prompts = _prompts(9, 3)
    params = [SamplingParams(n=2, temperature=1.0, top_k=20, max_tokens=6, seed=2),
              SamplingParams(n=1, temperature=0.0, max_tokens=6)]
    engine = Engine(ours, EngineConfig(sync_every=2), stop_token_ids=(3,))
    expected = engine.generate(prompts, params)
    with ops.force_backend("triton", "cascade_attention", "sample"):
        got = engine.generate(prompts, params)
    for e_group, g_group in zip(expected, got):
        for e, g in zip(e_group, g_group):
            assert g.token_ids == e.token_ids
            assert torch.allclose(g.logprobs, e.logprobs, atol=1e-4)


def test_engine_cpu_paths_equal_the_torch_references(pair):
    """The CPU dispatch (cascade_attention_cpu, sample_cpu) gives the torch references' tokens and log-probs
    through the whole decode loop: groups of 3, 1 and 4 samples, top-k, top-p, a greedy row, early stops."""
    from omni_fast import ops

    _, ours = pair
    assert ops.backends("cascade_attention", "cpu")[0] == ops.backends("sample", "cpu")[0] == "cpu"
    prompts = _prompts(9, 3, 14)
    params = [SamplingParams(n=3, temperature=1.0, top_k=20, max_tokens=9, seed=2),
              SamplingParams(n=1, temperature=0.0, max_tokens=6),
              SamplingParams(n=4, temperature=0.8, top_p=0.9, max_tokens=12, seed=4)]
    engine = Engine(ours, EngineConfig(sync_every=2), stop_token_ids=(3,))
    got = engine.generate(prompts, params)
    with ops.force_backend("torch", "cascade_attention", "sample"):
        expected = engine.generate(prompts, params)
    assert [len(g) for g in got] == [3, 1, 4]
    for e_group, g_group in zip(expected, got):
        for e, g in zip(e_group, g_group):
            assert g.token_ids == e.token_ids
            assert torch.allclose(g.logprobs, e.logprobs, atol=1e-5), (g.logprobs - e.logprobs).abs().max()


# --- on a GPU: the full-size model, CUDA graphs -----------------------------------------------------------------
def _full_size_pair(dtype):
    from omni_fast.testing import QWEN25_05B, random_decoder, transformers_twin

    model = random_decoder(QWEN25_05B, "cuda", dtype)
    return transformers_twin(model), model


@pytest.mark.gpu
def test_full_size_bf16_greedy_matches_transformers_until_a_near_tie():
    """Qwen2.5-0.5B shape, random bf16 weights: our kernels and HF's round differently, so tokens are compared
    until HF's top-2 logit margin falls under 0.05 (a near tie either side may break), and at least 16 steps."""
    hf, ours = _full_size_pair(torch.bfloat16)
    engine = Engine(ours, stop_token_ids=(-1,))
    g = torch.Generator().manual_seed(0)
    compared = 0
    for length in (1000, 37, 5):
        prompt = (torch.randn(length, 896, generator=g) * 0.1).cuda().bfloat16()
        got = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=32))[0][0].token_ids
        out = hf.generate(inputs_embeds=prompt[None], max_new_tokens=32, do_sample=False, pad_token_id=0,
                          eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        for step, (tok, scores) in enumerate(zip(out.sequences[0].tolist(), out.scores)):
            top2 = scores[0].float().topk(2).values
            if top2[0] - top2[1] < 0.05:
                break
            assert got[step] == tok, (length, step)
            compared += 1
    assert compared >= 16


@pytest.mark.gpu
def test_cuda_graphs_keep_the_shared_prefix_exact():
    """fp32 on the GPU, CUDA graphs on: every sample's log-probs equal a no-cache forward of its own tokens, and
    graph replay gives what eager decoding gives."""
    _, ours = _full_size_pair(torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [(torch.randn(n, 896, generator=g) * 0.1).cuda() for n in (300, 17)]
    params = SamplingParams(n=3, temperature=1.0, top_k=50, max_tokens=40, seed=3, ignore_eos=True)
    graphed = Engine(ours, EngineConfig(sync_every=8)).generate(prompts, params)
    eager = Engine(ours, EngineConfig(cuda_graphs=False)).generate(prompts, params)
    for p, group_g, group_e in zip(prompts, graphed, eager):
        for a, b in zip(group_g, group_e):
            assert a.token_ids == b.token_ids
            expected = _teacher_forced_logprobs(ours, p.float(), a.token_ids, 1.0)
            assert torch.allclose(a.logprobs, expected.cpu(), atol=2e-3)
