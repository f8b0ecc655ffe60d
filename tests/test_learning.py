"""End to end, through the real pipeline (media loader, towers, engine rollouts, rewards, group advantages,
shared-prefix log-probs, loss, AdamW, checkpoints): the tiny model learns the toy colour task.

SFT on answers whose labels are independent of the clip (omni_fast/toy.py) teaches the format and leaves
accuracy at chance (1/3); only GRPO's accuracy reward can teach which colour means which emotion. A sign error
in the loss or the advantages, a mask that drops the answer, or rewards paired with the wrong completions keep
the accuracy at chance, so this is the check that they are right together, for full fine-tuning and for LoRA
(use_peft). About 2.5 minutes on 2 cores.
"""
import pytest
import torch

from omni_fast.grpo.trainer import Trainer
from omni_fast.model import lora
from omni_fast.toy import make_toy_task, toy_answers, toy_config

pytestmark = pytest.mark.slow  # about 75 s: SFT + 30 GRPO steps, and about 60 s more for LoRA's 30


@pytest.fixture(scope="module")
def sft(tiny_ckpt, tmp_path_factory):
    """The cold start both GRPO runs begin from: the format, not the task."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("learning")
    task = make_toy_task(root / "task")
    trainer = Trainer(toy_config(task, tiny_ckpt, root / "sft", "sft", progress=False))
    trainer.train()
    assert trainer.history[-1]["loss"] < 0.05 * trainer.history[0]["loss"]
    return task, trainer.last_checkpoint


def _learned(task, history, checkpoint) -> None:
    accuracy = [m["rewards/accuracy_reward"] for m in history]
    fmt = [m["rewards/format_reward"] for m in history]
    start, end = sum(accuracy[:3]) / 3, sum(accuracy[-5:]) / 5
    assert start <= 0.45, accuracy         # SFT taught the format, not the task: near chance (1/3)
    assert min(fmt[:3]) >= 0.6, fmt        # ... and the format is there from the start
    assert end >= 0.8, accuracy            # GRPO taught the task
    clips = [c for label in task.labels for c in task.clips[label][:2]]
    answers = toy_answers(checkpoint, clips)
    expected = [f"<answer>{label}</answer>" for label in task.labels for _ in range(2)]
    correct = sum(e in a for e, a in zip(expected, answers))
    assert correct >= 5, list(zip(expected, answers))  # greedy recognition after training, 6 clips


def test_grpo_learns_the_toy_task(sft, tmp_path):
    task, start = sft
    grpo = Trainer(toy_config(task, start, tmp_path / "grpo", "grpo", progress=False))
    _learned(task, grpo.train(), grpo.last_checkpoint)


def test_grpo_with_lora_learns_the_toy_task(sft, tmp_path):
    """Adapters on the decoder's linears only (rank 16), the reference being the adapters off; the adapter is
    merged into the SFT weights (omni-fast export --merge) for the greedy check. Its own learning rate: the
    adapters' update is alpha / r x B A, which starts at 0."""
    task, start = sft
    grpo = Trainer(toy_config(task, start, tmp_path / "grpo", "grpo", progress=False, use_peft=True,
                              learning_rate=5e-3))
    history = grpo.train()
    assert not (grpo.last_checkpoint / "model.safetensors").exists()  # the adapter only
    _learned(task, history, lora.merged_checkpoint(grpo.last_checkpoint, tmp_path / "merged"))
