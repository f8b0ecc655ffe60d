"""omni_fast.atomic: a file is the old one or the new one, never part of either, and nothing is left beside it."""
import os

import pytest

from omni_fast.atomic import atomic_write, sibling, write_text


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
