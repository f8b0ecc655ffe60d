"""output_dir of a training run: one run at a time (two real `omni-fast train` processes), a file or an unwritable
place said in one line, a start that fails leaves it as it was, and --device cuda without a GPU refused."""
import errno
import hashlib
import json
import logging
import signal

import pytest
import torch

from omni_fast.cli import main
from omni_fast.grpo import checkpoints
from omni_fast.grpo.rundir import OutputDirError
from omni_fast.grpo.trainer import Trainer
from omni_fast.runlock import LockedError, lock_path
from omni_fast.toy import make_toy_task
from training import metrics_lines, run_config, start, train_argv, wait_for


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_toy_task(tmp_path_factory.mktemp("toy"), clips_per_label=2)


def _tree(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def _cli(config, tmp_path, capsys, *extra):
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    code = main(["train", "--config", str(tmp_path / "run.json"), *extra])
    return code, capsys.readouterr()


def test_output_dir_that_is_a_file_is_one_line_and_untouched(task, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, said = _cli(run_config(task, tiny_ckpt, out), tmp_path, capsys)
    assert code == 2
    assert said.err == f"omni-fast train: error: output_dir {out} is a file; expected a directory (or a path where " \
                       "one can be created)\n"
    assert out.read_text() == "mine"


def test_an_output_dir_that_cannot_be_written_is_one_line(task, tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A read-only output_dir (simulated: root writes whatever the mode): the lock file is the first write."""
    import omni_fast.runlock as runlock

    out = tmp_path / "ro"
    out.mkdir()
    (out / "kept.txt").write_text("x")

    def refused(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(runlock, "open", refused, raising=False)
    code, said = _cli(run_config(task, tiny_ckpt, out), tmp_path, capsys)
    assert (code, said.err) == (2, f"omni-fast train: error: output_dir {out}: cannot write there (Permission "
                                   "denied)\n")
    assert _tree(out) == {"kept.txt": hashlib.sha256(b"x").hexdigest()}
    monkeypatch.undo()
    nested = tmp_path / "a-file"
    nested.write_text("")
    with pytest.raises(OutputDirError, match=rf"output_dir {nested / 'run'}: cannot be created \(Not a directory\)"):
        Trainer(run_config(task, tiny_ckpt, nested / "run"))


def test_a_failed_start_leaves_output_dir_as_it_found_it(task, tiny_ckpt, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    code, said = _cli(run_config(task, tmp_path / "no-such-model", fresh), tmp_path, capsys)
    assert code == 2 and "no-such-model: no such checkpoint directory" in said.err
    assert not fresh.exists()  # neither an empty directory nor a 0-byte train.log
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    assert _cli(run_config(task, tmp_path / "no-such-model", mine), tmp_path, capsys)[0] == 2
    assert _tree(mine) == {"notes.txt": hashlib.sha256(b"kept").hexdigest()}
    # a start that fails after the model loaded (a prompt length that would cut the placeholders) too
    code, said = _cli(run_config(task, tiny_ckpt, fresh, max_prompt_length=8), tmp_path, capsys)
    assert code == 2 and "max_prompt_length 8 would cut the <video> / <audio> placeholders" in said.err
    assert not fresh.exists()


def test_device_cuda_without_a_gpu_is_refused_before_anything_is_written(task, tiny_ckpt, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = tmp_path / "run"
    code, said = _cli(run_config(task, tiny_ckpt, out), tmp_path, capsys, "--device", "cuda")
    assert code == 2 and said.err.startswith("omni-fast train: error: device 'cuda': torch sees no CUDA GPU here")
    assert said.err.count("\n") == 1 and not out.exists()


def test_a_group_larger_than_the_engine_default_trains(task, tiny_ckpt, tmp_path):
    """num_generations above EngineConfig's default max_num_seqs (256): the trainer's engine takes the group."""
    trainer = Trainer(run_config(task, tiny_ckpt, tmp_path / "run", max_steps=1, num_generations=300,
                                 per_device_train_batch_size=1, max_completion_length=2))
    assert trainer.engine.config.max_num_seqs == 300
    history = trainer.train()
    assert len(history) == 1 and checkpoints.resolve(tmp_path / "run", "latest").name == "checkpoint-1"


def test_the_lock_is_released_at_the_end_and_after_a_failure(task, tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(run_config(task, tiny_ckpt, out, max_steps=1))
    assert lock_path(out).is_file()
    with pytest.raises(LockedError, match=rf"output_dir {out} is in use by another omni-fast run: pid \d+"):
        Trainer(run_config(task, tiny_ckpt, out, max_steps=2), "latest")
    trainer.train()
    assert not lock_path(out).exists()
    Trainer(run_config(task, tiny_ckpt, out, max_steps=2), "latest").train()  # the next run gets in
    assert not lock_path(out).exists()


@pytest.mark.slow
def test_a_second_train_on_the_same_output_dir_is_refused_at_once(task, tiny_ckpt, tmp_path, caplog):
    """Two `omni-fast train` processes on one output_dir: the second exits 2 at once naming the directory and the
    first process, which goes on and keeps its metrics; once the first is killed (SIGKILL: no release), the next
    run takes the lock over with a log line."""
    out = tmp_path / "run"
    cfg = run_config(task, tiny_ckpt, out, max_steps=500, save_steps=1)
    first = start(train_argv(cfg, tmp_path, name="first.json"))
    try:
        wait_for(lambda: metrics_lines(out) >= 1, first)
        second = start(train_argv(cfg, tmp_path, name="second.json"))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert err.startswith(f"omni-fast train: error: output_dir {out} is in use by another omni-fast run: pid "
                              f"{first.pid} on ")
        assert err.count("\n") == 1 and "Traceback" not in err
        done = metrics_lines(out)
        wait_for(lambda: metrics_lines(out) > done, first)  # the first run goes on, its metrics whole
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1))
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert json.loads(lock_path(out).read_text())["pid"] == first.pid  # left by the killed process
    with caplog.at_level(logging.WARNING, logger="omni_fast.runlock"):
        taker = Trainer(run_config(task, tiny_ckpt, out, max_steps=500, save_steps=1), "latest")
    assert any(f"taking over the lock of pid {first.pid}" in r.getMessage() for r in caplog.records)
    taker.run_dir.release()
