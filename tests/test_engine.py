"""The continuous-batching engine: greedy equality with transformers' generate; every request's tokens and
log-probs equal to generating it alone with no cache (the one-at-a-time reference below) whatever joins,
leaves, is aborted, preempted or chunked beside it; the prefix cache; the scheduler's rules; bad requests."""
import dataclasses

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from omni_fast import ops
from omni_fast.config import ConfigError, EngineConfig, ModelConfig, SamplingParams
from omni_fast.engine.block_manager import BlockAllocator, PrefixCache
from omni_fast.engine.engine import Engine
from omni_fast.engine.kv_cache import bytes_per_block
from omni_fast.engine.sampler import apply_repetition_penalty
from omni_fast.engine.sequence import row_seed
from omni_fast.kernels.sampling import sample_ref
from omni_fast.model.qwen2 import Qwen2LM

V, H = 257, 64
STOP = 3


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(1)
    hf = Qwen2ForCausalLM(Qwen2Config(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=V, rope_theta=1e6, tie_word_embeddings=True))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.25)
    cfg = ModelConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, mm_hidden_size=8, eos_token_id=STOP)
    ours = Qwen2LM(cfg).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    return hf.eval(), ours


def _config(blocks=512, **kw) -> EngineConfig:
    """A pool of `blocks` blocks of the tiny model (block_size from kw, default 16)."""
    cfg = ModelConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, mm_hidden_size=8)
    return EngineConfig(kv_cache_memory=blocks * bytes_per_block(cfg, kw.get("block_size", 16), torch.float32), **kw)


def _prompts(*lengths, seed=None):
    g = torch.Generator().manual_seed(sum(lengths) if seed is None else seed)
    return [torch.randn(n, H, generator=g) for n in lengths]


@torch.no_grad()
def _reference(model, prompt, params: SamplingParams):
    """What a request must return, computed alone: sample j draws every token from a full forward over the prompt
    and its own tokens so far (no KV cache), with kernels.sampling's reference draw at its own seed
    row_seed(seed, j) and token index, the repetition penalty as HF applies it -> [(token ids, log-probs)]."""
    stops = set() if params.ignore_eos else set(params.stop_token_ids or (STOP,))
    out = []
    for j in range(params.n):
        seed = torch.tensor([row_seed(params.seed if params.seed is not None else 0, j)])
        tokens, logprobs = [], []
        while len(tokens) < params.max_tokens:
            embeds = torch.cat([prompt, model.embed(torch.tensor(tokens, dtype=torch.long))])[None]
            logits = model(embeds)[0, -1:].float()
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(1, V, dtype=torch.bool)
                seen[0, tokens] = True
                logits = apply_repetition_penalty(logits, seen, torch.tensor([params.repetition_penalty]))
            tok, lp = sample_ref(logits, torch.tensor([params.temperature]), torch.tensor([params.top_k]),
                                 torch.tensor([params.top_p]), seed, len(tokens))
            tokens.append(int(tok))
            logprobs.append(float(lp))
            if tokens[-1] in stops:
                break
        out.append((tokens, logprobs))
    return out


def _assert_reference(model, prompt, params, completions, atol=1e-4):
    for (tokens, logprobs), c in zip(_reference(model, prompt, params), completions, strict=True):
        assert c.token_ids == tokens
        assert torch.allclose(c.logprobs, torch.tensor(logprobs), atol=atol), (c.logprobs - torch.tensor(logprobs))
        assert c.finish_reason == ("stop" if tokens[-1] == STOP and not params.ignore_eos else "length")


MIXED = [SamplingParams(n=3, temperature=1.0, top_k=20, max_tokens=9, seed=2),
         SamplingParams(n=1, temperature=0.0, max_tokens=14),
         SamplingParams(n=4, temperature=0.8, top_p=0.9, max_tokens=12, seed=4),
         SamplingParams(n=2, temperature=1.3, max_tokens=7, seed=5, repetition_penalty=1.2, ignore_eos=True),
         SamplingParams(n=2, temperature=0.7, top_k=5, top_p=0.8, max_tokens=20, seed=6)]
CONFIGS = {"default": _config(),
           "chunked prefill, 4-position blocks, 5 rows": _config(max_num_batched_tokens=7, block_size=4,
                                                                 max_num_seqs=5),
           "static": _config(admission="static"),
           "preempting pool": _config(blocks=24, block_size=4)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_equals_one_at_a_time(pair, name):
    """Greedy, top-k, top-p, a repetition penalty, groups of 1-4, lengths 1-37: every completion is the
    request's alone, whatever the admission policy, chunking, row cap or a pool small enough to preempt."""
    _, ours = pair
    prompts = _prompts(9, 3, 37, 1, 14)
    engine = Engine(ours, CONFIGS[name], stop_token_ids=(STOP,))
    results = engine.generate(prompts, MIXED)
    for prompt, params, group in zip(prompts, MIXED, results):
        _assert_reference(ours, prompt, params, group)
    if name == "preempting pool":
        assert engine.scheduler.preemptions > 0
    assert engine.allocator.num_free == engine.allocator.num_blocks  # everything given back


@pytest.mark.parametrize("name", ["default", "chunked prefill, 4-position blocks, 5 rows", "static"])
def test_greedy_equals_transformers_generate(pair, name):
    hf, ours = pair
    prompts = _prompts(5, 37, 1, 12)
    results = Engine(ours, CONFIGS[name], stop_token_ids=(STOP,)).generate(
        prompts, SamplingParams.greedy_params(max_tokens=30))
    for p, r in zip(prompts, results):
        ref = hf.generate(inputs_embeds=p[None], max_new_tokens=30, do_sample=False, eos_token_id=STOP,
                          pad_token_id=0)[0]
        assert r[0].token_ids == ref.tolist()
        assert r[0].finish_reason == ("stop" if ref[-1] == STOP else "length")


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_repetition_penalty_equals_transformers(pair):
    hf, ours = pair
    p = _prompts(9)[0]
    got = Engine(ours, _config()).generate([p], SamplingParams(temperature=0, max_tokens=25, repetition_penalty=1.3,
                                                               stop_token_ids=(STOP,)))[0][0].token_ids
    ref = hf.generate(inputs_embeds=p[None], max_new_tokens=25, do_sample=False, eos_token_id=STOP, pad_token_id=0,
                      repetition_penalty=1.3)[0].tolist()
    assert got == ref


def _drive(engine, schedule, aborts=(), max_steps=500):
    """Run the engine, adding schedule[step] = [(id, prompt, params, key)] before step `step` and aborting the
    ids of aborts[step] after it -> ({id: completions}, {id: tokens streamed per sample}, {id: step it
    finished}, steps run)."""
    done, streamed, finished_at = {}, {}, {}
    aborts = dict(aborts)
    for step in range(max_steps):
        for rid, prompt, params, key in schedule.get(step, []):
            engine.add_request(rid, prompt, params, key)
        if not engine.has_unfinished_requests() and step > max(schedule):
            return done, streamed, finished_at, step
        for out in engine.step():
            assert out.request_id not in done
            acc_all = streamed.setdefault(out.request_id, [[] for _ in out.new_token_ids])
            for acc, new in zip(acc_all, out.new_token_ids, strict=True):
                acc.extend(new)
            if out.finished:
                done[out.request_id], finished_at[out.request_id] = out.completions, step
            else:
                assert out.completions is None
        for rid in aborts.get(step, []):
            engine.abort_request(rid)
    raise AssertionError("the engine did not drain")


def test_requests_join_leave_and_abort_at_any_step(pair):
    """Requests added at steps 0, 2, 3, 7, 11 (two of them aborted: one while waiting, one while decoding):
    every other request returns exactly its one-at-a-time completions, streamed token by token, and the pool
    is whole again at the end."""
    _, ours = pair
    prompts = _prompts(9, 3, 37, 1, 14, 6, 20, seed=3)
    engine = Engine(ours, _config(max_num_seqs=6, max_num_batched_tokens=16, block_size=4), stop_token_ids=(STOP,))
    reqs = [(f"r{i}", p, sp, None) for i, (p, sp) in enumerate(zip(prompts, MIXED + MIXED[:2]))]
    schedule = {0: reqs[:2], 2: reqs[2:4], 3: reqs[4:5], 7: reqs[5:6], 11: reqs[6:]}
    done, streamed, _, _ = _drive(engine, schedule, aborts={3: ["r4"], 8: ["r2"]})
    assert set(done) == {"r0", "r1", "r3", "r5", "r6"}
    for rid, prompt, params, _ in reqs:
        if rid in done:
            _assert_reference(ours, prompt, params, done[rid])
            assert streamed[rid] == [c.token_ids for c in done[rid]]
    assert engine.allocator.num_free == engine.allocator.num_blocks and not engine.requests


def test_seeded_request_is_batch_invariant(pair):
    """The same seeded request alone, first of many, and joining a busy batch late gives the same tokens."""
    _, ours = pair
    prompt = _prompts(11, seed=9)[0]
    params = SamplingParams(n=4, temperature=1.0, top_k=50, max_tokens=12, seed=7)
    others = [(f"o{i}", p, sp, None) for i, (p, sp) in enumerate(zip(_prompts(6, 30, 2, seed=4), MIXED))]
    alone = Engine(ours, _config()).generate([prompt], params)[0]
    first, _, _, _ = _drive(Engine(ours, _config()), {0: [("x", prompt, params, None)] + others})
    late, _, _, _ = _drive(Engine(ours, _config(max_num_seqs=8)), {0: others, 5: [("x", prompt, params, None)]},
                           aborts={6: ["o0"]})  # o0 is aborted while x waits for rows
    assert "o0" not in late
    assert [c.token_ids for c in alone] == [c.token_ids for c in first["x"]] == [c.token_ids for c in late["x"]]
    other_seed = Engine(ours, _config()).generate([prompt], SamplingParams(n=4, top_k=50, max_tokens=12, seed=8))[0]
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in alone]


def test_a_leaving_requests_memory_admits_the_next_request_at_once(pair):
    """A pool of 4 four-position blocks holds one request of an 8-position prompt and 5 tokens (3 blocks, and a
    second would need its growth reserved too): b waits while a runs and is admitted the step after a's last
    token, or the step after a is aborted; either way b's tokens are its own."""
    _, ours = pair
    a, b = _prompts(8, 8, seed=15)
    params = SamplingParams(temperature=1.0, top_k=20, max_tokens=5, seed=2, ignore_eos=True)
    for abort_at, a_end, b_first in ((None, 4, 5), (1, None, 2)):
        engine = Engine(ours, _config(blocks=4, block_size=4), stop_token_ids=(STOP,))
        engine.add_request("a", a, params)
        engine.add_request("b", b, params)
        first, end, done = {}, {}, {}
        for step in range(20):
            for o in engine.step():
                first.setdefault(o.request_id, step)
                if o.finished:
                    end[o.request_id], done[o.request_id] = step, o.completions
            if step == abort_at:
                engine.abort_request("a")
            if not engine.has_unfinished_requests():
                break
        assert end.get("a") == a_end and first["b"] == b_first and end["b"] == b_first + 4
        _assert_reference(ours, b, params, done["b"])
        assert engine.allocator.num_free == engine.allocator.num_blocks


def test_admission_is_first_come_first_served(pair):
    """Two rows: b (two samples) waits for a to leave, and c (one sample, which would fit beside a) waits behind b."""
    _, ours = pair
    a, b, c = _prompts(5, 6, 7, seed=17)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    schedule = {0: [("a", a, params, None), ("b", b, dataclasses.replace(params, n=2), None), ("c", c, params, None)]}
    _, _, finished_at, _ = _drive(Engine(ours, _config(max_num_seqs=2)), schedule)
    assert finished_at == {"a": 2, "b": 5, "c": 8}


def test_greedy_requests_equal_one_at_a_time(pair):
    _, ours = pair
    prompts = _prompts(5, 17, 2, 29, seed=5)
    greedy = SamplingParams.greedy_params(max_tokens=16)
    alone = [Engine(ours, _config()).generate([p], greedy)[0][0].token_ids for p in prompts]
    schedule = {0: [("g0", prompts[0], greedy, None)], 1: [("g1", prompts[1], greedy, None)],
                4: [("g2", prompts[2], greedy, None), ("g3", prompts[3], greedy, None)]}
    done, _, _, _ = _drive(Engine(ours, _config(max_num_batched_tokens=10)), schedule)
    assert [done[f"g{i}"][0].token_ids for i in range(4)] == alone


def test_preemption_keeps_every_request(pair):
    """A pool of 16 four-position blocks for four requests of 2 x 24 tokens each: running requests cannot all
    grow, the newest are preempted and recomputed (their prompts and generated tokens prefilled again) and
    every request still returns its one-at-a-time completions."""
    _, ours = pair
    prompts = _prompts(7, 9, 4, 10, seed=8)
    params = [SamplingParams(n=2, temperature=1.0, top_k=30, max_tokens=24, seed=i, ignore_eos=True)
              for i in range(4)]
    engine = Engine(ours, _config(blocks=16, block_size=4, max_num_batched_tokens=6), stop_token_ids=(STOP,))
    victims, schedule = [], engine.scheduler.schedule

    def newest_preempted():
        admitted = [r.request_id for r in engine.scheduler.running]  # oldest first
        plan = schedule()
        ids = [r.request_id for r in plan.preempted]
        assert ids == admitted[::-1][:len(ids)]  # the newest admitted, newest first
        victims.extend(ids)
        return plan

    engine.scheduler.schedule = newest_preempted
    results = engine.generate(prompts, params)
    assert engine.scheduler.preemptions == len(victims) >= 2
    for prompt, sp, group in zip(prompts, params, results):
        _assert_reference(ours, prompt, sp, group)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_the_newest_admitted_request_is_preempted(pair):
    """Three one-block prompts decoding in lockstep in a pool of 9 four-position blocks: at step 9 the oldest, a,
    cannot grow; c (the newest) is preempted, not b (later ones follow the same rule); all three still return their
    one-at-a-time tokens."""
    _, ours = pair
    prompts = _prompts(4, 4, 4, seed=16)
    params = SamplingParams(temperature=1.0, top_k=30, max_tokens=24, seed=3, ignore_eos=True)
    engine = Engine(ours, _config(blocks=9, block_size=4), stop_token_ids=(STOP,))
    for rid, prompt in zip("abc", prompts):
        engine.add_request(rid, prompt, params)
    done, preempted, waiting = {}, [], set()
    for step in range(200):
        outs = engine.step()
        now = {r.request_id for r in engine.scheduler.waiting}
        preempted += [(rid, step) for rid in sorted(now - waiting)]
        waiting = now
        done.update((o.request_id, o.completions) for o in outs if o.finished)
        if not engine.has_unfinished_requests():
            break
    assert preempted[0] == ("c", 9) and len(preempted) == engine.scheduler.preemptions
    for rid, prompt in zip("abc", prompts):
        _assert_reference(ours, prompt, params, done[rid])


def _count_prefill(engine):
    counted = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda chunks: (counted.extend((c.request.request_id, c.end - c.start) for c in chunks),
                                            prefill(chunks))[1]
    return counted


def test_prefix_cache_hit_skips_the_prefill_and_gives_the_miss_tokens(pair):
    _, ours = pair
    prompt, other = _prompts(23, 23, seed=11)
    params = SamplingParams(n=3, temperature=1.0, top_k=40, max_tokens=10, seed=3)
    engine = Engine(ours, _config(), stop_token_ids=(STOP,))
    prefilled = _count_prefill(engine)
    finals = {}
    step = engine.step
    engine.step = lambda: [finals.setdefault(o.request_id, o) if o.finished else o for o in step()]
    miss = engine.generate([prompt], params, cache_keys=["clip"])[0]
    hit = engine.generate([prompt], params, cache_keys=["clip"])[0]
    assert [c.token_ids for c in hit] == [c.token_ids for c in miss]
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(hit, miss))
    assert sum(n for _, n in prefilled) == 23 and engine.scheduler.cache_hits == 1
    assert [o.num_cached_tokens for o in finals.values()] == [0, 23]
    reused = engine.generate([other], params, cache_keys=["clip"])[0]  # same key, another prompt: a miss
    _assert_reference(ours, other, params, reused)
    assert sum(n for _, n in prefilled) == 46 and engine.scheduler.cache_hits == 1
    assert list(finals.values())[-1].num_cached_tokens == 0
    engine.reset_prefix_cache()
    engine.generate([prompt], params, cache_keys=["clip"])
    assert sum(n for _, n in prefilled) == 69 and engine.allocator.num_free < engine.allocator.num_blocks


def test_prefix_cache_evicts_least_recently_used_and_never_a_read_entry(pair):
    """A pool of 24 four-position blocks: prompts of 16 positions (4 blocks) cached under keys a, b, c, d; a is
    used again, so the next prompt needing room evicts b (least recently used), not a. An entry read by a
    running request is never evicted: the request needing its room waits instead."""
    _, ours = pair
    prompts = dict(zip("abcdef", _prompts(*[16] * 6, seed=12)))
    params = SamplingParams(temperature=0, max_tokens=2)
    engine = Engine(ours, _config(blocks=24, block_size=4), stop_token_ids=(STOP,))
    for key in "abcd":
        engine.generate([prompts[key]], params, cache_keys=[key])
    engine.generate([prompts["a"]], params, cache_keys=["a"])
    assert list(engine.prefix_cache.entries) == ["b", "c", "d", "a"] and engine.allocator.num_free == 8
    engine.generate([prompts["e"], prompts["f"]], params, cache_keys=["e", "f"])  # 2 x 4 blocks + growth
    assert list(engine.prefix_cache.entries)[-2:] == ["e", "f"] and "b" not in engine.prefix_cache.entries
    assert "a" in engine.prefix_cache.entries
    engine.add_request("long", prompts["a"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), "a")
    engine.step()
    entry = engine.prefix_cache.entries["a"]
    assert entry.refs == 1
    engine.prefix_cache.evict(engine.allocator.num_blocks)  # asks for everything: a stays, it is read
    assert "a" in engine.prefix_cache.entries and engine.prefix_cache.evictable_blocks == 0
    while engine.has_unfinished_requests():
        engine.step()
    assert entry.refs == 0 and engine.prefix_cache.evictable_blocks == 4


def test_chunked_prefill_does_not_stall_running_decodes(pair):
    """A 37-position prompt with an 8-position budget is prefilled over 5 steps, during which the request
    already running draws a token every step; the long one's tokens are still its own."""
    _, ours = pair
    short, long_ = _prompts(4, 37, seed=13)
    params = SamplingParams(temperature=1.0, top_k=20, max_tokens=12, seed=1, ignore_eos=True)
    engine = Engine(ours, _config(max_num_batched_tokens=8), stop_token_ids=(STOP,))
    engine.add_request("short", short, params)
    engine.step()
    engine.add_request("long", long_, params)
    for step in range(5):
        outs = {o.request_id: o for o in engine.step()}
        assert outs["short"].new_token_ids == [[outs["short"].new_token_ids[0][0]]]
        assert ("long" in outs) == (step == 4)
    done, _, _, _ = _drive(engine, {0: []})
    _assert_reference(ours, long_, params, done["long"])


def test_static_admission_waits_for_the_batch_to_drain(pair):
    _, ours = pair
    a, b, c = _prompts(5, 6, 7, seed=14)
    quick, slow = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), \
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    schedule = {0: [("a", a, quick, None), ("b", b, slow, None)], 1: [("c", c, quick, None)]}
    _, _, static_end, _ = _drive(Engine(ours, _config(admission="static")), schedule)
    _, _, continuous_end, _ = _drive(Engine(ours, _config()), schedule)
    assert static_end == {"a": 2, "b": 7, "c": 10}  # c is admitted at step 8, once b drained
    assert continuous_end == {"a": 2, "b": 7, "c": 3}


def test_stop_tokens_max_tokens_and_ignore_eos(pair):
    _, ours = pair
    p = _prompts(10)
    engine = Engine(ours, _config(), stop_token_ids=(STOP,))
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
    engine = Engine(ours, _config(blocks=8, max_num_seqs=4))
    with pytest.raises(ValueError, match="prompt has shape"):
        engine.add_request("a", torch.randn(5, H + 1), SamplingParams())
    with pytest.raises(ConfigError, match="max_num_seqs"):
        engine.add_request("a", _prompts(3)[0], SamplingParams(n=5))
    with pytest.raises(ConfigError, match="need 9 KV blocks, the pool holds 8"):
        engine.add_request("a", _prompts(3)[0], SamplingParams(n=2, max_tokens=64))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.add_request("a", _prompts(3)[0], SamplingParams(max_tokens=32766))
    engine.add_request("a", _prompts(3)[0], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request("a", _prompts(3)[0], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="drives the engine itself"):
        engine.generate(_prompts(3), SamplingParams())
    engine.abort_request("a")
    engine.abort_request("never added")
    with pytest.raises(ConfigError, match="2 prompts but 1"):
        engine.generate(_prompts(3, 4), [SamplingParams()])
    with pytest.raises(ConfigError, match="block_size must be a power of two"):
        EngineConfig(block_size=12)
    with pytest.raises(ConfigError, match="less than one block"):
        Engine(ours, EngineConfig(kv_cache_memory=100))


def test_block_allocator_and_prefix_cache_bookkeeping():
    alloc = BlockAllocator(10)
    a = alloc.allocate(4)
    assert a == [0, 1, 2, 3] and alloc.high_water == 4
    alloc.free([1, 2])
    assert alloc.allocate(3) == [1, 2, 4]  # lowest first
    cache = PrefixCache(alloc)
    prompt = torch.randn(9, 4)
    entry = cache.insert("k", alloc.allocate(2), prompt, torch.zeros(4))
    assert alloc.num_free == 3
    assert cache.insert("k", [7], prompt, torch.zeros(4)) is None  # the key is taken
    assert cache.lookup("k", prompt + 1) is None and cache.lookup("k", prompt[:8]) is None  # another prompt
    assert cache.lookup("k", prompt) is entry and entry.refs == 2
    cache.release(entry)
    cache.release(entry)
    assert cache.evictable_blocks == 2
    cache.evict(alloc.num_free + 2)
    assert not cache.entries and alloc.num_free == 5
    kept = cache.insert("j", alloc.allocate(2), prompt, torch.zeros(4))
    cache.clear()  # read by someone: its blocks come back when released
    assert alloc.num_free == 3 and not cache.entries
    cache.release(kept)
    assert alloc.num_free == 5


def test_engine_on_the_triton_kernels(pair):
    """Continuous batching with the Triton attention and sampling kernels (interpreter here): joins at two
    steps, four-position blocks, chunked prefill -> the one-at-a-time reference's tokens."""
    _, ours = pair
    prompts = _prompts(9, 3, 14, seed=15)
    params = [MIXED[0], MIXED[1], MIXED[4]]
    reqs = [(f"t{i}", p, sp, None) for i, (p, sp) in enumerate(zip(prompts, params))]
    with ops.force_backend("triton", "cascade_attention", "sample"):
        done, _, _, _ = _drive(Engine(ours, _config(block_size=4, max_num_batched_tokens=8)),
                               {0: reqs[:2], 3: reqs[2:]})
    for rid, prompt, sp, _ in reqs:
        _assert_reference(ours, prompt, sp, done[rid])


def test_engine_cpu_paths_equal_the_torch_references(pair):
    _, ours = pair
    assert ops.backends("cascade_attention", "cpu")[0] == ops.backends("sample", "cpu")[0] == "cpu"
    prompts = _prompts(9, 3, 14)
    engine = Engine(ours, _config(block_size=4), stop_token_ids=(STOP,))
    got = engine.generate(prompts, MIXED[:3])
    with ops.force_backend("torch", "cascade_attention", "sample"):
        expected = engine.generate(prompts, MIXED[:3])
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
    engine = Engine(ours, EngineConfig(kv_cache_memory=2 << 30), stop_token_ids=(-1,))
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
def test_cuda_graphs_stay_exact_while_requests_come_and_go():
    """fp32 on the GPU, CUDA graphs on, requests joining at steps 0, 3 and 9 with different group sizes and
    lengths (the batch moves between graph buckets): every sample's log-probs equal a no-cache forward of its own
    tokens, and graph replay gives what eager decoding gives."""
    _, ours = _full_size_pair(torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [(torch.randn(n, 896, generator=g) * 0.1).cuda() for n in (300, 17, 1000)]
    params = [SamplingParams(n=n, temperature=1.0, top_k=50, max_tokens=m, seed=3, ignore_eos=True)
              for n, m in ((3, 40), (1, 25), (8, 30))]
    reqs = [(f"c{i}", p, sp, None) for i, (p, sp) in enumerate(zip(prompts, params))]
    schedule = {0: reqs[:1], 3: reqs[1:2], 9: reqs[2:]}
    graphed_engine = Engine(ours, EngineConfig(kv_cache_memory=1 << 30))
    graphed, _, _, _ = _drive(graphed_engine, schedule)
    eager, _, _, _ = _drive(Engine(ours, EngineConfig(kv_cache_memory=1 << 30, cuda_graphs=False)), schedule)
    assert graphed_engine.runner.graphs
    for rid, p, sp, _ in reqs:
        for a, b in zip(graphed[rid], eager[rid]):
            assert a.token_ids == b.token_ids
            ids = torch.tensor(a.token_ids, device="cuda")
            with torch.no_grad():
                logits = ours(torch.cat([p, ours.embed(ids)])[None])[0, p.shape[0] - 1:-1].float()
            expected = torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]
            assert torch.allclose(a.logprobs, expected.cpu(), atol=2e-3)
