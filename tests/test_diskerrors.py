"""A full disk during training: one line that says "No space left on device" and names the checkpoint, the previous
checkpoint whole, no temporary or 0-byte file left behind, and the same when resuming while still full. Checked on
a real small file system (a tmpfs, where this process may mount one) and with the write failing as torch reports
it (everywhere)."""
import errno
import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch

from omni_fast.cli import main
from omni_fast.diskerrors import describe, os_error
from omni_fast.grpo import checkpoints
from omni_fast.grpo.trainer import Trainer, TrainingError
from omni_fast.model.checkpoint import load_checkpoint
from omni_fast.toy import make_toy_task
from training import run_config

FULL = os.strerror(errno.ENOSPC)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_toy_task(tmp_path_factory.mktemp("toy"), clips_per_label=2)


def _tree(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _empty_or_temporary(directory):
    return [p for p in directory.rglob("*") if (p.is_file() and p.stat().st_size == 0) or ".tmp-" in p.name
            or ".partial-" in p.name]


def test_os_error_is_found_however_the_library_reported_it(tmp_path, monkeypatch):
    full = OSError(errno.ENOSPC, FULL)
    assert os_error(full) is full
    try:  # torch.save on a Python file object: a RuntimeError about stream positions, the OSError its context
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    except RuntimeError as e:
        assert os_error(e) is full
    said = os_error(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert (said.errno, said.strerror) == (errno.ENOSPC, FULL)  # safetensors' SafetensorError
    assert os_error(ValueError("not an I/O problem")) is None
    assert os_error(RuntimeError("unexpected pos 576 vs 534"), tmp_path) is None  # plenty of room here
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    assert os_error(RuntimeError("unexpected pos 576 vs 534"), tmp_path).errno == errno.ENOSPC  # a full disk
    assert describe(OSError(errno.ENOSPC, FULL), "run/checkpoint-2") == f"run/checkpoint-2: {FULL}"
    assert describe(OSError(errno.ENOSPC, FULL, "run/x.pt"), "run") == f"run/x.pt: {FULL}"


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(task, tiny_ckpt, tmp_path,
                                                                            monkeypatch):
    """torch.save fails on a full disk as torch reports it: some bytes written, then a RuntimeError whose context
    is the OSError."""
    out = tmp_path / "run"
    trainer = Trainer(run_config(task, tiny_ckpt, out, max_steps=3, save_steps=1))
    real = torch.save

    def full_disk(obj, f, *a, **k):
        if ".checkpoint-2." in str(getattr(f, "name", f)):
            f.write(b"\0" * 100)
            try:
                raise OSError(errno.ENOSPC, FULL)
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 64")
        return real(obj, f, *a, **k)

    def first_checkpoint_then_full(metrics):  # called after each step, before its save
        if metrics["step"] == 2:
            monkeypatch.setattr(torch, "save", full_disk)
            before.update(_tree(out))
    before = {}
    trainer.on_step = first_checkpoint_then_full
    with pytest.raises(TrainingError) as e:
        trainer.train()
    assert str(e.value) == (f"step 2: cannot save {out / 'checkpoint-2'}: {FULL}; the last good checkpoint, "
                            f"{out / 'checkpoint-1'}, is untouched")
    assert [p.name for p in checkpoints.complete(out)] == ["checkpoint-1"]
    assert (out / "latest").read_text() == "checkpoint-1\n"
    assert not _empty_or_temporary(out)
    after = _tree(out)
    assert {k: v for k, v in after.items() if k.startswith("checkpoint-1/")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoint-1/")}
    assert load_checkpoint(out / "checkpoint-1", device="cpu", dtype=torch.float32) is not None


def _mount_tmpfs(directory, size: int) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_real_full_disk_during_training_and_resume(task, tiny_ckpt, tmp_path, capsys):
    """On a tmpfs with room for one checkpoint and a half: checkpoint-2 does not fit. The run stops with one line
    naming it; then, with the disk filled up, a resume is refused in one line, leaving no temporary or 0-byte file
    and checkpoint-1 as it was."""
    probe = tmp_path / "probe"
    Trainer(run_config(task, tiny_ckpt, probe, max_steps=1)).train()
    size = sum(p.stat().st_size for p in (probe / "checkpoint-1").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, size * 3 // 2 + (256 << 10)):
        pytest.skip("this process may not mount a tmpfs (needs root); the simulated full disk test covers it")
    try:
        out = disk / "run"
        cfg = run_config(task, tiny_ckpt, out, max_steps=3, save_steps=1)
        (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
        argv = ["train", "--config", str(tmp_path / "run.json")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == (f"omni-fast train: error: step 2: cannot save {out / 'checkpoint-2'}: {FULL}; the last good "
                       f"checkpoint, {out / 'checkpoint-1'}, is untouched\n")
        assert [p.name for p in checkpoints.complete(out)] == ["checkpoint-1"]
        assert not _empty_or_temporary(out)
        kept = _tree(out / "checkpoint-1")
        with open(disk / "filler", "wb") as f:  # the disk stays full
            try:
                while True:
                    f.write(b"\0" * (64 << 10))
                    f.flush()
            except OSError:
                pass
        assert main(argv + ["--resume_from_checkpoint", "latest"]) == 2
        assert capsys.readouterr().err == f"omni-fast train: error: output_dir {out}: cannot write there ({FULL})\n"
        assert not _empty_or_temporary(out)
        assert _tree(out / "checkpoint-1") == kept and (out / "latest").read_text() == "checkpoint-1\n"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)  # -l: a log file may be open
