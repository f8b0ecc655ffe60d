"""omni_fast.atomic: a file is the old one or the new one, never part of either, and nothing is left beside it."""
import errno
import os
import threading

import pytest

from omni_fast.atomic import atomic_write, sibling, write_new, write_text


def test_write_replaces_whole_and_leaves_nothing_beside(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    assert write_text(path, "new") == path and path.read_text() == "new"
    with atomic_write(path, "wb", fsync=True) as f:
        f.write(b"bytes")
    assert path.read_bytes() == b"bytes" and os.listdir(tmp_path) == ["a.json"]


def test_an_error_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_the_sibling_is_hidden_beside_the_target_and_names_the_process(tmp_path):
    s = sibling(tmp_path / "checkpoint-3", "partial")
    assert s.parent == tmp_path and s.name == f".checkpoint-3.partial-{os.getpid()}"
    assert sibling(tmp_path / "x").name == f".x.tmp-{os.getpid()}"


def test_write_new_never_replaces_and_leaves_nothing_beside(tmp_path):
    path = tmp_path / "entry"
    assert write_new(path, b"first")
    assert not write_new(path, b"second") and path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["entry"] and (path.stat().st_mode & 0o777) == 0o644


def test_write_new_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    real = os.write

    def full(fd, data):  # half of it lands, then the disk is full
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        write_new(tmp_path / "entry", b"x" * 1000)
    assert os.listdir(tmp_path) == []


def test_write_new_from_racing_threads_publishes_once(tmp_path):
    path, start, won = tmp_path / "entry", threading.Barrier(8), []

    def writer(k: int) -> None:
        start.wait()
        if write_new(path, bytes([k]) * 100_000):
            won.append(k)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and path.read_bytes() == bytes([won[0]]) * 100_000
    assert os.listdir(tmp_path) == ["entry"]
