"""Each wire of one GRPO step (grpo/step.py's grpo_step, the function the trainer and the benchmark run), pinned
so that crossing it fails a test: the completion mask, the rollout seeds, which label each completion is scored
against, where the reference log-probs come from, and the grouping of the advantages; and the wires of the options
that are off by default, each against an independent computation:
* overlong filtering (mask_truncated_completions): the step's gradient equals that of the loss computed
  without the truncated rows; DAPO's soft overlong punishment (overlong_buffer_len, overlong_penalty_factor) at
  its boundary values and as the registry's "overlong" reward in the step's rewards and metrics;
* LoRA (use_peft): only the adapters change, the reference log-probs are a separate base model's, the first
  rollout is the base model's, a resumed run equals the straight one;
* dynamic sampling: a step whose first batch of prompts has only zero-variance groups draws the next ones (in
  generation batches, as the step's own prompts), its gradient equals a plain step's on the kept groups alone,
  it stops at max_num_gen_batches or the end of the data, and a resumed run equals the straight one.

The engine is a scripted stand-in (the completions are chosen, the SamplingParams it is handed are recorded);
everything else is the real step on the tiny checkpoint."""
import copy
from types import SimpleNamespace

import pytest
import torch

from omni_fast import task
from omni_fast.config import ConfigError, GRPOConfig
from omni_fast.distributed import DistContext
from omni_fast.engine.sequence import Completion
from omni_fast.grpo import rewards as reward_registry
from omni_fast.grpo import step as step_module
from omni_fast.grpo.inputs import tower_features
from omni_fast.grpo.logprobs import naive_completion_logprobs
from omni_fast.grpo.rewards import soft_overlong_punishment
from omni_fast.grpo.rollout import rollout_seed
from omni_fast.model import lora
from omni_fast.model.checkpoint import load_checkpoint

G = 4


class ScriptedEngine:
    """The engine's generate(): per prompt, the G completions `script(prompt, call)` returns (token ids, a stop
    token ending those that stop); every call's SamplingParams are kept in `params`."""

    def __init__(self, default_stop: tuple[int, ...], script):
        self.default_stop, self.script, self.params = default_stop, script, []

    def generate(self, prefixes, params):
        assert len(prefixes) == len(params)
        self.params.append(list(params))
        call = len(self.params) - 1
        rows = [self.script(b, call) for b in range(len(prefixes))]
        assert all(len(r) == p.n for r, p in zip(rows, params))
        return [[Completion(token_ids=list(ids), logprobs=torch.zeros(len(ids)),
                            finish_reason="stop" if ids and ids[-1] in self.default_stop else "length")
                 for ids in r] for r in rows]


class LossCalls:
    """grpo_step's calls of grpo_loss: (logp, advantages, mask, kwargs) of each."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = step_module.grpo_loss

        def spy(logp, advantages, mask, **kw):
            self.calls.append((logp.detach().clone(), advantages.clone(), mask.clone(), kw))
            return real(logp, advantages, mask, **kw)
        monkeypatch.setattr(step_module, "grpo_loss", spy)


@pytest.fixture
def loaded(tiny_ckpt):
    return load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32)


@pytest.fixture
def bang_reward():
    """A reward the scripted completions choose: the number of '!' in the text."""
    reward_registry.register_reward("bangs", lambda completions: [float(c.count("!")) for c in completions])
    yield
    reward_registry.REWARD_FUNCS.pop("bangs")


def _context(loaded, script, **overrides):
    kw = dict(num_generations=G, max_completion_length=6, learning_rate=1e-3, lr_scheduler_type="constant",
              reward_funcs=("format",), seed=7, max_grad_norm=0.0)
    cfg = GRPOConfig(**{**kw, **overrides})
    reference = loaded.model.copy_sharing_towers() if cfg.beta > 0 and not cfg.use_peft else None
    ctx = step_module.build_context(cfg, loaded, DistContext(), reference, total_steps=10)
    ctx.engine = ScriptedEngine(ctx.engine.default_stop, script)
    return ctx


def _micro(loaded, labels: list[str], indices: list[int], seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    b = len(labels)
    frames = torch.randn(b, loaded.config.num_frames, 3, 224, 224, generator=gen)
    mel = torch.randn(b, loaded.model.towers.audio.num_mel_bins, 3000, generator=gen) * 0.5
    records = [SimpleNamespace(label=label, index=i) for label, i in zip(labels, indices)]
    return [SimpleNamespace(frames=frames, mel=mel, records=records)]


def _run(ctx, micro, step: int) -> list[dict]:
    return list(step_module.grpo_step(ctx, micro, step, lambda name: _NoTimer()))


class _NoTimer:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.no_grad()
def _naive_logprobs(model, ctx, micro, rows: list[list[int]], width: int) -> torch.Tensor:
    """`model`'s log-probs of the completions `rows` of micro's 2 prompts (G each), the naive forward."""
    ids, bert = step_module.grpo_prompt(ctx)
    lengths = torch.tensor([len(r) for r in rows])
    completions = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    feats = tower_features(model, micro[0].frames, micro[0].mel)
    prefixes = model.prompt_embeddings([ids, ids], feats.vision, feats.audio, bert)
    return naive_completion_logprobs(model, prefixes, completions, lengths, G)


# --- the completion mask ----------------------------------------------------------------------------------------
def test_the_mask_is_each_completions_own_length(loaded, monkeypatch):
    """Rows that stop early on each stop id, rows cut at max_completion_length, a row that is its stop token
    alone, a row that stops on the last allowed position: the loss's mask is 1 exactly over each completion's
    tokens, its stop token included, and 0 after (completions are padded with <|im_end|>, a stop id, so a mask
    one position too long would train on padding)."""
    losses = LossCalls(monkeypatch)
    rows = []
    ctx = _context(loaded, lambda b, call: rows[b * G:(b + 1) * G])
    im_end, endoftext = ctx.engine.default_stop
    rows += [[100, 101, im_end], [100, endoftext], [100, 101, 102, 103, 104, 105], [im_end],
             [100, 101, 102, 103, 104, im_end], [100, 101, 102, endoftext], [200, 201, 202, 203, 204, 205],
             [100, 101, im_end]]
    _run(ctx, _micro(loaded, ["sad", "happy"], [0, 1]), step=1)
    ((logp, _, mask, _),) = losses.calls
    lengths = torch.tensor([len(r) for r in rows])
    assert lengths.tolist() == [3, 2, 6, 1, 6, 4, 6, 3]
    want = (torch.arange(6)[None] < lengths[:, None]).float()
    assert mask.shape == (2 * G, 6) and torch.equal(mask, want), (mask, want)
    assert bool((logp[mask == 0] == 0).all())  # the log-probs past each completion are zero too


# --- the rollout seeds ------------------------------------------------------------------------------------------
def test_the_seeds_change_with_the_step_and_the_prompt(loaded):
    ctx = _context(loaded, lambda b, call: [[100, 101]] * G)
    micro = _micro(loaded, ["sad", "happy"], [3, 8])
    _run(ctx, micro, step=1)
    _run(ctx, micro, step=2)
    seeds = {(step, p.seed) for step, call in zip((1, 2), ctx.engine.params) for p in call}
    assert [[p.seed for p in call] for call in ctx.engine.params] == \
        [[rollout_seed(7, step, index) for index in (3, 8)] for step in (1, 2)]
    assert len({seed for _, seed in seeds}) == 4  # another step, another prompt: another seed
    assert all(p.n == G and p.max_tokens == 6 and p.temperature == 1.0 and p.top_k == 50 for call in ctx.engine.params
               for p in call)


def test_the_seeds_are_the_same_after_a_resume(tiny_ckpt, tmp_path, monkeypatch):
    """Three steps straight, and a run stopped in step 2 then resumed from checkpoint-1: the engine is handed the
    same seeds for the same prompts at steps 2 and 3, those of rollout_seed(seed, step, each prompt's index)."""
    from omni_fast.grpo.trainer import Trainer
    from omni_fast.toy import make_toy_task, toy_config

    toy = make_toy_task(tmp_path / "toy", clips_per_label=2)

    def config(out):
        return toy_config(toy, tiny_ckpt, tmp_path / out, "grpo", max_steps=3, save_steps=1, num_generations=G,
                          max_completion_length=4, per_device_train_batch_size=2, progress=False, seed=11)

    def recording(trainer):
        seen = []
        real = trainer.engine.generate
        trainer.engine.generate = lambda prefixes, params: seen.append([p.seed for p in params]) or real(prefixes,
                                                                                                       params)
        return seen

    prompts = []
    monkeypatch.setattr(step_module, "sample_completions", _recording_prompts(prompts))
    straight = Trainer(config("a"))
    seen_a = recording(straight)
    straight.train()

    class Stop(Exception):
        pass

    def stop_in_step_2(m):
        if m["step"] == 2:
            raise Stop
    first = Trainer(config("b"), on_step=stop_in_step_2)
    recording(first)
    with pytest.raises(Stop):
        first.train()
    resumed = Trainer(config("b"), "latest")
    assert resumed.pos.step == 1
    seen_b = recording(resumed)
    resumed.train()
    assert len(seen_a) == 3 and seen_b == seen_a[1:]
    assert seen_a == [[rollout_seed(11, step, index) for index in prompts[step - 1]] for step in (1, 2, 3)]
    assert len({seed for seeds in seen_a for seed in seeds}) == 6


def _recording_prompts(prompts: list):
    real = step_module.sample_completions

    def record(model, engine, batches, bert, step, cfg, ignore_eos=False):
        prompts.append([i for b in batches for i in b.indices])
        return real(model, engine, batches, bert, step, cfg, ignore_eos)
    return record


# --- rewards against each completion's own prompt -----------------------------------------------------------------
def test_each_completion_is_scored_against_its_own_prompts_label(loaded, monkeypatch):
    """B = 2 prompts with different labels, completions answering either: the accuracy reward of row r is 1
    exactly where its answer is the label of prompt r // G."""
    tok = loaded.tokenizer
    answers = [["sad", "happy", "happy", "sad"], ["happy", "happy", "sad", "sad"]]
    seen = {}
    real = step_module.make_rollout
    monkeypatch.setattr(step_module, "make_rollout", lambda *a, **k: seen.setdefault("rollout", real(*a, **k)))

    def script(b, call):
        return [_text_ids(tok, task.response("x", a)) + [ctx.engine.default_stop[0]] for a in answers[b]]
    ctx = _context(loaded, script, reward_funcs=("accuracy", "format"))
    _run(ctx, _micro(loaded, ["sad", "happy"], [0, 1]), step=1)
    ro = seen["rollout"]
    assert ro.texts == [task.response("x", a) for row in answers for a in row]
    assert ro.rewards["rewards/accuracy_reward"] == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert ro.rewards["rewards/format_reward"] == [1.0] * 2 * G


# --- the advantages ---------------------------------------------------------------------------------------------
def test_the_advantages_are_normalised_within_each_prompts_group(loaded, monkeypatch, bang_reward):
    tok = loaded.tokenizer
    bangs = [[0, 1, 2, 6], [10, 10, 11, 13]]
    losses = LossCalls(monkeypatch)

    def script(b, call):
        return [_text_ids(tok, "ok" + "!" * k) for k in bangs[b]]
    ctx = _context(loaded, script, reward_funcs=("bangs",))
    _run(ctx, _micro(loaded, ["sad", "happy"], [0, 1]), step=1)
    ((_, advantages, _, _),) = losses.calls
    r = torch.tensor(bangs, dtype=torch.float64)                                      # (B, G)
    want = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    assert torch.allclose(advantages.double(), want, atol=1e-5), (advantages, want)


# --- the reference log-probs ------------------------------------------------------------------------------------
def test_the_reference_log_probs_are_the_initial_weights_after_several_steps(loaded, monkeypatch, bang_reward):
    """Three optimizer steps move the policy; the third step's reference log-probs still equal the naive
    forward of a copy of the initial weights on that step's completions, and differ from the policy's."""
    tok = loaded.tokenizer
    initial = copy.deepcopy(loaded.model)
    losses = LossCalls(monkeypatch)

    def script(b, call):
        return [_text_ids(tok, "ok" + "!" * (k + call + 3 * b)) for k in range(G)]
    ctx = _context(loaded, script, reward_funcs=("bangs",), beta=0.3, learning_rate=3e-3)
    micro = _micro(loaded, ["sad", "happy"], [0, 1])
    for step in (1, 2, 3):
        _run(ctx, micro, step)
    logp, _, mask, kw = losses.calls[-1]
    ref = kw["ref_logp"]
    want = _naive_logprobs(initial, ctx, micro, script(0, 2) + script(1, 2), mask.shape[1])
    scale = float(want.abs().max())
    assert float((ref - want).abs().max()) <= 1e-5 * scale
    assert float((logp - ref).abs().max()) > 1e-3 * scale  # the policy has moved: the check can tell them apart


# --- rollouts per generation batch ------------------------------------------------------------------------------
def test_a_generation_batch_in_one_engine_call_equals_per_micro_batch_rollouts(tiny_ckpt, monkeypatch):
    """The real engine, two steps of two micro-batches of one prompt, a reward that varies between completions:
    rolled out per micro-batch (generation_batch_size 1, two engine calls a step) and as one generation batch (the
    default: the step's two prompts in one call), the completions, every loss and the weights after both steps
    are equal bit for bit (and the weights have moved)."""
    reward_registry.register_reward("chars", lambda completions: [float(len(c) % 5) for c in completions])
    runs, real_make = {}, step_module.make_rollout
    try:
        for gen in (1, None):
            loaded = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32)
            calls, rollouts = [], []
            monkeypatch.setattr(step_module, "make_rollout", lambda *a, **k: rollouts.append(real_make(*a, **k))
                                or rollouts[-1])
            cfg = GRPOConfig(num_generations=G, max_completion_length=6, learning_rate=1e-2, seed=7,
                             per_device_train_batch_size=1, gradient_accumulation_steps=2, generation_batch_size=gen,
                             reward_funcs=("chars",), temperature=1.3)
            ctx = step_module.build_context(cfg, loaded, DistContext(), loaded.model.copy_sharing_towers(), 10)
            real_generate = ctx.engine.generate
            ctx.engine.generate = lambda prefixes, params: calls.append(len(prefixes)) or real_generate(prefixes,
                                                                                                      params)
            micro = _micro(loaded, ["sad"], [0], seed=1) + _micro(loaded, ["happy"], [1], seed=2)
            metrics = [m for step in (1, 2) for m in _run(ctx, micro, step)]
            weights = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
            runs[gen] = (calls, [ro.completions for ro in rollouts], [ro.advantages for ro in rollouts],
                         [m["loss"] for m in metrics], weights)
    finally:
        reward_registry.REWARD_FUNCS.pop("chars")
    (calls_a, comp_a, adv_a, loss_a, w_a), (calls_b, comp_b, _, loss_b, w_b) = runs[1], runs[None]
    assert calls_a == [1, 1, 1, 1] and calls_b == [2, 2]
    assert len(comp_a) == len(comp_b) == 4 and all(torch.equal(a, b) for a, b in zip(comp_a, comp_b))
    assert len({tuple(c.flatten().tolist()) for c in comp_a}) == 4  # the rollouts differ: the check can fail
    assert any(bool(a.abs().max() > 0) for a in adv_a)  # some advantage is not zero: the weights must move
    assert loss_a == loss_b
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    start = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32).model.state_dict()
    assert any(not torch.equal(start[k], w_a[k]) for k in w_a)


def test_generation_batch_size_must_split_the_step():
    from omni_fast.config import ConfigError

    assert GRPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=3).generation_prompts == 6
    assert GRPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=3,
                      generation_batch_size=2).generation_prompts == 2
    for bad in (0, 3, 4, 12):
        with pytest.raises(ConfigError, match="generation_batch_size"):
            GRPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=3, generation_batch_size=bad)


# --- overlong filtering ------------------------------------------------------------------------------------------
MAX_LEN = 6


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from omni_fast.toy import make_toy_task

    return make_toy_task(tmp_path_factory.mktemp("toy"), clips_per_label=2)


@pytest.fixture
def length_reward():
    """A reward that reads the completions' token counts (a keyword-only parameter the registry fills)."""
    reward_registry.register_reward("by_length", lambda completions, *, completion_lengths: [
        float(n * n % 7) for n in completion_lengths])
    yield
    reward_registry.REWARD_FUNCS.pop("by_length")


def _options_context(loaded, script, **overrides):
    return _context(loaded, script, **{"reward_funcs": ("by_length",), "beta": 0.0, **overrides})


def _gradients(monkeypatch, ctx) -> dict:
    """The gradients the step hands its optimizer, by parameter name."""
    seen = {}
    real = step_module.optimizer_step

    def spy(c):
        seen.update({n: p.grad.detach().clone() for n, p in c.trainable if p.grad is not None})
        return real(c)
    monkeypatch.setattr(step_module, "optimizer_step", spy)
    return seen


def _rows(stop: int, endoftext: int) -> list[list[int]]:
    """2 prompts x G: early stops, rows cut at MAX_LEN without a stop token (truncated), and a row that stops on
    its last allowed position (not truncated)."""
    return [[100, 101, stop], [100, 101, 102, 103, 104, 105], [100, 101, 102, 103, 104, stop], [100, endoftext],
            [200, 201, 202, 203, 204, 205], [100, 101, 102, stop], [201, 202, 203, 204, 205, 206], [stop]]


def _independent_gradients(initial, ctx, micro, rows, keep, loss_type) -> dict:
    """The loss over the kept rows only, from scratch: each row's naive forward on its own prompt, advantages
    over its whole group (every completion's reward), the normaliser over the kept rows (grpo: their count;
    dapo: their tokens), backward."""
    ids, bert = step_module.grpo_prompt(ctx)
    feats = tower_features(initial, micro[0].frames, micro[0].mel)
    prefixes = initial.prompt_embeddings([ids, ids], feats.vision, feats.audio, bert)
    lengths = [len(r) for r in rows]
    rewards = torch.tensor([float(n * n % 7) for n in lengths], dtype=torch.float64).view(-1, G)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    terms, tokens = [], 0
    for r in (r for r in range(len(rows)) if keep[r]):
        ids_r = torch.tensor(rows[r])[None]
        logp = naive_completion_logprobs(initial, [prefixes[r // G]], ids_r, [lengths[r]], 1)[0]
        per_token = -torch.exp(logp - logp.detach()) * float(adv[r])
        terms.append(per_token.mean() if loss_type == "grpo" else per_token.sum())
        tokens += lengths[r]
    loss = sum(terms) / (len(terms) if loss_type == "grpo" else tokens)
    loss.backward()
    return {n: p.grad for n, p in initial.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_truncated_completions_are_left_out_of_the_loss(loaded, monkeypatch, length_reward, loss_type):
    """The step's gradient with mask_truncated_completions equals the loss computed on the other rows alone
    (their rewards still in their groups' advantages); without the option it does not (the check can tell)."""
    initial = copy.deepcopy(loaded.model)
    rows = []
    ctx = _options_context(loaded, lambda b, call: rows[b * G:(b + 1) * G], mask_truncated_completions=True,
                   loss_type=loss_type)
    rows += _rows(*ctx.engine.default_stop)
    grads = _gradients(monkeypatch, ctx)
    micro = _micro(loaded, ["sad", "happy"], [0, 1])
    (metrics,) = _run(ctx, micro, step=1)
    truncated = [len(r) == MAX_LEN and r[-1] not in ctx.engine.default_stop for r in rows]
    assert truncated == [False, True, False, False, True, False, True, False]
    assert metrics["truncated_ratio"] == pytest.approx(3 / 8)
    want = _independent_gradients(copy.deepcopy(initial), ctx, micro, rows, [not t for t in truncated], loss_type)
    scale = max(float(g.abs().max()) for g in want.values())
    assert want.keys() == grads.keys()
    assert max(float((grads[n] - want[n]).abs().max()) for n in want) <= 1e-5 * scale
    every = _independent_gradients(copy.deepcopy(initial), ctx, micro, rows, [True] * len(rows), loss_type)
    assert max(float((grads[n] - every[n]).abs().max()) for n in want) > 1e-2 * scale


# --- DAPO's soft overlong punishment -----------------------------------------------------------------------------
def test_soft_overlong_punishment_at_its_boundaries():
    """max 10 tokens, the last 4 penalised, factor 0.5: nothing up to the buffer's start (6), -factor/4 at its
    first token, -factor at the last allowed token, and -factor beyond."""
    got = soft_overlong_punishment([1, 5, 6, 7, 9, 10, 11, 40], max_length=10, buffer_len=4, factor=0.5)
    assert got == [0.0, 0.0, 0.0, -0.125, -0.375, -0.5, -0.5, -0.5]
    assert soft_overlong_punishment([3, 4], max_length=4, buffer_len=4, factor=2.0) == [-1.5, -2.0]


def test_the_overlong_reward_is_on_when_its_buffer_is_set():
    assert GRPOConfig().rewards == (("accuracy", 1.0), ("format", 1.0))
    cfg = GRPOConfig(reward_weights=(1.0, 0.5), overlong_buffer_len=64)
    assert cfg.rewards == (("accuracy", 1.0), ("format", 0.5), ("overlong", 1.0))
    named = GRPOConfig(reward_funcs=("format", "overlong"), reward_weights=(1.0, 2.0), overlong_buffer_len=64)
    assert named.rewards == (("format", 1.0), ("overlong", 2.0))  # named once, at its own weight
    with pytest.raises(ConfigError, match="overlong_buffer_len is 0"):
        GRPOConfig(reward_funcs=("format", "overlong"))
    with pytest.raises(ConfigError, match="overlong_buffer_len must be an integer in \\[0, max_completion_length 8\\]"):
        GRPOConfig(max_completion_length=8, overlong_buffer_len=9)
    with pytest.raises(ConfigError, match="overlong_penalty_factor must be >= 0"):
        GRPOConfig(overlong_buffer_len=4, overlong_penalty_factor=-1.0)


def test_the_overlong_reward_scores_each_completion_by_its_tokens(loaded, monkeypatch, length_reward):
    """Through the step: the "overlong" reward of each completion is the punishment of its token count (stop
    token included), it adds to the total reward the advantages are taken from, and it is logged as
    rewards/overlong_reward."""
    rows = []
    ctx = _options_context(loaded, lambda b, call: rows[b * G:(b + 1) * G], overlong_buffer_len=3,
                   overlong_penalty_factor=0.6)
    rows += _rows(*ctx.engine.default_stop)
    seen = {}
    real = step_module.make_rollout
    monkeypatch.setattr(step_module, "make_rollout", lambda *a, **k: seen.setdefault("rollout", real(*a, **k)))
    (metrics,) = _run(ctx, _micro(loaded, ["sad", "happy"], [0, 1]), step=1)
    lengths = [len(r) for r in rows]
    want = [-0.6 * max(0, n - 3) / 3 for n in lengths]  # max 6, buffer 3: lengths 4..6 penalised
    ro = seen["rollout"]
    assert ro.rewards["rewards/overlong_reward"] == pytest.approx(want)
    assert ro.total_rewards.tolist() == pytest.approx([float(n * n % 7) + w for n, w in zip(lengths, want)])
    assert metrics["rewards/overlong_reward"] == pytest.approx(sum(want) / len(want))


# --- LoRA -------------------------------------------------------------------------------------------------------
def _bang_rows(tok, b, call):
    return [_text_ids(tok, "ok" + "!" * (k + call + 3 * b)) for k in range(G)]


def test_lora_trains_the_adapters_and_nothing_else(loaded, bang_reward):
    """Only adapter parameters are stepped; after two steps every other weight is bit-equal to the start, B has
    moved at step 1 and A at step 2 (its gradient is B^T ..., zero while B is 0)."""
    initial = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    ctx = _options_context(loaded, lambda b, call: _bang_rows(loaded.tokenizer, b, call), reward_funcs=("bangs",),
                   use_peft=True, lora_r=4, lora_target_modules=lora.TARGETS, beta=0.1, max_completion_length=16)
    assert ctx.trainable and all(lora.is_adapter(n) for n, _ in ctx.trainable)
    start = {n: p.detach().clone() for n, p in ctx.trainable}
    micro = _micro(loaded, ["sad", "happy"], [0, 1])
    _run(ctx, micro, 1)
    after_one = {n: p.detach().clone() for n, p in ctx.trainable}
    _run(ctx, micro, 2)
    for name, p in loaded.model.named_parameters():
        if not lora.is_adapter(name):
            assert torch.equal(p, initial[name.replace(".base_layer.", ".")]), name
    now = dict(ctx.trainable)
    a_names, b_names = [n for n in now if ".lora_A." in n], [n for n in now if ".lora_B." in n]
    assert all(not torch.equal(after_one[n], start[n]) for n in b_names)
    assert all(torch.equal(after_one[n], start[n]) for n in a_names)  # B = 0 at step 1: A's gradient is 0
    assert all(not torch.equal(now[n], after_one[n]) for n in a_names)


def test_lora_reference_log_probs_are_the_base_models(loaded, monkeypatch, bang_reward):
    """Three steps move the adapters; the third step's reference log-probs (the policy with its adapters off, no
    second model) equal the naive forward of a separate copy of the base model, and differ from the policy's."""
    tok = loaded.tokenizer
    initial = copy.deepcopy(loaded.model)
    calls = []
    real = step_module.grpo_loss

    def spy(logp, advantages, mask, **kw):
        calls.append((logp.detach().clone(), mask.clone(), kw["ref_logp"]))
        return real(logp, advantages, mask, **kw)
    monkeypatch.setattr(step_module, "grpo_loss", spy)
    ctx = _options_context(loaded, lambda b, call: _bang_rows(tok, b, call), reward_funcs=("bangs",), beta=0.3,
                   learning_rate=3e-2, use_peft=True, lora_r=4, max_completion_length=16)
    assert ctx.reference is None  # no reference copy
    micro = _micro(loaded, ["sad", "happy"], [0, 1])
    for step in (1, 2, 3):
        _run(ctx, micro, step)
    logp, mask, ref = calls[-1]
    want = _naive_logprobs(initial, ctx, micro, _bang_rows(tok, 0, 2) + _bang_rows(tok, 1, 2), mask.shape[1])
    scale = float(want.abs().max())
    assert float((ref - want).abs().max()) <= 1e-5 * scale
    assert float((logp - ref).abs().max()) > 1e-3 * scale  # the adapters have moved: the check can tell
    assert all(p.requires_grad for _, p in ctx.trainable)  # the reference pass left the adapters trainable


def test_zero_initialised_adapters_roll_out_as_the_base_model(loaded):
    """The first rollout of a LoRA run (B = 0) is the base model's, token for token, with the same seeds."""
    from omni_fast.engine.engine import Engine
    from omni_fast.grpo.rollout import RolloutPrompts, sample_completions

    base = copy.deepcopy(loaded.model)
    cfg = GRPOConfig(num_generations=G, max_completion_length=MAX_LEN, use_peft=True, lora_r=4,
                     lora_target_modules=lora.TARGETS)
    ctx = step_module.build_context(cfg, loaded, DistContext(), None, total_steps=1)
    ids, bert = step_module.grpo_prompt(ctx)
    micro = _micro(loaded, ["sad", "happy"], [0, 1])
    out = {}
    for name, model, engine in (("lora", loaded.model, ctx.engine),
                                ("base", base, Engine(base, stop_token_ids=ctx.engine.default_stop))):
        feats = tower_features(model, micro[0].frames, micro[0].mel)
        (done,) = sample_completions(model, engine, [RolloutPrompts(feats, [ids, ids], [0, 1])], bert, 1, cfg)
        out[name] = [c.token_ids for c in done]
    assert out["lora"] == out["base"] and len({tuple(t) for t in out["base"]}) > 1


@pytest.mark.slow  # about 15 s: six toy steps
def test_lora_resume_is_exact(toy, tiny_ckpt, tmp_path):
    """Three LoRA steps straight, and one step saved then resumed for two: the same adapter and metrics; the
    checkpoint holds the adapter in PEFT's format, not the model."""
    from safetensors.torch import load_file

    from omni_fast.grpo.trainer import Trainer
    from training import run_config

    kw = dict(save_steps=1, use_peft=True, lora_r=4, beta=0.1, reward_funcs=("rewards_for_tests:text_length",))
    straight = Trainer(run_config(toy, tiny_ckpt, tmp_path / "a", max_steps=3, **kw))
    history = straight.train()
    first = Trainer(run_config(toy, tiny_ckpt, tmp_path / "b", max_steps=1, **kw))
    first.train()
    files = sorted(p.name for p in (tmp_path / "b" / "checkpoint-1").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pt",
                     "trainer_state.json"]
    resumed = Trainer(run_config(toy, tiny_ckpt, tmp_path / "b", max_steps=3, **kw), "latest")
    again = resumed.train()
    a = load_file(str(tmp_path / "a" / "checkpoint-3" / lora.ADAPTER_WEIGHTS))
    b = load_file(str(tmp_path / "b" / "checkpoint-3" / lora.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in again] == [m["loss"] for m in history[1:]]
    assert history[-1]["kl"] > 0  # the adapters moved away from the reference
    with pytest.raises(ConfigError, match="lora_r 4 -> 8"):
        Trainer(run_config(toy, tiny_ckpt, tmp_path / "b", max_steps=4, **{**kw, "lora_r": 8}), "latest")


def test_lora_in_the_sft_stage_trains_and_saves_the_adapters_only(toy, tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    from omni_fast.grpo.trainer import Trainer
    from training import run_config

    trainer = Trainer(run_config(toy, tiny_ckpt, tmp_path / "sft", "sft", max_steps=1, use_peft=True, lora_r=4,
                                 learning_rate=1e-2))
    trainer.train()
    assert trainer.trainable and all(lora.is_adapter(n) for n, _ in trainer.trainable)
    saved = load_file(str(trainer.last_checkpoint / lora.ADAPTER_WEIGHTS))
    assert min(float(v.abs().max()) for k, v in saved.items() if ".lora_B." in k) > 0  # B moved off 0
    assert not (trainer.last_checkpoint / "model.safetensors").exists()


# --- dynamic sampling -------------------------------------------------------------------------------------------
def _draws(loaded, n: int) -> list:
    """n batches of a step's 2 prompts each (distinct clips and annotation indices)."""
    return [_micro(loaded, ["sad", "happy"], [2 * d, 2 * d + 1], seed=d) for d in range(n)]


def _same(length: int) -> list[list[int]]:
    return [[100 + k for k in range(length)]] * G  # G completions of one length: one reward, zero variance


def _varied(first: int) -> list[list[int]]:
    return [[100 + k for k in range(n)] for n in (first, first + 1, first + 2, first + 3)]


# per batch drawn (one engine call by default), per prompt: draw 0 all constant, draw 1 one varied group,
# draw 2 two (one more than the step needs: the first in data order is kept)
DYNAMIC_SCRIPT = [[_same(2), _same(3)], [_varied(1), _same(4)], [_varied(2), _varied(3)]]


def _dynamic_context(loaded, script, **kw):
    return _options_context(loaded, script, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    dynamic_sampling=True, max_completion_length=8, **kw)


def test_dynamic_sampling_draws_until_the_step_is_full_and_trains_on_the_kept_groups_alone(loaded, monkeypatch,
                                                                                           length_reward):
    """The first batch of prompts holds only zero-variance groups, so the step draws the next ones until it has
    its 2 groups (the third batch has one more than needed: the first is kept); its gradient equals that of a
    plain step on the kept groups alone."""
    initial = copy.deepcopy(loaded.model)
    draws = _draws(loaded, 3)
    ctx = _dynamic_context(loaded, lambda b, call: DYNAMIC_SCRIPT[call][b])
    grads = _gradients(monkeypatch, ctx)
    asked = []

    def more():
        asked.append(len(asked) + 1)
        return draws[len(asked)]
    (metrics,) = list(step_module.grpo_step(ctx, draws[0], 1, lambda name: _NoTimer(), more))
    assert asked == [1, 2] and len(ctx.engine.params) == 3
    assert (metrics["num_gen_batches"], metrics["prompts_consumed"], metrics["groups_dropped"],
            metrics["groups"]) == (3, 6, 4, 2)
    # the kept groups: batch 1's first prompt and batch 2's first, in one plain step
    kept = [(draws[1][0], 0), (draws[2][0], 0)]
    micro = [SimpleNamespace(frames=torch.cat([b.frames[i:i + 1] for b, i in kept]),
                             mel=torch.cat([b.mel[i:i + 1] for b, i in kept]),
                             records=[b.records[i] for b, i in kept])]
    plain_loaded = copy.copy(loaded)
    plain_loaded.model = initial
    plain = _options_context(plain_loaded, lambda b, call: [DYNAMIC_SCRIPT[1][0], DYNAMIC_SCRIPT[2][0]][b],
                     per_device_train_batch_size=2, gradient_accumulation_steps=1, max_completion_length=8)
    want = {}
    monkeypatch.setattr(step_module, "optimizer_step",
                        lambda c: want.update({n: p.grad.clone() for n, p in c.trainable if p.grad is not None})
                        or (0.0, 0.0))
    (plain_metrics,) = _run(plain, micro, 1)
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0 and want.keys() == grads.keys()
    assert max(float((grads[n] - want[n]).abs().max()) for n in want) <= 1e-5 * scale
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-5, abs=1e-7)
    assert metrics["reward"] == pytest.approx(plain_metrics["reward"])  # the metrics are the kept groups'


def test_dynamic_sampling_rolls_each_draw_out_in_generation_batches(tiny_ckpt, monkeypatch, length_reward):
    """With generation_batch_size 1 (per_device_train_batch_size 1, 2 micro-batches a step) every draw of a step's
    prompts is rolled out in two engine calls of one prompt (grpo/step.py's generation_batch); by default in one
    call of both. The same groups are kept and dropped, and the gradient is the same."""
    index_of = {rollout_seed(7, 1, i): i for i in range(6)}
    script = lambda params: [DYNAMIC_SCRIPT[index_of[p.seed] // 2][index_of[p.seed] % 2] for p in params]  # noqa: E731
    runs = {}
    for gen in (1, None):
        loaded = load_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32)
        ctx = _options_context(loaded, None, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                               generation_batch_size=gen, dynamic_sampling=True, max_completion_length=8)
        calls = []
        ctx.engine.generate = lambda prefixes, params, real=ctx.engine.generate: calls.append(len(params)) or \
            real(prefixes, params)
        ctx.engine.script = lambda b, call: script(ctx.engine.params[call])[b]
        grads = _gradients(monkeypatch, ctx)
        draws = [_micro(loaded, ["sad"], [2 * d], seed=d) + _micro(loaded, ["happy"], [2 * d + 1], seed=d)
                 for d in range(3)]
        it = iter(draws[1:])
        (metrics,) = list(step_module.grpo_step(ctx, draws[0], 1, lambda name: _NoTimer(), lambda: next(it, None)))
        runs[gen] = calls, metrics, grads
    (calls_1, m_1, g_1), (calls_all, m_all, g_all) = runs[1], runs[None]
    assert calls_1 == [1] * 6 and calls_all == [2] * 3
    for m in (m_1, m_all):
        assert (m["num_gen_batches"], m["prompts_consumed"], m["groups_dropped"], m["groups"]) == (3, 6, 4, 2)
    assert m_1["loss"] == pytest.approx(m_all["loss"], rel=1e-6)
    scale = max(float(g.abs().max()) for g in g_all.values())
    assert scale > 0 and g_1.keys() == g_all.keys()
    assert max(float((g_1[n] - g_all[n]).abs().max()) for n in g_all) <= 1e-6 * scale


@pytest.mark.parametrize("limit,data,want", [(2, 3, (2, 4, 3, 1)),   # max_num_gen_batches reached
                                             (10, 2, (2, 4, 3, 1)),  # the epoch has no more prompts
                                             (1, 3, (1, 2, 2, 0))])  # no draw at all: a step without a group
def test_dynamic_sampling_stops_at_its_limit_or_the_end_of_the_data(loaded, length_reward, limit, data, want):
    draws = _draws(loaded, data)
    ctx = _dynamic_context(loaded, lambda b, call: DYNAMIC_SCRIPT[call][b], max_num_gen_batches=limit)
    before = {n: p.detach().clone() for n, p in ctx.trainable}
    it = iter(draws[1:])
    (metrics,) = list(step_module.grpo_step(ctx, draws[0], 1, lambda name: _NoTimer(), lambda: next(it, None)))
    assert (metrics["num_gen_batches"], metrics["prompts_consumed"], metrics["groups_dropped"],
            metrics["groups"]) == want
    moved = any(not torch.equal(p, before[n]) for n, p in ctx.trainable)
    assert moved == (want[3] > 0)  # no group: no gradient, the weights stay


@pytest.mark.slow  # about 40 s: nine toy steps with up to 3 batches of prompts each
def test_dynamic_sampling_resumes_exactly(toy, tiny_ckpt, tmp_path):
    """Steps that drop groups and draw more prompts: a run stopped after step 1 and resumed draws from where the
    straight run was (the data position advanced by every batch drawn), and lands on the same weights."""
    from safetensors.torch import load_file

    from omni_fast.grpo.metrics import read_metrics
    from omni_fast.grpo.trainer import Trainer
    from training import run_config

    kw = dict(save_steps=1, dynamic_sampling=True, max_num_gen_batches=3,
              reward_funcs=("rewards_for_tests:varied_for_happy",))
    Trainer(run_config(toy, tiny_ckpt, tmp_path / "a", max_steps=3, **kw)).train()
    Trainer(run_config(toy, tiny_ckpt, tmp_path / "b", max_steps=1, **kw)).train()
    Trainer(run_config(toy, tiny_ckpt, tmp_path / "b", max_steps=3, **kw), "latest").train()
    straight, resumed = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert sum(m["groups_dropped"] for m in straight) > 0 and max(m["num_gen_batches"] for m in straight) > 1
    for m1, m2 in zip(straight, resumed, strict=True):
        for key in ("loss", "num_gen_batches", "prompts_consumed", "groups_dropped", "epoch"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-6), key
    a = load_file(str(tmp_path / "a" / "checkpoint-3" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
