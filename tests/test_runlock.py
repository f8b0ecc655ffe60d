"""omni_fast.runlock: one process at a time per output, checked with real processes (each holds or asks for
the lock the way `omni-fast train` / `eval` do), a holder killed with SIGKILL, and several takers at once."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from omni_fast.runlock import LOCK_NAME, LockedError, RunLock, lock_path

HOLD = """
import sys, time
from omni_fast.runlock import RunLock
lock = RunLock(sys.argv[1], "output_dir", sys.argv[2])
try:
    lock.acquire()
except Exception as e:
    print(f"refused: {e}", flush=True)
    sys.exit(3)
print("held", flush=True)
time.sleep(float(sys.argv[3]))
lock.release()
"""


def _holder(tmp_path, seconds=60.0):
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path(out)), str(out), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return out, proc


def test_lock_path_is_inside_a_directory_and_beside_a_file(tmp_path):
    assert lock_path(tmp_path) == tmp_path / LOCK_NAME
    assert lock_path(tmp_path / "eval.jsonl") == tmp_path / ".eval.jsonl.lock"


def test_a_second_process_is_refused_naming_the_output_and_the_holder(tmp_path):
    out, holder = _holder(tmp_path)
    try:
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        t0 = time.monotonic()
        other = subprocess.run([sys.executable, "-c", HOLD, str(lock_path(out)), str(out), "0"], capture_output=True,
                               text=True, timeout=60)
        assert time.monotonic() - t0 < 30  # refused at once, not after waiting for the holder
        assert other.returncode == 3, other.stderr
        line = other.stdout.strip()
        assert line.startswith(f"refused: output_dir {out} is in use by another omni-fast run: pid {holder.pid} on ")
        assert "\n" not in line and "choose another output_dir" in line
        with pytest.raises(LockedError, match=rf"pid {holder.pid}"):  # and in this process too
            RunLock(lock_path(out), "output_dir", out).acquire()
        assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # a refusal touches nothing
        assert json.loads(lock_path(out).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    out, holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)  # no release: the lock file stays, naming the dead process
    holder.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid
    lock = RunLock(lock_path(out), "output_dir", out)
    with caplog.at_level(logging.WARNING, logger="omni_fast.runlock"):
        lock.acquire()
    try:
        said = [r.getMessage() for r in caplog.records]
        assert any(f"taking over the lock of pid {holder.pid}" in m and "no longer running" in m for m in said), said
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not lock_path(out).exists()  # released: the file is gone


def test_release_lets_the_next_run_in_and_removes_the_file(tmp_path):
    out, holder = _holder(tmp_path, seconds=0.5)
    holder.wait(timeout=60)
    assert holder.returncode == 0 and not lock_path(out).exists()
    with RunLock(lock_path(out), "output_dir", out) as lock:
        assert lock.held
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            RunLock(lock_path(out), "output_dir", out).acquire()
    assert not lock_path(out).exists()


def test_of_several_processes_started_together_exactly_one_holds_the_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path(out)), str(out), "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        outputs = [p.stdout.readline().strip() for p in procs]  # the holder holds until it is killed below
        assert sorted(o.split(":")[0] for o in outputs) == ["held", "refused", "refused", "refused"], outputs
    finally:
        for p in procs:
            p.kill()
            p.communicate()
