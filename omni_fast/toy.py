"""A toy emotion task the tiny model can learn on a CPU in a minute, through the real training pipeline.

Each clip's dominant colour is its label (red: angry, blue: sad, green: happy); the frames carry noise and a
drifting brightness so no two clips are alike. Two annotation files in the R1-Omni format are written:
  sft.json   the cold start: answers in R1-Omni's format, "<think>The scene is red.</think>\\n<answer>X</answer>":
             the reasoning names the clip's colour, and each clip appears once with every label X, so the best
             SFT can do is to describe the colour and then answer with the labels equally likely. It teaches
             the format and the reasoning step, not the task: GRPO starts at chance level (1/3);
  grpo.json  the clips with their true labels: GRPO's accuracy reward is all that can teach which colour means
             which emotion (red: angry, blue: sad, green: happy).
(The colour is in the reasoning because an SFT on clip-independent labels alone teaches the tiny model to ignore
the clip altogether: its answers' log-probs then barely depend on the clip, and neither GRPO nor SFT on the
true labels brings the clip back within tens of steps.)
`omni-fast demo` and tests/test_learning.py run SFT then GRPO on it and watch the accuracy reward rise.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS = {"angry": (200, 40, 40), "sad": (40, 60, 200), "happy": (40, 180, 60)}
COLOUR_NAMES = {"angry": "red", "sad": "blue", "happy": "green"}


@dataclass(slots=True)
class ToyTask:
    root: Path  # where everything was written
    sft_annotations: Path  # format-only cold start (random labels)
    grpo_annotations: Path  # true labels
    clips: dict[str, list[Path]]  # label -> its clips
    labels: tuple[str, ...]  # the label set


def toy_frame(index: int, size: tuple[int, int], colour: tuple[int, int, int], seed: int) -> np.ndarray:
    w, h = size
    rng = np.random.default_rng(seed * 1000 + index)
    gain = 0.8 + 0.2 * np.sin(0.7 * index + seed)
    img = np.asarray(colour, dtype=np.float32)[None, None] * gain + rng.normal(0, 18, (h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def make_toy_task(directory: str | Path, clips_per_label: int = 4, seed: int = 0,
                  size: tuple[int, int] = (64, 48)) -> ToyTask:
    """Write the clips (1 s, 8 fps, h264 + AAC) and both annotation files under `directory`."""
    from omni_fast.task import DEFAULT_SFT_QUESTION, response
    from omni_fast.testing import make_clip

    root = Path(directory)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    labels = tuple(COLOURS)
    clips: dict[str, list[Path]] = {label: [] for label in labels}
    grpo, sft = [], []
    for k in range(clips_per_label):
        for j, label in enumerate(labels):
            clip_seed = seed * 100 + k * len(labels) + j
            path = make_clip(root / "clips" / f"{label}_{k}.mp4", seconds=1.0, fps=8, size=size, seed=seed,
                             frame_fn=lambda i, s, c=COLOURS[label], cs=clip_seed: toy_frame(i, s, c, cs))
            clips[label].append(path)
            human = {"from": "human", "value": DEFAULT_SFT_QUESTION}
            grpo.append({"video": f"clips/{path.name}", "conversations": [human, {"from": "gpt", "value": label}]})
            for other in labels:  # the same audio track everywhere: the colour is the only cue
                answer = response(f"The scene is {COLOUR_NAMES[label]}.", other)
                sft.append({"video": f"clips/{path.name}", "conversations": [human, {"from": "gpt", "value": answer}]})
    rng.shuffle(sft)
    (root / "grpo.json").write_text(json.dumps(grpo, indent=1))
    (root / "sft.json").write_text(json.dumps(sft, indent=1))
    return ToyTask(root=root, sft_annotations=root / "sft.json", grpo_annotations=root / "grpo.json", clips=clips,
                   labels=labels)


def toy_config(task: ToyTask, model_path: str | Path, output_dir: str | Path, stage: str, **overrides):
    """The GRPOConfig of a toy run: the recipe's structure at toy scale (a high learning rate for a tiny
    random model, short completions, a few steps)."""
    from omni_fast.config import GRPOConfig

    common = dict(model_path=str(model_path), output_dir=str(output_dir), stage=stage, label_set=task.labels,
                  video_root=str(task.root), media_backend="pyav", media_workers=2, device="cpu", save_steps=10_000)
    if stage == "sft":
        base = dict(train_annotations=str(task.sft_annotations), learning_rate=3e-3, lr_scheduler_type="constant",
                    warmup_ratio=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=40)
    else:
        base = dict(train_annotations=str(task.grpo_annotations), learning_rate=1e-3, lr_scheduler_type="constant",
                    per_device_train_batch_size=12, gradient_accumulation_steps=1, num_generations=8,
                    max_completion_length=24, max_steps=30, beta=0.04, prompt_template="chat_template")
    return GRPOConfig(**{**common, **base, **overrides})


def toy_answers(checkpoint: str | Path, clips: list[Path], prompt_template: str = "chat_template",
                max_tokens: int = 40) -> list[str]:
    """Greedy completions of a checkpoint on clips, with the prompt, frames (pad to square) and BERT input the
    training stages used, decoded as the rewards read them."""
    import torch

    from omni_fast.config import LoaderConfig, SamplingParams
    from omni_fast.engine.engine import Engine
    from omni_fast.grpo.inputs import grpo_bert_inputs, grpo_prompt_ids, tower_features
    from omni_fast.media.loader import MediaLoader
    from omni_fast.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint, device="cpu", dtype=torch.float32)
    model, x_start_end = loaded.model, loaded.config.mm_use_x_start_end
    ids = torch.tensor(grpo_prompt_ids(loaded.tokenizer, 512, prompt_template, x_start_end))
    bert = grpo_bert_inputs(model, loaded.bert_tokenizer, prompt_template, x_start_end)
    engine = Engine(model, stop_token_ids=loaded.generation.eos_token_ids)
    texts = []
    loader = MediaLoader(clips, LoaderConfig(batch_size=len(clips), backend="pyav", workers=2, aspect="pad"), "cpu")
    with torch.no_grad():
        for batch in loader:
            feats = tower_features(model, batch.frames, batch.mel)
            prefixes = model.prompt_embeddings([ids] * len(batch), feats.vision, feats.audio, bert)
            for group in engine.generate(prefixes, SamplingParams.greedy_params(max_tokens)):
                texts.append(loaded.tokenizer.decode(group[0].token_ids, skip_special_tokens=True))
    return texts
