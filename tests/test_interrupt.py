"""SIGINT / SIGTERM during training: the step in flight finishes, a checkpoint of it is saved, the resume command is
printed and the exit status is 128 + the signal; a second signal stops at once, keeping the last whole checkpoint.
Real signals: sent to this process from a step callback, and to `omni-fast train` in a process of its own."""
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from omni_fast.grpo import checkpoints
from omni_fast.grpo.metrics import read_metrics
from omni_fast.grpo.trainer import Trainer
from omni_fast.interrupt import Interrupted
from omni_fast.runlock import lock_path
from omni_fast.toy import make_toy_task
from training import metrics_lines, run_config, start, train_argv, wait_for


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_toy_task(tmp_path_factory.mktemp("toy"), clips_per_label=2)


def _send(at_step: int, *signals):
    def on_step(metrics):
        if metrics["step"] == at_step:
            for s in signals:
                os.kill(os.getpid(), s)
    return on_step


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_in_flight_and_stops(task, tiny_ckpt, tmp_path, signum):
    out = tmp_path / "run"
    before = signal.getsignal(signum)
    trainer = Trainer(run_config(task, tiny_ckpt, out, max_steps=50, save_steps=1000), on_step=_send(2, signum))
    history = trainer.train()
    assert trainer.stop_signal == signum and trainer.pos.step == 2 and len(history) == 2
    assert checkpoints.resolve(out, "latest").name == "checkpoint-2"  # saved although save_steps is 1000
    assert [p.name for p in checkpoints.complete(out)] == ["checkpoint-2"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert not lock_path(out).exists() and signal.getsignal(signum) is before  # released, handler restored
    resumed = Trainer(run_config(task, tiny_ckpt, out, max_steps=3, save_steps=1000), "latest")
    assert resumed.pos.step == 2
    resumed.train()
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_a_second_signal_stops_at_once_keeping_the_last_whole_checkpoint(task, tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(run_config(task, tiny_ckpt, out, max_steps=50, save_steps=2),
                      on_step=_send(3, signal.SIGINT, signal.SIGINT))
    with pytest.raises(Interrupted):
        trainer.train()
    assert trainer.pos.step == 3
    assert [p.name for p in checkpoints.complete(out)] == ["checkpoint-2"]  # step 3 was not saved
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert not list(out.glob(".checkpoint-*")) and not lock_path(out).exists()


@pytest.mark.slow
def test_signals_to_a_training_process(task, tiny_ckpt, tmp_path):
    """`omni-fast train` in a process of its own: SIGINT and SIGTERM each end it after the step in flight with a
    checkpoint of it, one line on stderr naming the signal, the checkpoint and the command that resumes, and exit
    status 130 / 143; resuming with that command starts from that checkpoint."""
    runs = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / signal.Signals(signum).name
        cfg = run_config(task, tiny_ckpt, out, max_steps=500, save_steps=1000)
        argv = train_argv(cfg, tmp_path, "--seed", "42", name=f"{out.name}.json")
        runs[signum] = (out, argv, start(argv))
    for signum, (out, argv, proc) in runs.items():
        try:
            wait_for(lambda: metrics_lines(out) >= 2, proc)
            proc.send_signal(signum)
            stdout, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 128 + signum, err[-3000:]
        assert "Traceback" not in err
        step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        name = signal.Signals(signum).name
        resume = shlex.join(["omni-fast", *argv[3:], "--resume_from_checkpoint", "latest"])
        assert err.splitlines()[-1] == (f"omni-fast train: stopped by {name} after step {step} of 500; checkpoint: "
                                        f"{out / f'checkpoint-{step}'}; resume with: {resume}")
        assert f"omni-fast: {name} received: stopping after the step in flight" in err
        assert checkpoints.resolve(out, "latest").name == f"checkpoint-{step}"
        assert not list(out.glob(".checkpoint-*")) and not lock_path(out).exists()
    # the printed command resumes (one step more: --max_steps is free to change on resume)
    again = [sys.executable, "-m", "omni_fast.cli", *shlex.split(resume)[1:], "--max_steps", str(step + 1)]
    done = subprocess.run(again, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"trained {step + 1} steps")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, step + 2))
