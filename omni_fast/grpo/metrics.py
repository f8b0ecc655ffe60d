"""Where training progress goes: output_dir/metrics.jsonl, output_dir/train.log, TensorBoard, a progress bar.

metrics.jsonl holds one JSON object per logged step with the reference trainer's names (`loss`, `reward`,
`reward_std`, `rewards/accuracy_reward`, `rewards/format_reward`, `kl`, `completion_length`, `grad_norm`,
`learning_rate`) plus `clip_ratio` (the fraction of completion tokens whose probability ratio was clipped, TRL's
name; 0 unless num_iterations > 1), `step`, `epoch`, `skipped_clips`, `tokens_per_s` (completion tokens generated per second
of the step's wall time; SFT: target tokens) and the seconds of each phase
(`time/media`, `time/towers`, `time/rollout`, `time/reference`, `time/policy`, `time/optimizer`). On resume the
lines past the checkpoint's step (written by the run that was interrupted) are dropped, so the file reads as
one run; a half-written last line (a crash or a full disk during a write) is dropped with a warning, and any
other line that is not JSON is an error naming the file and the line. A value that is not a number (`kl`
without a reference model, beta = 0) is written as null.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from omni_fast.atomic import write_text

log = logging.getLogger(__name__)
_BAR_KEYS = (("reward", "reward"), ("acc", "rewards/accuracy_reward"), ("fmt", "rewards/format_reward"),
             ("kl", "kl"), ("len", "completion_length"), ("loss", "loss"), ("tok/s", "tokens_per_s"))


class Phases:
    """Seconds per named phase of one step: `with phases("rollout"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._name, self._t0 = None, 0.0

    def __call__(self, name: str) -> Phases:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._t0

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{k}": round(v, 6) for k, v in self.seconds.items()}


def make_logger(output_dir: Path, rank: int = 0) -> logging.Logger:
    """A logger writing to output_dir/train.log (appending) and, for warnings, to stderr; on ranks other than 0
    only errors, to stderr (rank 0 logs what every rank saw)."""
    logger = logging.getLogger(f"omni_fast.train.{output_dir.resolve()}.{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    if rank == 0:
        file = _LogFile(output_dir / "train.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)
    err.setFormatter(logging.Formatter("omni-fast train: %(levelname)s: %(message)s"))
    logger.addHandler(err)
    return logger


class _LogFile(logging.FileHandler):
    """train.log; a write it cannot make (a full disk) is said once on stderr, not as a traceback per line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not getattr(self, "_failed", False):
            self._failed = True
            error = sys.exc_info()[1]
            print(f"omni-fast train: WARNING: {self.baseFilename}: {getattr(error, 'strerror', None) or error}; "
                  "train.log is missing lines from here on", file=sys.stderr)


class MetricsLog:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True):
        self.path = output_dir / "metrics.jsonl"
        _truncate_after(self.path, start_step)
        self.file = self.path.open("a", encoding="utf-8")
        self.tensorboard = _tensorboard(output_dir / "tensorboard")
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def write(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        try:
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: one line naming the file
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        if self.tensorboard is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tensorboard.add_scalar(k, v, metrics["step"])

    def advance(self, metrics: dict) -> None:
        if self.bar is None:
            return
        shown = {label: f"{metrics[k]:.3g}" for label, k in _BAR_KEYS if isinstance(metrics.get(k), (int, float))}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _read_lines(path: Path) -> tuple[list[tuple[dict, int]], int]:
    """The JSON lines of a metrics file, each with the byte offset where it ends, and the byte length of a torn
    tail (the last line cut short by a crash or a full disk: without its newline, or not JSON), which is left
    out with a warning; any other line that is not JSON is a ValueError naming the file and the line."""
    data = path.read_bytes()
    rows, offset = [], 0
    lines = data.split(b"\n")
    ends_with_newline = lines[-1] == b""
    if ends_with_newline:
        lines.pop()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines, 1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if number - 1 == last and not ends_with_newline:
                raise ValueError("no newline")
            rows.append((row, min(offset, len(data))))
        except ValueError as e:
            if number - 1 == last:
                log.warning("%s: dropping a half-written last line (%d bytes) left by an interrupted write", path,
                            len(data) - start)
                return rows, len(data) - start
            raise ValueError(f"{path} line {number}: not a JSON object ({e}); the file is damaged: remove that "
                             "line to go on") from None
    return rows, 0


def _truncate_after(path: Path, step: int) -> None:
    """Drop the lines past `step` (written after the checkpoint being resumed) and a torn last line: cut off
    in place when they are the file's end, as they are when one run wrote it (a full disk has room for that),
    else rewritten through a temporary file."""
    if not path.is_file():
        return
    rows, torn = _read_lines(path)
    kept = [end for row, end in rows if row.get("step", 0) <= step]
    if len(kept) == len(rows) and not torn:
        return
    if kept == [end for _, end in rows[:len(kept)]]:  # the dropped lines all come after the kept ones
        os.truncate(path, kept[-1] if kept else 0)
        return
    write_text(path, "".join(json.dumps(row) + "\n" for row, _ in rows if row.get("step", 0) <= step))


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional; without it only metrics.jsonl is written
        return None
    return SummaryWriter(str(directory))


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of output_dir/metrics.jsonl (a torn last line left out, with a warning)."""
    return [row for row, _ in _read_lines(Path(output_dir) / "metrics.jsonl")[0]]
