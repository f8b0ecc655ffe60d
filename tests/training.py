"""What the tests of training's failure cases share: the toy run at test scale, and `omni-fast train` started in
a process of its own (as a user starts it), with a wait for what it writes."""
import json
import subprocess
import sys
import time
from pathlib import Path

from omni_fast.toy import toy_config


def run_config(task, ckpt, out, stage="grpo", **kw):
    """A few steps of the toy task on the tiny checkpoint (GRPO: 2 prompts x 4 completions of 6 tokens)."""
    base = dict(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, num_generations=4,
                max_completion_length=6, progress=False, learning_rate=1e-3, reward_funcs=("format",))
    if stage == "sft":
        base = dict(max_steps=2, per_device_train_batch_size=2, progress=False)
    return toy_config(task, ckpt, out, stage, **{**base, **kw})


def train_argv(config, tmp_path: Path, *extra: str, name: str = "run.json") -> list[str]:
    """`python -m omni_fast.cli train --config <config as JSON> extra...`."""
    path = tmp_path / name
    path.write_text(json.dumps(config.to_dict()))
    return [sys.executable, "-m", "omni_fast.cli", "train", "--config", str(path), *extra]


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 240.0) -> None:
    """Poll until condition() holds; fail with the process's stderr if it ended first or time ran out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) first: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def metrics_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


# --- one GRPO step with a scripted engine ---------------------------------------------------------------------
class ScriptedEngine:
    """The engine's generate(): per prompt, the G completions `script(prompt, call)` returns (token ids, a stop
    token ending those that stop; one reaching `max_tokens` without one finishes with "length"); every call's
    SamplingParams are kept in `params`."""

    def __init__(self, default_stop: tuple[int, ...], script):
        self.default_stop, self.script, self.params = default_stop, script, []

    def generate(self, prefixes, params):
        import torch

        from omni_fast.engine.sequence import Completion

        assert len(prefixes) == len(params)
        self.params.append(list(params))
        call = len(self.params) - 1
        out = []
        for b, p in enumerate(params):
            rows = self.script(b, call)
            assert len(rows) == p.n and all(len(ids) <= p.max_tokens for ids in rows)
            out.append([Completion(token_ids=list(ids), logprobs=torch.zeros(len(ids)),
                                   finish_reason="stop" if ids and ids[-1] in self.default_stop else "length")
                        for ids in rows])
        return out


def scripted_micro(loaded, labels: list[str], indices: list[int], seed: int = 0) -> list:
    """One micro-batch of random clips (frames, mel) with records of these labels and annotation indices."""
    from types import SimpleNamespace

    import torch

    gen = torch.Generator().manual_seed(seed)
    b = len(labels)
    frames = torch.randn(b, loaded.config.num_frames, 3, 224, 224, generator=gen)
    mel = torch.randn(b, loaded.model.towers.audio.num_mel_bins, 3000, generator=gen) * 0.5
    records = [SimpleNamespace(label=label, index=i) for label, i in zip(labels, indices)]
    return [SimpleNamespace(frames=frames, mel=mel, records=records)]


def run_step(ctx, micro, step: int) -> list[dict]:
    """grpo_step's metrics, untimed."""
    import contextlib

    from omni_fast.grpo.step import grpo_step

    return list(grpo_step(ctx, micro, step, lambda name: contextlib.nullcontext()))
