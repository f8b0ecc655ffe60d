"""Training that stops says where, in one line, and writes nothing it should not: a reward function that raises
(the step named), weights or optimizer state gone non-finite (no checkpoint of them; the real last good one
named), a wrong video_root (a summary naming it, not a line per entry), and a user's `module:function` reward found
in the working directory."""
import json
import math
import sys

import pytest
import torch

from omni_fast.cli import main
from omni_fast.grpo import rewards as reward_registry
from omni_fast.grpo import checkpoints
from omni_fast.grpo.trainer import SHOWN_BAD_ENTRIES, Trainer, TrainingError
from omni_fast.toy import make_toy_task
from training import run_config


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_toy_task(tmp_path_factory.mktemp("toy"), clips_per_label=2)


@pytest.fixture
def broken_reward():
    calls = {"n": 0}

    def broken(completions):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("label")
        return [0.0] * len(completions)
    reward_registry.register_reward("broken", broken)
    yield
    reward_registry.REWARD_FUNCS.pop("broken")


def test_a_reward_function_that_raises_names_the_step_and_the_function(task, tiny_ckpt, tmp_path, broken_reward,
                                                                      capsys):
    out = tmp_path / "run"
    cfg = run_config(task, tiny_ckpt, out, max_steps=3, save_steps=1, reward_funcs=("format", "broken"))
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err
    assert err == (f"omni-fast train: error: step 2: reward 'broken' raised KeyError: 'label'; stopping (the last "
                   f"good checkpoint, {out / 'checkpoint-1'}, is untouched)\n")
    assert [p.name for p in checkpoints.complete(out)] == ["checkpoint-1"]


def test_non_finite_weights_are_never_saved_and_the_real_last_good_checkpoint_is_named(task, tiny_ckpt, tmp_path,
                                                                                      monkeypatch):
    """An optimizer step that leaves inf in a weight (as learning_rate .inf did, which the config now refuses):
    checkpoint-2 is not written, `latest` stays on checkpoint-1, and the message says which is the last good one."""
    out = tmp_path / "run"
    trainer = Trainer(run_config(task, tiny_ckpt, out, max_steps=3, save_steps=1))
    real_apply = trainer.optimizer.apply

    def poisoning_apply():
        real_apply()
        if trainer.pos.step == 1:  # during step 2
            with torch.no_grad():
                trainer.optimizer.masters[0].view(-1)[:3] = math.inf
                trainer.optimizer.params[0].view(-1)[:3] = math.inf
    monkeypatch.setattr(trainer.optimizer, "apply", poisoning_apply)
    with pytest.raises(TrainingError) as e:
        trainer.train()
    name = trainer.trainable[0][0]
    assert _tensors(trainer) > 2 * len(trainer.trainable)  # the moments are counted
    assert str(e.value) == (f"step 2: 1 of {_tensors(trainer)} tensors of the weights and optimizer state "
                            f"(first: {name}) hold inf/NaN after the optimizer step; checkpoint-2 was not written "
                            f"(the last good checkpoint, {out / 'checkpoint-1'}, is untouched)")
    assert [p.name for p in checkpoints.complete(out)] == ["checkpoint-1"]
    assert (out / "latest").read_text() == "checkpoint-1\n" and not list(out.glob(".checkpoint-*"))


def test_non_finite_adam_moments_are_found_too(task, tiny_ckpt, tmp_path):
    trainer = Trainer(run_config(task, tiny_ckpt, tmp_path / "run", max_steps=1))
    trainer.train()
    assert checkpoints.nonfinite(trainer.trainable, trainer.optimizer) == ""
    master = trainer.optimizer.masters[-1]
    trainer.optimizer.optimizer.state[master]["exp_avg_sq"].view(-1)[0] = math.nan
    assert checkpoints.nonfinite(trainer.trainable, trainer.optimizer) == \
        f"1 of {_tensors(trainer)} tensors of the weights and optimizer state (first: " \
        f"{trainer.trainable[-1][0]} (AdamW exp_avg_sq))"


def _tensors(trainer) -> int:
    """Weights, fp32 masters (none in a float32 run) and AdamW moments: what a checkpoint's check covers."""
    state = trainer.optimizer.optimizer.state
    return len(trainer.trainable) + sum(len([k for k in state.get(m, {}) if k != "step"])
                                        for m in trainer.optimizer.masters)


def _entries(task, n):
    entries = json.loads(task.grpo_annotations.read_text())
    return [entries[i % len(entries)] for i in range(n)]


def test_a_wrong_video_root_is_summarised_and_named(task, tiny_ckpt, tmp_path, capsys):
    """Every clip missing because video_root is wrong: the first few entries on stderr, then one line with the
    count and the likely cause naming video_root; train.log lists every entry."""
    ann = tmp_path / "many.json"
    ann.write_text(json.dumps(_entries(task, 60)))
    wrong = tmp_path / "not-the-clips"
    cfg = run_config(task, tiny_ckpt, tmp_path / "run", train_annotations=str(ann), video_root=str(wrong))
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(tmp_path / "run.json")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == SHOWN_BAD_ENTRIES + 1
    assert all(line.startswith("omni-fast train: WARNING: skipping entry ") for line in lines[:-1])
    assert lines[-1] == (f"omni-fast train: error: {ann}: no usable entry (60 skipped); 60 of 60 entries name clips "
                         f"that do not exist (e.g. {wrong / 'clips' / 'angry_0.mp4'}); relative clip paths are "
                         f"resolved against video_root {wrong}: is that where the clips are?")
    assert not (tmp_path / "run").exists()  # the failed start left nothing


def test_some_missing_clips_are_summarised_and_the_run_goes_on(task, tiny_ckpt, tmp_path, capsys):
    entries = json.loads(task.grpo_annotations.read_text()) * 3
    missing = [{**e, "video": f"clips/gone_{i}.mp4"} for i, e in enumerate(_entries(task, 7))]
    ann = tmp_path / "some.json"
    ann.write_text(json.dumps(entries + missing))
    out = tmp_path / "run"
    trainer = Trainer(run_config(task, tiny_ckpt, out, train_annotations=str(ann), max_steps=1))
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == SHOWN_BAD_ENTRIES + 1 and "gone_4.mp4" in warned[-2]
    assert warned[-1] == f"omni-fast train: WARNING: 7 of {len(entries) + 7} entries skipped (all listed in train.log)"
    trainer.train()
    log = (out / "train.log").read_text()
    assert all(f"gone_{i}.mp4" in log for i in range(7))


def test_a_module_function_reward_is_found_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_for_cwd.py").write_text("def shout(completions):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as `omni-fast` runs
    try:
        fn = reward_registry.resolve_reward("my_rewards_for_cwd:shout")
        assert fn(["a", "b"]) == [1.0, 1.0]
        assert sys.path[-1] == str(tmp_path)  # appended: never ahead of an installed package
        with pytest.raises(KeyError, match="reward 'no_such_module_here:f': cannot import it"):
            reward_registry.resolve_reward("no_such_module_here:f")
    finally:
        reward_registry.REWARD_FUNCS.pop("my_rewards_for_cwd:shout", None)
        sys.modules.pop("my_rewards_for_cwd", None)
