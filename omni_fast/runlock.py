"""One process at a time per output: a lock file beside what a command writes (`omni-fast train`'s output_dir,
`omni-fast eval`'s --out).

    with RunLock(lock_path(output_dir), "output_dir", output_dir):   # or lock.acquire() ... lock.release()
        ...                                                         # nobody else writes there meanwhile

The lock is an fcntl.flock on the lock file, held for as long as the process keeps the file open: the kernel
takes it atomically and drops it when the process ends, however it ends, so a lock left by a process that died
is free again and is taken over (with a log line naming the dead holder). The file holds the holder's pid, host,
command line and start time, which is what a refused run is told. The file is removed on release; a process
that opened it just before the removal notices (its inode is no longer the path's) and tries again.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_NAME = ".omni-fast.lock"  # inside a directory that is locked


class LockedError(RuntimeError):
    """The output is in use by another running process; the message names the output and the process."""


def lock_path(target: str | Path) -> Path:
    """Where the lock of `target` lives: inside it for a directory, beside it (.<name>.lock) for a file (or a
    path where a file will be written)."""
    target = Path(target).expanduser()
    return target / LOCK_NAME if target.is_dir() else target.parent / f".{target.name}.lock"


def holder_text(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) \
        else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{when} ({holder.get('command', '?')})"


class RunLock:
    def __init__(self, path: str | Path, what: str, target: str | Path | None = None):
        self.path = Path(path)
        self.what = what  # how the refusal names the output: "output_dir", "--out"
        self.target = Path(target) if target is not None else self.path.parent
        self.file = None

    @property
    def held(self) -> bool:
        return self.file is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise LockedError naming the holder; a PermissionError / OSError names the path."""
        for _ in range(100):  # only a release racing with this open can make it go round again
            f = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read(f)
                f.close()
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise LockedError(f"{self.what} {self.target} is in use by another omni-fast run: "
                                  f"{holder_text(holder)}; wait for it to end or choose another {self.what} "
                                  f"(lock file {self.path})") from None
            if not _same_file(f, self.path):  # removed by the holder that released it: try the new file
                f.close()
                continue
            previous = _read(f)
            if previous.get("pid") is not None and (previous.get("pid"), previous.get("host")) != (
                    os.getpid(), socket.gethostname()):
                log.warning("%s %s: taking over the lock of %s, which is no longer running", self.what, self.target,
                            holder_text(previous))
            self.file = f
            try:
                f.seek(0)
                f.truncate()
                f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
                                    "started": time.time()}) + "\n")
                f.flush()
            except OSError as e:  # a full disk: no lock file is left behind
                self.release()
                raise OSError(e.errno, e.strerror, str(self.path)) from None
            return self
        raise LockedError(f"{self.what} {self.target}: the lock file {self.path} keeps changing; try again")

    def release(self) -> None:
        """Remove the lock file and let go of the lock (idempotent)."""
        if self.file is None:
            return
        f, self.file = self.file, None
        try:
            if _same_file(f, self.path):
                self.path.unlink()
        except OSError:
            pass
        try:
            f.close()  # closing drops the flock
        except OSError:  # buffered bytes a full disk did not take
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(f) -> dict:
    try:
        f.seek(0)
        found = json.loads(f.read() or "{}")
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


def _same_file(f, path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cli.py", "__main__.py")):
        argv[0] = "python -m omni_fast.cli"
    elif argv:
        argv[0] = Path(argv[0]).name
    return " ".join(argv)
