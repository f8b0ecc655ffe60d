"""Each wire of one GRPO step (grpo/step.py's grpo_step, the function the trainer and the benchmark run), pinned
so that crossing it fails a test: the completion mask, the rollout seeds, which label each completion is scored
against, where the reference log-probs come from, and the grouping of the advantages.

The engine is a scripted stand-in (the completions are chosen, the SamplingParams it is handed are recorded);
everything else is the real step on the tiny checkpoint."""
import copy
from types import SimpleNamespace

import pytest
import torch

from omni_fast import task
from omni_fast.config import GRPOConfig
from omni_fast.distributed import DistContext
from omni_fast.engine.sequence import Completion
from omni_fast.grpo import rewards as reward_registry
from omni_fast.grpo import step as step_module
from omni_fast.grpo.inputs import tower_features
from omni_fast.grpo.logprobs import naive_completion_logprobs
from omni_fast.grpo.rollout import rollout_seed
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
        return [[Completion(token_ids=list(ids), logprobs=torch.zeros(len(ids)),
                            finish_reason="stop" if ids and ids[-1] in self.default_stop else "length")
                 for ids in self.script(b, call)] for b in range(len(prefixes))]


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
    reference = loaded.model.copy_sharing_towers() if cfg.beta > 0 else None
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
    ids, bert = step_module.grpo_prompt(ctx)
    rows = script(0, 2) + script(1, 2)
    lengths = torch.tensor([len(r) for r in rows])
    completions = torch.tensor([r + [0] * (mask.shape[1] - len(r)) for r in rows])
    with torch.no_grad():
        feats = tower_features(initial, micro[0].frames, micro[0].mel)
        prefixes = initial.prompt_embeddings([ids, ids], feats.vision, feats.audio, bert)
        want = naive_completion_logprobs(initial, prefixes, completions, lengths, G)
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
