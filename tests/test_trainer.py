"""The trainer on the tiny checkpoint: config, checkpoints that load and resume exactly, atomic saves, the
loss against an independent computation, gradient-accumulation invariance, bad entries, NaN stops, SFT."""
import json
import logging
import math
import shutil

import pytest
import torch

from omni_fast.config import ConfigError, GRPOConfig
from omni_fast.grpo import rewards as reward_registry
from omni_fast.grpo import checkpoints
from omni_fast.grpo.inputs import sft_example, sft_user_text
from omni_fast.grpo.logprobs import naive_completion_logprobs
from omni_fast.grpo.metrics import read_metrics
from omni_fast.grpo.trainer import Trainer, TrainingError
from omni_fast.model.checkpoint import load_checkpoint, load_tokenizer
from omni_fast.toy import make_toy_task, toy_config


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_toy_task(tmp_path_factory.mktemp("toy"), clips_per_label=2)


@pytest.fixture(autouse=True)
def text_length_reward():
    """A reward that differs between the tiny random model's completions (accuracy and format are 0 for all of
    them), so the advantages, and with them the loss and its gradient, are not zero."""
    reward_registry.register_reward("text_length", lambda completions: [len(c) / 10 for c in completions])
    yield
    reward_registry.REWARD_FUNCS.pop("text_length")


def _config(task, ckpt, out, stage="grpo", **kw):
    base = dict(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=4,
                max_completion_length=6, progress=False, learning_rate=1e-3, reward_funcs=("text_length", "format"))
    if stage == "sft":
        base = dict(max_steps=2, per_device_train_batch_size=2, progress=False)
    return toy_config(task, ckpt, out, stage, **{**base, **kw})


def _trainable_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.trainable}


# --- configuration --------------------------------------------------------------------------------------------
def test_config_defaults_follow_the_stage_recipes():
    g, s = GRPOConfig(), GRPOConfig(stage="sft")
    assert (g.num_generations, g.beta, g.learning_rate, g.lr_scheduler_type, g.warmup_ratio) == (8, 0.04, 1e-6, "linear", 0.0)
    assert (g.per_device_train_batch_size, g.gradient_accumulation_steps, g.num_train_epochs) == (1, 2, 2)
    assert (g.top_k, g.top_p, g.temperature, g.max_prompt_length, g.max_completion_length) == (50, 1.0, 1.0, 512, 512)
    assert (g.adam_beta1, g.adam_beta2, g.adam_epsilon, g.max_grad_norm, g.seed) == (0.9, 0.999, 1e-8, 1.0, 42)
    assert (s.learning_rate, s.lr_scheduler_type, s.warmup_ratio, s.num_train_epochs) == (2e-5, "cosine", 0.03, 5)
    assert g.reward_funcs == ("accuracy", "format") and g.loss_type == "grpo"


def test_config_from_yaml_json_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("learning_rate: 3.0e-6\nreward_funcs: [accuracy]\nmax_steps: 7\n")
    c = GRPOConfig.from_file(tmp_path / "a.yaml", {"max_steps": "9", "reward_weights": "2.0", "beta": "0"})
    assert (c.learning_rate, c.reward_funcs, c.max_steps, c.reward_weights, c.beta) == (3e-6, ("accuracy",), 9, (2.0,), 0.0)
    (tmp_path / "b.json").write_text(json.dumps({"stage": "sft", "per_device_train_batch_size": 3}))
    assert GRPOConfig.from_file(tmp_path / "b.json").per_device_train_batch_size == 3


@pytest.mark.parametrize("raw,needle", [({"learnig_rate": 1}, "did you mean 'learning_rate'"),
                                        ({"max_steps": 2.5}, "max_steps"), ({"stage": "ppo"}, "stage"),
                                        ({"reward_funcs": []}, "reward_funcs"), ({"num_generations": 1}, "num_generations"),
                                        ({"reward_weights": [1.0]}, "reward_weights")])
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        GRPOConfig.from_dict(raw)


@pytest.mark.parametrize("raw,needle", [({"reward_funcs": ("format", "nope")}, r"reward_funcs .*\['nope'\]"),
                                        ({"loss_type": "x"}, "loss_type 'x'.*'dapo'"),
                                        ({"scale_rewards": "rank"}, "scale_rewards.*'none'")])
def test_choices_of_grpo_code_are_named_before_anything_is_written(task, tiny_ckpt, tmp_path, raw, needle):
    """Reward names, loss types and reward scales are checked by the trainer against the code that defines them
    (the config imports none of grpo/), first thing."""
    with pytest.raises(ConfigError, match=needle):
        Trainer(_config(task, tiny_ckpt, tmp_path / "run", **raw))


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "1e999"])
@pytest.mark.parametrize("name", ["learning_rate", "beta", "max_grad_norm", "warmup_ratio", "temperature"])
def test_non_finite_numbers_are_refused(tmp_path, name, text):
    (tmp_path / "run.yaml").write_text(f"{name}: {text}\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'run.yaml'}: {name} must be a finite number, got "):
        GRPOConfig.from_file(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match=rf"^command line: --{name} must be a finite number, got "):
        GRPOConfig.from_file(None, {name: text})
    with pytest.raises(ConfigError, match="reward_weights must be a finite number"):
        GRPOConfig(reward_funcs=("format",), reward_weights=(float(text.replace(".", "", 1)),))


@pytest.mark.parametrize("argv,said", [
    (["--learnig_rate", "1e-6"], "command line: unknown option(s) --learnig_rate (did you mean --learning_rate?)"),
    (["--max_steps", "abc"], "command line: --max_steps 'abc' is not a valid int"),
    (["--learning_rate"], "command line: --learning_rate needs a value (--learning_rate VALUE or "
                          "--learning_rate=VALUE)"),
    (["--learning_rate", "--max_steps", "3"], "command line: --learning_rate needs a value"),
    (["--max_steps", "0"], "command line: --max_steps must be -1 (use num_train_epochs) or >= 1, got 0"),
    (["--learning_rate=-1"], "command line: --learning_rate must be > 0, got -1.0"),
])
def test_command_line_mistakes_are_blamed_on_the_command_line(tmp_path, capsys, argv, said):
    from omni_fast.cli import main

    (tmp_path / "run.yaml").write_text("max_steps: 3\nlearning_rate: 1.0e-6\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"omni-fast train: error: {said}") and err.count("\n") == 1
    assert str(tmp_path / "run.yaml") not in err  # the file is right; the command line is not


def test_file_mistakes_are_still_blamed_on_the_file_and_bare_bool_flags_are_true(tmp_path):
    (tmp_path / "run.yaml").write_text("max_steps: abc\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'run.yaml'}: max_steps = 'abc' is not a valid int"):
        GRPOConfig.from_file(tmp_path / "run.yaml", {"learning_rate": "1e-6"})
    (tmp_path / "run.yaml").write_text("progress: false\n")
    assert GRPOConfig.from_file(tmp_path / "run.yaml", {"progress": None}).progress is True
    assert not (tmp_path / "run").exists()


def test_every_config_field_is_described_in_train_help(capsys):
    from omni_fast.cli import main

    described = GRPOConfig.describe()
    assert [name for name, _, comment in described if not comment] == []
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} = " in out for name, _, _ in described)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        GRPOConfig.from_file(tmp_path / "nope.yaml")


def test_rollout_seeds_depend_on_seed_step_and_prompt_only():
    from omni_fast.grpo.rollout import rollout_seed

    seeds = {rollout_seed(seed, step, index) for seed in (0, 42) for step in (1, 2) for index in (0, 7)}
    assert len(seeds) == 8 and rollout_seed(42, 2, 7) == rollout_seed(42, 2, 7)


def test_grpo_prompt_is_left_truncated_like_the_reference_but_never_past_a_placeholder(tiny_ckpt):
    from omni_fast.grpo.inputs import grpo_prompt_ids

    tok = load_tokenizer(tiny_ckpt)
    for template in ("qwen2vl", "chat_template"):
        full = grpo_prompt_ids(tok, 10_000, template)
        assert full.count(-201) == 1 and full.count(-202) == 1
        need = len(full) - min(full.index(-201), full.index(-202))  # from the first placeholder to the end
        assert grpo_prompt_ids(tok, need, template) == full[-need:]  # the end (the assistant header) is kept
        assert grpo_prompt_ids(tok, need, template).count(-201) == 1
        with pytest.raises(ConfigError, match=rf"max_prompt_length {need - 1} would cut the <video> / <audio> "
                                              rf"placeholders .*\({len(full)} tokens.*max_prompt_length >= {need}$"):
            grpo_prompt_ids(tok, need - 1, template)


def test_registered_reward_is_usable_by_name():
    reward_registry.register_reward("length_penalty", lambda completions: [-len(c) / 100 for c in completions])
    try:
        out = reward_registry.compute_rewards(("length_penalty", "accuracy"), ["<answer>x</answer>", "y"],
                                              ["<answer> x </answer>"] * 2)
        assert out["rewards/<lambda>"] == [-0.18, -0.01] and out["rewards/accuracy_reward"] == [1.0, 0.0]
        assert GRPOConfig(reward_funcs=("length_penalty",)).reward_funcs == ("length_penalty",)
    finally:
        reward_registry.REWARD_FUNCS.pop("length_penalty")


# --- SFT prompts --------------------------------------------------------------------------------------------
def test_sft_user_text_is_preprocess_multimodal():
    assert sft_user_text("<video>\n<audio>\nAs an expert?") == \
        "<vi_start><video><vi_end>\n<au_start><audio><au_end>\n\n\nAs an expert?"
    assert sft_user_text("<video>\nQ") == "<vi_start><video><vi_end>\nQ"


def test_sft_target_is_the_assistant_turn(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    ex = sft_example(tok, "<video>\n<audio>\nWhich emotion?", "<answer>sad</answer>", 2048)
    assert tok.decode(ex.target_ids) == "<answer>sad</answer><|im_end|>\n"
    assert tok.decode([i for i in ex.prompt_ids if i >= 0]).endswith("<|im_start|>assistant\n")
    assert ex.prompt_ids.count(-201) == 1 and ex.prompt_ids.count(-202) == 1
    assert ex.bert_text == "<vi_start><vi_end><au_start><audio><au_end>Which emotion?"
    short = sft_example(tok, "<video>\n<audio>\nWhich emotion?", "<answer>sad</answer>", len(ex.prompt_ids) + 2)
    assert len(short.target_ids) == 2


# --- GRPO: the step's loss, checkpoints, resume -------------------------------------------------------------
def test_step_loss_and_gradient_equal_the_reference_formula(task, tiny_ckpt, tmp_path, monkeypatch):
    """Step 1 recomputed independently: naive per-row forward, (r - mean)/(std + 1e-4) advantages, k3 KL with
    beta, per-sequence masked mean then mean over sequences; the logged loss and the gradient must match. The
    reference model is perturbed so that the KL term is not 0 (at step 1 the policy equals its copy)."""
    from omni_fast.grpo import step as step_module
    from omni_fast.grpo.inputs import grpo_bert_inputs

    captured = []
    real = step_module.make_rollout
    monkeypatch.setattr(step_module, "make_rollout", lambda *a, **k: captured.append(real(*a, **k)) or captured[-1])
    trainer = Trainer(_config(task, tiny_ckpt, tmp_path / "run", max_steps=1, beta=0.3, reward_weights=(1.0, 0.5),
                                max_grad_norm=0.0))
    with torch.no_grad():
        for p in trainer.reference.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    policy0 = __import__("copy").deepcopy(trainer.model)
    grads = {}
    real_apply = trainer.optimizer.apply
    monkeypatch.setattr(trainer.optimizer, "apply", lambda: grads.update(
        {n: p.grad.clone() for n, p in trainer.trainable if p.grad is not None}) or real_apply())
    logged = trainer.train()[0]
    (ro,) = captured
    bert = grpo_bert_inputs(trainer.model, trainer.bert_tokenizer, "chat_template")
    feats = (ro.features.vision, ro.features.audio)
    logp = naive_completion_logprobs(policy0, policy0.prompt_embeddings(ro.prompt_ids, *feats, bert),
                                     ro.completions, ro.lengths, 4)
    with torch.no_grad():
        ref = naive_completion_logprobs(trainer.reference, trainer.reference.prompt_embeddings(ro.prompt_ids, *feats,
                                        bert), ro.completions, ro.lengths, 4)
    r = torch.tensor(ro.rewards["rewards/<lambda>"]) + torch.tensor(ro.rewards["rewards/format_reward"])
    assert float(r.std()) > 0.1  # the advantages are not all zero
    grouped = r.view(-1, 4)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    total = 0.0
    for row in range(r.numel()):
        n = int(ro.lengths[row])
        d = ref[row, :n] - logp[row, :n]
        policy_term = torch.exp(logp[row, :n] - logp[row, :n].detach()) * adv[row]
        total = total + (-(policy_term - 0.3 * (torch.exp(d) - d - 1))).sum() / max(n, 1)
    total = total / r.numel()
    assert abs(float(total.detach())) > 1e-3  # a loss of 0 would match too many bugs
    assert logged["loss"] == pytest.approx(float(total.detach()), rel=1e-4)
    kl = 0.0
    with torch.no_grad():
        for row in range(r.numel()):
            n = int(ro.lengths[row])
            d = ref[row, :n] - logp[row, :n]
            kl += float((torch.exp(d) - d - 1).sum()) / max(n, 1)
    assert logged["kl"] == pytest.approx(kl / r.numel(), rel=1e-4) and logged["kl"] > 1e-4
    assert logged["reward"] == pytest.approx(float(r.mean()), abs=1e-6)
    assert logged["reward_std"] == pytest.approx(float(grouped.std(1).mean()), rel=1e-6)  # unbiased, per group
    assert logged["completion_length"] == pytest.approx(float(ro.lengths.float().mean()))
    total.backward()
    want = dict(policy0.named_parameters())
    scale = max(float(want[n].grad.abs().max()) for n in grads if want[n].grad is not None)
    for n, g in grads.items():
        expected = want[n].grad if want[n].grad is not None else torch.zeros_like(g)
        assert float((g - expected).abs().max()) <= 1e-4 * scale, n
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-6)
    # rewards read the completions decoded with special tokens skipped and NOT stripped, as the reference does
    assert ro.texts == [trainer.tokenizer.decode(c[:n].tolist(), skip_special_tokens=True)
                        for c, n in zip(ro.completions, ro.lengths)]
    # the weights 1.0 / 0.5 are applied: format counts half
    assert ro.rewards["rewards/format_reward"] == [0.5 * v for v in reward_registry.format_reward(ro.texts)]


def test_clip_ratio_is_logged_over_the_step_tokens(task, tiny_ckpt, tmp_path, monkeypatch):
    """num_iterations 2: the second update of a rollout batch clips its ratio against the rollout policy; the
    logged clip_ratio is the clipped fraction of all the step's completion tokens (0 on the first update)."""
    from omni_fast.grpo import step as step_module

    outputs = []
    real = step_module.grpo_loss
    monkeypatch.setattr(step_module, "grpo_loss", lambda *a, **k: outputs.append((real(*a, **k), a[2])) or outputs[-1][0])
    trainer = Trainer(_config(task, tiny_ckpt, tmp_path / "run", max_steps=2, num_iterations=2, epsilon=1e-3,
                              learning_rate=3e-3, gradient_accumulation_steps=2, per_device_train_batch_size=1))
    history = trainer.train()
    assert len(outputs) == 4  # 2 micro-batches x 2 updates
    first, second = outputs[:2], outputs[2:]
    assert history[0]["clip_ratio"] == 0.0 and all(float(o.clip_ratio) == 0.0 for o, _ in first)
    want = sum(float(o.clip_ratio) * float(mask.sum()) for o, mask in second) / sum(float(m.sum()) for _, m in second)
    assert want > 0.0
    assert history[1]["clip_ratio"] == pytest.approx(want, rel=1e-6)


def test_gradient_accumulation_and_batch_split_give_the_same_update(task, tiny_ckpt, tmp_path, monkeypatch):
    grads = {}
    for split in ((4, 1), (2, 2), (1, 4)):
        trainer = Trainer(_config(task, tiny_ckpt, tmp_path / f"run{split}", max_steps=1,
                                  per_device_train_batch_size=split[0], gradient_accumulation_steps=split[1]))
        seen = {}
        monkeypatch.setattr(trainer.optimizer, "apply", lambda t=trainer, s=seen: s.update(
            {n: p.grad.clone() for n, p in t.trainable if p.grad is not None}))
        trainer.train()
        grads[split] = seen
    ref = grads[(4, 1)]
    scale = max(float(g.abs().max()) for g in ref.values())
    assert scale > 0
    for split in ((2, 2), (1, 4)):
        assert grads[split].keys() == ref.keys()
        worst = max(float((grads[split][n] - ref[n]).abs().max()) for n in ref)
        assert worst <= 1e-5 * scale, (split, worst, scale)


def test_checkpoint_loads_and_resume_is_exact(task, tiny_ckpt, tmp_path):
    cfg = dict(max_steps=4, save_steps=2, reward_funcs=("text_length", "accuracy", "format"))
    straight = Trainer(_config(task, tiny_ckpt, tmp_path / "a", **cfg))
    straight.train()
    want = _trainable_state(straight)

    class Kill(Exception):
        pass

    def die(m):
        if m["step"] == 3:
            raise Kill
    with pytest.raises(Kill):
        Trainer(_config(task, tiny_ckpt, tmp_path / "b", **cfg), on_step=die).train()
    assert checkpoints.resolve(tmp_path / "b", "latest").name == "checkpoint-2"
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(_config(task, tiny_ckpt, tmp_path / "b", **cfg))
    resumed = Trainer(_config(task, tiny_ckpt, tmp_path / "b", **cfg), "latest")
    assert resumed.pos.step == 2
    resumed.train()
    got = _trainable_state(resumed)
    assert max(float((got[n] - want[n]).abs().max()) for n in want) <= 1e-6
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        assert mb["loss"] == pytest.approx(ma["loss"], abs=1e-6) and mb["reward"] == ma["reward"]
    # the HumanOmni directory loads and holds the trained weights
    loaded = load_checkpoint(tmp_path / "b" / "checkpoint-4", device="cpu", dtype=torch.float32)
    params = dict(loaded.model.named_parameters())
    assert max(float((params[n] - want[n]).abs().max()) for n in want) == 0.0
    assert json.loads((tmp_path / "b" / "checkpoint-4" / "config.json").read_text())["torch_dtype"] == "float32"
    assert set(read_metrics(tmp_path / "a")[0]) >= {"loss", "reward", "reward_std", "rewards/format_reward", "kl",
                                                    "completion_length", "grad_norm",
                                                    "learning_rate", "step", "epoch", "skipped_clips", "tokens_per_s",
                                                    "time/media", "time/towers", "time/rollout", "time/reference",
                                                    "time/policy", "time/optimizer"}
    assert "rewards/accuracy_reward" in read_metrics(tmp_path / "a")[0]


def test_interrupted_save_keeps_the_previous_checkpoint(task, tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(_config(task, tiny_ckpt, out, max_steps=2, save_steps=1))
    real_save = torch.save

    def failing(obj, path, *a, **k):
        if "checkpoint-2" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(TrainingError, match=r"step 2: cannot save .*checkpoint-2: disk full; the last good "
                                            r"checkpoint, .*checkpoint-1, is untouched"):
        trainer.train()
    assert [p.name for p in checkpoints.complete(out)] == ["checkpoint-1"]
    assert (out / "latest").read_text().strip() == "checkpoint-1"
    assert not list(out.glob(".checkpoint-*")) and not (out / "checkpoint-2").exists()
    assert load_checkpoint(out / "checkpoint-1", device="cpu", dtype=torch.float32) is not None


def test_nan_reward_stops_without_touching_the_last_checkpoint(task, tiny_ckpt, tmp_path):
    calls = {"n": 0}

    def flaky(completions):
        calls["n"] += 1
        return [math.nan if calls["n"] >= 2 else 0.0 for _ in completions]
    reward_registry.register_reward("flaky", flaky)
    try:
        out = tmp_path / "run"
        trainer = Trainer(_config(task, tiny_ckpt, out, max_steps=3, save_steps=1, reward_funcs=("text_length", "flaky")))
        before = (out / "checkpoint-1" / "model.safetensors")
        with pytest.raises(TrainingError, match=r"step 2: the reward is nan.*checkpoint-1.*untouched"):
            trainer.train()
        assert before.is_file() and [p.name for p in checkpoints.complete(out)] == ["checkpoint-1"]
    finally:
        reward_registry.REWARD_FUNCS.pop("flaky")


# --- bad entries --------------------------------------------------------------------------------------------
def _bad_annotations(task, tmp_path):
    entries = json.loads(task.grpo_annotations.read_text())
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 50)
    human = entries[0]["conversations"][0]
    entries += [{"video": "clips/missing.mp4", "conversations": [human, {"from": "gpt", "value": "sad"}]},
                {"video": str(tmp_path / "broken.mp4"), "conversations": [human, {"from": "gpt", "value": "sad"}]},
                {"video": entries[0]["video"], "conversations": [human, {"from": "gpt", "value": "bored"}]},
                {"video": entries[0]["video"]}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(entries))
    return path, len(entries)


def test_bad_entries_are_skipped_listed_and_counted(task, tiny_ckpt, tmp_path, caplog):
    path, n = _bad_annotations(task, tmp_path)
    out = tmp_path / "run"
    trainer = Trainer(_config(task, tiny_ckpt, out, train_annotations=str(path), max_steps=-1, num_train_epochs=1,
                              per_device_train_batch_size=5))
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        metrics = trainer.train()
    assert any("broken.mp4" in r.getMessage() for r in caplog.records if r.name.startswith("omni_fast.media"))
    assert sorted(trainer.skipped) == [n - 4, n - 3, n - 2, n - 1]
    assert metrics[-1]["skipped_clips"] == 4
    log = (out / "train.log").read_text()
    for index in range(n - 4, n):
        assert f"entry {index} (" in log
    assert "bored" in log and "missing.mp4" in log
    state = json.loads((out / f"checkpoint-{trainer.pos.step}" / "trainer_state.json").read_text())
    assert [s["index"] for s in state["skipped"]] == [n - 4, n - 3, n - 2, n - 1]


def test_bad_entry_is_fatal_with_on_bad_clip_raise(task, tiny_ckpt, tmp_path):
    path, n = _bad_annotations(task, tmp_path)
    with pytest.raises(TrainingError, match=rf"entry {n - 4} .*missing.mp4"):
        Trainer(_config(task, tiny_ckpt, tmp_path / "run", train_annotations=str(path), on_bad_clip="raise"))
    # a clip that exists but cannot be decoded is found by the loader, and is fatal there too
    entries = json.loads(path.read_text())[: n - 4] + [json.loads(path.read_text())[n - 3]]
    path.write_text(json.dumps(entries))
    trainer = Trainer(_config(task, tiny_ckpt, tmp_path / "run2", train_annotations=str(path), on_bad_clip="raise",
                              max_steps=-1, num_train_epochs=1, per_device_train_batch_size=len(entries)))
    with pytest.raises(TrainingError, match=rf"entry {n - 4}: .*broken.mp4"):
        trainer.train()
    assert not checkpoints.complete(tmp_path / "run2")


# --- SFT --------------------------------------------------------------------------------------------------------
def test_sft_trains_llm_projectors_and_gate_only(task, tiny_ckpt, tmp_path):
    trainer = Trainer(_config(task, tiny_ckpt, tmp_path / "sft", "sft", max_steps=3, learning_rate=3e-3))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    history = trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert not any(n.startswith(("model.vision_tower.", "model.audio_tower.", "model.bert_model.")) for n in changed)
    for part in ("model.layers.0.", "model.mm_projector.", "model.audio_projector.", "model.bert_gate.",
                 "model.embed_tokens."):
        assert any(n.startswith(part) for n in changed), part
    assert history[-1]["loss"] < history[0]["loss"]
    assert trainer.reference is None


def test_sft_loss_is_the_mean_cross_entropy_of_the_assistant_tokens(task, tiny_ckpt, tmp_path, monkeypatch):
    """Step 1's logged SFT loss recomputed independently: the naive forward over cat(prompt, target) per
    clip, -log p of every target token, averaged over all target tokens of the step (two micro-batches)."""
    from omni_fast.grpo import step as step_module
    captured = []
    real = step_module.sft_batch
    monkeypatch.setattr(step_module, "sft_batch", lambda *a, **k: captured.append(real(*a, **k)) or captured[-1])
    trainer = Trainer(_config(task, tiny_ckpt, tmp_path / "sft", "sft", max_steps=1, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2))
    model0 = __import__("copy").deepcopy(trainer.model)
    logged = trainer.train()[0]
    assert len(captured) == 2
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in captured:
            bert = model0.bert_inputs(trainer.bert_tokenizer, [e.bert_text for e in b.examples])
            ids = [torch.tensor(e.prompt_ids) for e in b.examples]
            prefixes = model0.prompt_embeddings(ids, b.features.vision, b.features.audio, bert)
            logp = naive_completion_logprobs(model0, prefixes, b.targets, b.lengths, 1)
            total -= float(logp.sum())
            tokens += int(b.lengths.sum())
    assert logged["num_tokens"] == tokens
    assert logged["loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_a_question_longer_than_berts_positions_trains_with_the_gate_inputs_it_infers_with(task, tiny_ckpt, tmp_path,
                                                                                          caplog, monkeypatch):
    """The gate's BERT inputs are cut at BERT's positions for training as for inference (the tokenizer allows
    512, the tiny BERT has 128 positions): the SFT step reads the same ids OmniModel does for that text."""
    from omni_fast.api import OmniModel
    from omni_fast.config import VIDEO_TOKEN_INDEX
    from omni_fast.grpo.inputs import sft_bert_text, sft_user_text
    from omni_fast.model.omni import HumanOmniForCausalLM

    long = "<video>\n<audio>\n" + "really " * 300 + "which emotion is it?"
    entries = json.loads(task.sft_annotations.read_text())[:2]
    for e in entries:
        e["conversations"][0]["value"] = long
    (tmp_path / "long.json").write_text(json.dumps(entries))
    seen = []
    real = HumanOmniForCausalLM.gate_weights
    monkeypatch.setattr(HumanOmniForCausalLM, "gate_weights", lambda m, bert: seen.append(bert["input_ids"]) or real(m, bert))
    trainer = Trainer(_config(task, tiny_ckpt, tmp_path / "sft", "sft", train_annotations=str(tmp_path / "long.json"),
                              max_steps=1, per_device_train_batch_size=2))
    with caplog.at_level("WARNING", logger="omni_fast.model"):
        trainer.train()
    trained = seen[-1]
    assert trained.shape == (2, 128) and "truncated to 128" in caplog.text
    OmniModel(trainer.loaded).forward_logits(torch.tensor([[VIDEO_TOKEN_INDEX, 5]]), torch.zeros(8, 3, 224, 224),
                                             instruct=sft_bert_text(sft_user_text(long)))
    assert torch.equal(seen[-1][0], trained[0])


def test_cli_train_runs_from_a_config_file(task, tiny_ckpt, tmp_path, capsys):
    from omni_fast.cli import main

    cfg = _config(task, tiny_ckpt, tmp_path / "cli", max_steps=1).to_dict()
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "run.json"), "--max_steps", "2", "--seed=3"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert checkpoints.resolve(tmp_path / "cli", "latest").name == "checkpoint-2"
    assert main(["train", "--config", str(tmp_path / "run.json"), "--max_stepz", "2"]) == 2
    assert capsys.readouterr().err == ("omni-fast train: error: command line: unknown option(s) --max_stepz (did you "
                                       "mean --max_steps?)\n")
    shutil.rmtree(tmp_path / "cli")


def test_towers_run_once_per_clip_and_weights_update_in_place(task, tiny_ckpt, tmp_path):
    trainer = Trainer(_config(task, tiny_ckpt, tmp_path / "run", max_steps=1, per_device_train_batch_size=3))
    calls = {"vision": [], "audio": []}
    trainer.model.model.vision_tower.register_forward_hook(lambda m, i, o: calls["vision"].append(i[0].shape[0]))
    trainer.model.model.audio_tower.register_forward_hook(lambda m, i, o: calls["audio"].append(i[0].shape[0]))
    pointers = {n: p.data_ptr() for n, p in trainer.trainable}
    before = _trainable_state(trainer)
    trainer.train()
    assert calls == {"vision": [3 * 8], "audio": [3]}  # one pass, 3 clips x 8 frames; 3 mel inputs
    assert trainer.engine.model is trainer.model  # the engine decodes with the policy itself, no copy
    assert {n: p.data_ptr() for n, p in trainer.trainable} == pointers  # updated in place
    assert any(not torch.equal(before[n], p) for n, p in trainer.trainable)


def test_bf16_parameters_train_through_fp32_masters_and_resume(task, tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_config(task, tiny_ckpt, out, max_steps=2, save_steps=1, dtype="bfloat16"))
    assert {p.dtype for _, p in trainer.trainable} == {torch.bfloat16}
    assert {m.dtype for m in trainer.optimizer.masters} == {torch.float32}
    trainer.train()
    for p, m in zip(trainer.optimizer.params, trainer.optimizer.masters):
        assert torch.equal(p, m.to(torch.bfloat16))  # the bf16 weights are the rounded masters
    ck = out / "checkpoint-1"
    assert (ck / "master_weights.safetensors").is_file()
    assert json.loads((ck / "config.json").read_text())["torch_dtype"] == "bfloat16"
    shutil.rmtree(out / "checkpoint-2")
    (out / "latest").write_text("checkpoint-1\n")
    resumed = Trainer(_config(task, tiny_ckpt, out, max_steps=2, save_steps=1, dtype="bfloat16"), "latest")
    resumed.train()
    for a, b in zip(trainer.optimizer.masters, resumed.optimizer.masters):
        assert float((a - b).detach().abs().max()) <= 1e-6


@pytest.mark.gpu
def test_gpu_grpo_steps_in_bf16_with_cuda_graphs(task, tiny_ckpt, tmp_path):
    """On a GPU: bf16 parameters with fp32 masters, the engine's CUDA graphs replayed across optimizer steps
    (the weights change in place, so the graphs keep decoding the current policy), finite metrics."""
    trainer = Trainer(_config(task, tiny_ckpt, tmp_path / "run", max_steps=3, device="cuda"))
    assert trainer.device.type == "cuda" and {p.dtype for _, p in trainer.trainable} == {torch.bfloat16}
    pointers = {n: p.data_ptr() for n, p in trainer.trainable}
    history = trainer.train()
    assert trainer.engine.runner.graphs  # decode steps ran from captured graphs
    assert {n: p.data_ptr() for n, p in trainer.trainable} == pointers
    for m in history:
        assert all(math.isfinite(m[k]) for k in ("loss", "reward", "kl", "grad_norm"))
    # a decode replayed from the graphs equals an eager decode with the updated weights
    from omni_fast.config import LoaderConfig, SamplingParams
    from omni_fast.grpo.inputs import grpo_bert_inputs, grpo_prompt_ids, tower_features
    from omni_fast.media.loader import MediaLoader

    loader = MediaLoader(task.clips["sad"][:1], LoaderConfig(batch_size=1, backend="pyav", aspect="pad"), "cuda")
    batch = next(iter(loader))
    ids = torch.tensor(grpo_prompt_ids(trainer.tokenizer, 512, "chat_template"), device="cuda")
    bert = grpo_bert_inputs(trainer.model, trainer.bert_tokenizer, "chat_template")
    with torch.no_grad():
        feats = tower_features(trainer.model, batch.frames, batch.mel)
        prefix = trainer.model.prompt_embeddings([ids], feats.vision, feats.audio, bert)
    greedy = SamplingParams.greedy_params(6)
    graphed = trainer.engine.generate(prefix, greedy)[0][0].token_ids
    trainer.engine.config.cuda_graphs = False
    eager = trainer.engine.generate(prefix, greedy)[0][0].token_ids
    assert graphed == eager


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedules_equal_transformers(kind):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, \
        get_linear_schedule_with_warmup

    from omni_fast.grpo.optim import lr_lambda

    total, warmup = 17, 3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = {"linear": lambda: get_linear_schedule_with_warmup(opt, warmup, total),
          "cosine": lambda: get_cosine_schedule_with_warmup(opt, warmup, total),
          "constant": lambda: get_constant_schedule_with_warmup(opt, warmup)}[kind]()
    ours = lr_lambda(kind, total, warmup)
    for step in range(total + 1):
        assert ours(step) == pytest.approx(hf.lr_lambdas[0](step), abs=1e-12), step
