"""What a resume may change and what it must refuse, before anything is loaded.

    changes = check_resume(cfg, checkpoint, state, output_dir)   # ConfigError / ResumeError: one line each

* Each GRPOConfig field that differs from the checkpoint's is applied or refused by its rule in
  omni_fast.config.RESUME_RULES (free: used from the next step on; schedule: the learning-rate schedule is
  rebuilt, MasterAdamW.rebase_schedule; fixed: refused with the field, both values and the reason).
* A checkpoint older than one already in output_dir is refused: the resumed run would write over the later
  checkpoints (and drop their metrics.jsonl lines).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omni_fast.config import RESUME_RULES, RESUME_SCHEDULE, GRPOConfig
from omni_fast.grpo import checkpoints


def check_resume(cfg: GRPOConfig, checkpoint: Path, state: dict, output_dir: Path) -> list[str]:
    """The checks above; returns one line per applied change, for train.log."""
    step = state["position"]["step"]
    later = [c.name for c in checkpoints.complete(output_dir) if (checkpoints.step_of(c) or -1) > step]
    if later:
        raise checkpoints.ResumeError(f"--resume_from_checkpoint {checkpoint}: {output_dir} already holds later "
                               f"checkpoint(s) {', '.join(later)}, which this run would overwrite; resume from "
                               "latest, or move them away first")
    changes = cfg.resume_changes(state.get("config", {}), str(checkpoint))
    return [describe_change(name, old, new, step) for name, old, new in changes]


def describe_change(name: str, old: Any, new: Any, step: int) -> str:
    if RESUME_RULES[name][0] == RESUME_SCHEDULE:
        return (f"resume: {name} {old!r} -> {new!r}: the learning-rate schedule is rebuilt with it; step {step + 1} "
                "on run at the rate a run started with these values has there")
    return f"resume: {name} {old!r} -> {new!r}, used from step {step + 1} on"
