"""Writing files so that no reader, and no crash, ever sees half of one: the content goes to a hidden sibling,
which is renamed onto the target (os.replace, atomic on POSIX) once it is whole.

Every file omni_fast writes for keeps (checkpoints' JSON, `latest`, metrics.jsonl when it is cut back, eval
results and summaries) goes through `atomic_write`; checkpoint directories are assembled in a `sibling`
directory the same way (model/checkpoint.py). A file that must never be replaced once there, which several
processes may write at once (the tower-feature store's entries), goes through `write_new`, which publishes it
with a hard link instead of a rename. A leftover sibling (a process killed mid-write) is named
.<target>.<tag>-<pid>, so whoever tidies up knows what it was for.
"""
from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path
from typing import IO, Iterator


def sibling(path: str | Path, tag: str = "tmp") -> Path:
    """The hidden sibling a write of `path` goes through: .<name>.<tag>-<pid> in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, fsync: bool = False) -> Iterator[IO]:
    """Open a sibling of `path` for writing (mode "w" or "wb"; text is UTF-8); when the block ends without an
    error it is flushed (fsync=True: to the disk), closed and renamed onto `path`; on an error it is removed
    and `path` keeps what it held."""
    path = Path(path)
    tmp = sibling(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """`text` into `path` through atomic_write."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_new(path: str | Path, data: bytes, *, fsync: bool = False) -> bool:
    """Publish `data` at `path` unless a file is there already; -> whether this call published it. The bytes go
    to a sibling of this process and thread (written with os.write; fsync=True: flushed to the disk), which is
    then hard-linked to `path`: atomic, and never replacing, so of several writers of one path exactly one
    publishes and the others return False. On an error (a full disk) the sibling is removed before the OSError
    goes on: nothing partial is left. Where the file system has no hard links, the sibling is renamed onto
    `path` after a check that `path` is absent (two racing writers may then replace a whole file with another
    whole one)."""
    path = Path(path)
    if path.exists():
        return False
    tmp = sibling(path, f"new{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return _link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link(tmp: Path, path: Path) -> bool:
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    if path.exists():
        return False
    os.replace(tmp, path)
    return True
