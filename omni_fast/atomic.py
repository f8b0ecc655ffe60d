"""Writing files so that no reader, and no crash, ever sees half of one: the content goes to a hidden sibling,
which is renamed onto the target (os.replace, atomic on POSIX) once it is whole.

Every file omni_fast writes for keeps (checkpoints' JSON, `latest`, metrics.jsonl when it is cut back, eval
results and summaries) goes through `atomic_write`; checkpoint directories are assembled in a `sibling`
directory the same way (model/checkpoint.py). A leftover sibling (a process killed mid-write) is named
.<target>.<tag>-<pid>, so whoever tidies up knows what it was for.
"""
from __future__ import annotations

import contextlib
import os
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
