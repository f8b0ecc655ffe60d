"""End to end, through the real pipeline (media loader, towers, engine rollouts, rewards, group advantages,
shared-prefix log-probs, loss, AdamW, checkpoints): the tiny model learns the toy colour task.

SFT on answers whose labels are independent of the clip (omni_fast/toy.py) teaches the format and leaves
accuracy at chance (1/3); only GRPO's accuracy reward can teach which colour means which emotion. A sign error
in the loss or the advantages, a mask that drops the answer, or rewards paired with the wrong completions keep
the accuracy at chance, so this is the check that they are right together. About 70 s on 2 cores.
"""
import pytest
import torch

from omni_fast.grpo.trainer import Trainer
from omni_fast.toy import make_toy_task, toy_answers, toy_config

pytestmark = pytest.mark.slow  # about 75 s: SFT + 30 GRPO steps


def test_grpo_learns_the_toy_task(tiny_ckpt, tmp_path):
    torch.set_num_threads(2)
    task = make_toy_task(tmp_path / "task")
    sft = Trainer(toy_config(task, tiny_ckpt, tmp_path / "sft", "sft", progress=False))
    sft.train()
    assert sft.history[-1]["loss"] < 0.05 * sft.history[0]["loss"]
    grpo = Trainer(toy_config(task, sft.last_checkpoint, tmp_path / "grpo", "grpo", progress=False))
    history = grpo.train()
    accuracy = [m["rewards/accuracy_reward"] for m in history]
    fmt = [m["rewards/format_reward"] for m in history]
    start, end = sum(accuracy[:3]) / 3, sum(accuracy[-5:]) / 5
    assert start <= 0.45, accuracy         # SFT taught the format, not the task: near chance (1/3)
    assert min(fmt[:3]) >= 0.6, fmt        # ... and the format is there from the start
    assert end >= 0.8, accuracy            # GRPO taught the task
    clips = [c for label in task.labels for c in task.clips[label][:2]]
    answers = toy_answers(grpo.last_checkpoint, clips)
    expected = [f"<answer>{label}</answer>" for label in task.labels for _ in range(2)]
    correct = sum(e in a for e, a in zip(expected, answers))
    assert correct >= 5, list(zip(expected, answers))  # greedy recognition after training, 6 clips
