"""Resuming a run: each config field is applied or refused by its rule (config.RESUME_RULES), the learning-rate
schedule of the resumed run is the new config's, later checkpoints are never overwritten, a complete run says so,
and a damaged checkpoint or metrics file is named. Every refusal leaves output_dir byte for byte as it was."""
import hashlib
import json
import logging
import shutil
from dataclasses import fields

import pytest
import torch

from omni_fast.config import RESUME_FIXED, RESUME_RULES, ConfigError, GRPOConfig
from omni_fast.grpo import checkpoints
from omni_fast.grpo.metrics import read_metrics
from omni_fast.grpo.optim import lr_lambda
from omni_fast.grpo.trainer import Trainer
from omni_fast.toy import make_toy_task
from training import run_config


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_toy_task(tmp_path_factory.mktemp("toy"), clips_per_label=2)


@pytest.fixture(scope="module")
def finished(task, tiny_ckpt, tmp_path_factory):
    """A run of 2 steps with a checkpoint after each (treat as read-only: tests copy it to change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(run_config(task, tiny_ckpt, out, max_steps=2, save_steps=1, lr_scheduler_type="linear")).train()
    return out


def snapshot(directory):
    """Every file under directory -> the hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_every_config_field_has_one_resume_rule_and_fixed_ones_say_why():
    assert set(RESUME_RULES) == {f.name for f in fields(GRPOConfig)}
    assert {rule for rule, _ in RESUME_RULES.values()} == {"free", "schedule", "batch", "fixed"}
    assert all(why for rule, why in RESUME_RULES.values() if rule in (RESUME_FIXED, "batch"))
    for name in ("seed", "train_annotations", "num_generations", "stage", "model_path", "video_root", "dtype"):
        assert RESUME_RULES[name][0] == RESUME_FIXED, name
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        assert RESUME_RULES[name][0] == "batch", name
    for name in ("learning_rate", "max_steps", "lr_scheduler_type", "warmup_ratio", "num_train_epochs"):
        assert RESUME_RULES[name][0] == "schedule", name
    for name in ("logging_steps", "save_steps", "progress", "save_total_limit"):
        assert RESUME_RULES[name][0] == "free", name


@pytest.mark.parametrize("change", [
    {"seed": 7}, {"num_generations": 2},
    {"train_annotations": "copy"}, {"model_path": "copy"}, {"dtype": "bfloat16"}, {"adam_beta2": 0.9},
    {"seed": 7, "num_generations": 2}])
def test_resume_refuses_a_field_the_checkpoint_depends_on(task, tiny_ckpt, finished, tmp_path, change):
    """Each refused field is named with the checkpoint's value and the new one, in one line, before anything is
    loaded or written."""
    before = snapshot(finished)
    kw = dict(change)
    if kw.get("train_annotations") == "copy":
        kw["train_annotations"] = str(shutil.copy(task.grpo_annotations, tmp_path / "other.json"))
    model = tiny_ckpt
    if kw.get("model_path") == "copy":
        model = kw.pop("model_path")
        model = kw["model_path"] = str(shutil.copytree(tiny_ckpt, tmp_path / "other-model"))
    saved = json.loads((finished / "checkpoint-2" / "trainer_state.json").read_text())["config"]
    cfg = run_config(task, model, finished, max_steps=3, save_steps=1, lr_scheduler_type="linear",
                     **{k: v for k, v in kw.items() if k != "model_path"})
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, "latest")
    said = str(e.value)
    assert "\n" not in said and said.startswith(f"{finished / 'checkpoint-2'} was trained with other values")
    for name, value in kw.items():
        assert f"{name} {saved[name]!r} -> {value!r} ({RESUME_RULES[name][1]})" in said
    assert snapshot(finished) == before  # nothing written, train.log included


@pytest.mark.parametrize("change", [{"per_device_train_batch_size": 3}, {"gradient_accumulation_steps": 2},
                                    {"per_device_train_batch_size": 1}])
def test_resume_refuses_another_global_batch(task, tiny_ckpt, finished, change):
    before = snapshot(finished)
    cfg = run_config(task, tiny_ckpt, finished, max_steps=3, save_steps=1, lr_scheduler_type="linear", **change)
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, "latest")
    assert str(e.value) == (
        f"{finished / 'checkpoint-2'} was trained with a global batch of 2 prompts a step (per_device_train_batch_size"
        f" 2 x gradient_accumulation_steps 1 x 1 process(es)), this run would take {cfg.prompts_per_step} "
        f"({cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} x 1): the global batch cannot "
        f"change on resume ({RESUME_RULES['per_device_train_batch_size'][1]}); split 2 prompts otherwise, or start a "
        "new run in another output_dir")
    assert snapshot(finished) == before


def test_the_same_global_batch_split_otherwise_resumes(task, tiny_ckpt, finished, tmp_path):
    """2 prompts a step as 1 x 2 micro-batches instead of 2 x 1 (what a resume under another number of
    processes does with per_device_train_batch_size): taken, and logged."""
    out = _copy(finished, tmp_path)
    state_file = out / "checkpoint-2" / "trainer_state.json"  # as written before trainer states held world_size:
    state = json.loads(state_file.read_text())                 # the number of processes comes from rng_state.pt
    del state["world_size"]
    state_file.write_text(json.dumps(state))
    Trainer(run_config(task, tiny_ckpt, out, max_steps=3, save_steps=1, lr_scheduler_type="linear",
                       per_device_train_batch_size=1, gradient_accumulation_steps=2), "latest").train()
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    log = (out / "train.log").read_text()
    assert "resume: per_device_train_batch_size 2 -> 1: the same global batch, split otherwise, from step 3 on" in log
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["world_size"] == 1


def test_same_paths_spelled_otherwise_are_not_a_change(task, tiny_ckpt, finished, tmp_path, monkeypatch):
    monkeypatch.chdir(task.root)
    cfg = run_config(task, tiny_ckpt, finished, max_steps=2, save_steps=1, lr_scheduler_type="linear",
                     train_annotations="./grpo.json", video_root=".")
    saved = json.loads((finished / "checkpoint-2" / "trainer_state.json").read_text())["config"]
    assert cfg.resume_changes(saved) == []
    assert [n for n, _, _ in cfg.__class__.from_dict({**cfg.to_dict(), "save_steps": 5}).resume_changes(saved)] == \
        ["save_steps"]


def test_a_new_learning_rate_and_length_apply_to_the_schedule_from_the_resumed_step(task, tiny_ckpt, finished,
                                                                                    tmp_path):
    """Resumed at step 2 of a linear schedule over 2 steps, with max_steps 5 and learning_rate 5e-4: steps 3-5 run at
    the rates a run started with those values has there (never the saved run's rate for one step, which made the
    rate rise after the resume), and train.log, metrics.jsonl and the new checkpoints record the rate used."""
    out = _copy(finished, tmp_path)
    cfg = run_config(task, tiny_ckpt, out, max_steps=5, save_steps=1, lr_scheduler_type="linear",
                     learning_rate=5e-4, logging_steps=1)
    Trainer(cfg, "latest").train()
    rates = [m["learning_rate"] for m in read_metrics(out)]
    old = lr_lambda("linear", 2, 0)
    new = lr_lambda("linear", 5, 0)
    assert rates[:2] == pytest.approx([1e-3 * old(0), 1e-3 * old(1)])  # the first run's, kept
    assert rates[2:] == pytest.approx([5e-4 * new(k) for k in (2, 3, 4)], rel=1e-12)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))  # never rises
    straight = tmp_path / "straight"
    Trainer(run_config(task, tiny_ckpt, straight, max_steps=5, lr_scheduler_type="linear", learning_rate=5e-4)).train()
    assert [m["learning_rate"] for m in read_metrics(straight)][2:] == pytest.approx(rates[2:], rel=1e-12)
    log = (out / "train.log").read_text()
    assert "resume: learning_rate 0.001 -> 0.0005: the learning-rate schedule is rebuilt" in log
    assert "resume: max_steps 2 -> 5: the learning-rate schedule is rebuilt" in log
    assert log.count("'learning_rate': 0.0005") == 1 and log.count("'learning_rate': 0.001") == 1
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert (state["config"]["learning_rate"], state["config"]["max_steps"], state["total_steps"]) == (5e-4, 5, 5)
    saved = torch.load(out / "checkpoint-5" / "optimizer.pt", weights_only=False)
    assert saved["scheduler"]["base_lrs"] == [5e-4]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["config"]["learning_rate"] == 1e-3


def test_free_fields_change_on_resume_and_are_logged(task, tiny_ckpt, finished, tmp_path):
    out = _copy(finished, tmp_path)
    cfg = run_config(task, tiny_ckpt, out, max_steps=4, save_steps=2, lr_scheduler_type="linear", logging_steps=2)
    Trainer(cfg, "latest").train()
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 4]  # logging_steps 2 from step 3 on
    assert [p.name for p in checkpoints.complete(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]
    log = (out / "train.log").read_text()
    assert "resume: save_steps 1 -> 2, used from step 3 on" in log and "resume: logging_steps 1 -> 2" in log


def test_resuming_an_older_checkpoint_never_overwrites_later_ones(task, tiny_ckpt, finished):
    before = snapshot(finished)
    with pytest.raises(checkpoints.ResumeError, match=r"checkpoint-1: .* already holds later checkpoint\(s\) "
                                                     r"checkpoint-2, which this run would overwrite"):
        Trainer(run_config(task, tiny_ckpt, finished, max_steps=2, save_steps=1, lr_scheduler_type="linear"),
                str(finished / "checkpoint-1"))
    assert snapshot(finished) == before


@pytest.mark.parametrize("max_steps", [2, 1])
def test_resuming_a_complete_run_says_so_and_writes_nothing(task, tiny_ckpt, finished, tmp_path, capsys, max_steps):
    from omni_fast.cli import main

    out = _copy(finished, tmp_path)
    before = snapshot(out)
    cfg = run_config(task, tiny_ckpt, out, max_steps=max_steps, save_steps=1, lr_scheduler_type="linear")
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(tmp_path / "run.json"), "--resume_from_checkpoint", "latest"]) == 0
    said = capsys.readouterr()
    assert said.out == f"nothing to train: the run is complete at step 2 of {max_steps}; checkpoint: " \
                       f"{out / 'checkpoint-2'}\n"
    assert "the run is complete" in said.err and "Traceback" not in said.err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}
    assert not (out / "checkpoint-99").exists() and not (out / ".omni-fast.lock").exists()


def test_a_trainer_state_that_contradicts_its_directory_is_refused(task, tiny_ckpt, finished, tmp_path):
    out = _copy(finished, tmp_path)
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["position"]["step"] = 99
    state_file.write_text(json.dumps(state))
    before = snapshot(out)
    with pytest.raises(checkpoints.ResumeError, match=r"trainer_state.json: says step 99, but the directory is "
                                                     r"checkpoint-2: the checkpoint is inconsistent"):
        Trainer(run_config(task, tiny_ckpt, out, max_steps=4, save_steps=1, lr_scheduler_type="linear"), "latest")
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pt"])
def test_a_truncated_checkpoint_file_is_named(task, tiny_ckpt, finished, tmp_path, name):
    out = _copy(finished, tmp_path)
    path = out / "checkpoint-2" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = snapshot(out)
    with pytest.raises(checkpoints.ResumeError) as e:
        Trainer(run_config(task, tiny_ckpt, out, max_steps=4, save_steps=1, lr_scheduler_type="linear"), "latest")
    said = str(e.value)
    assert said.startswith(f"{path}: cannot be read (") and said.endswith("the checkpoint is damaged: resume from an "
                                                                          "earlier one")
    assert "\n" not in said
    assert snapshot(out) == before


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(task, tiny_ckpt, finished, tmp_path, caplog):
    """A write cut short (a full disk) left half a line: the resume drops it, names the file, and goes on."""
    out = _copy(finished, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')
    with caplog.at_level(logging.WARNING, logger="omni_fast.grpo.metrics"):
        Trainer(run_config(task, tiny_ckpt, out, max_steps=3, save_steps=1, lr_scheduler_type="linear"),
                "latest").train()
    assert any(f"{out / 'metrics.jsonl'}: dropping a half-written last line (22 bytes)" in r.getMessage()
               for r in caplog.records)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert lines[:2] == (finished / "metrics.jsonl").read_text().splitlines()  # the earlier lines, untouched


def test_a_damaged_metrics_line_that_is_not_the_last_is_named(task, tiny_ckpt, finished, tmp_path):
    out = _copy(finished, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\ngarbage\n" + lines[1] + "\n")
    before = snapshot(out)
    trainer = Trainer(run_config(task, tiny_ckpt, out, max_steps=3, save_steps=1, lr_scheduler_type="linear"),
                      "latest")
    with pytest.raises(ValueError, match=rf"^{out / 'metrics.jsonl'} line 2: not a JSON object"):
        trainer.train()
    assert {k: v for k, v in snapshot(out).items() if k != "train.log"} == \
        {k: v for k, v in before.items() if k != "train.log"}
