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
