"""A training run's output_dir: checked, created and locked before anything is written into it, and left as it was
found when the start fails.

    run_dir = RunDir(Path(cfg.output_dir), is_main).claim()   # OutputDirError / LockedError: one line each
    ...                                                       # the start (model, data, resume checks)
    run_dir.abandon(logger)                                   # the start failed: remove what it created
    run_dir.release()                                         # the run ended: let the next one in

Only the main rank (rank 0 under torchrun) takes the lock (omni_fast.runlock) and writes train.log; every rank
creates the directory.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omni_fast.runlock import RunLock, lock_path

LOG_FILE = "train.log"


class OutputDirError(ValueError):
    """output_dir cannot hold a run: a file, or a place that cannot be created or written."""


class RunDir:
    def __init__(self, path: Path, is_main: bool = True):
        self.path = path
        self.is_main = is_main
        self.created = False  # this start made the directory
        self.had_log = False  # train.log was there before this start
        self.lock: RunLock | None = None

    def claim(self) -> RunDir:
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"output_dir {self.path} is a file; expected a directory (or a path where one can "
                                 "be created)")
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"output_dir {self.path}: cannot be created ({e.strerror or e})") from None
        self.had_log = (self.path / LOG_FILE).exists()
        if self.is_main:
            self.lock = RunLock(lock_path(self.path), "output_dir", self.path)
            try:
                self.lock.acquire()
            except OSError as e:  # read-only, not ours, full
                self.lock = None
                self._remove_created()
                raise OutputDirError(f"output_dir {self.path}: cannot write there ({e.strerror or e})") from None
            except BaseException:
                self.lock = None
                self._remove_created()
                raise
        return self

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abandon(self, logger: logging.Logger | None = None) -> None:
        """After a failed start: close the log, remove a train.log this start created (it holds nothing of a
        run) and the directory if this start created it and it is empty again, release the lock."""
        if logger is not None:
            for h in list(logger.handlers):
                logger.removeHandler(h)
                h.close()
        if self.is_main and not self.had_log:
            (self.path / LOG_FILE).unlink(missing_ok=True)
        self.release()
        self._remove_created()

    def _remove_created(self) -> None:
        if self.created and self.is_main:
            tensorboard = self.path / "tensorboard"
            if tensorboard.is_dir() and not any(tensorboard.iterdir()):
                shutil.rmtree(tensorboard, ignore_errors=True)
            try:
                self.path.rmdir()  # only when empty: nothing else is ever removed
            except OSError:
                pass
