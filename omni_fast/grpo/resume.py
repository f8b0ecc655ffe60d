"""What a resume may change and what it must refuse, before anything is loaded.

    changes = check_resume(cfg, checkpoint, state, output_dir)   # ConfigError / ResumeError: one line each

* Each GRPOConfig field that differs from the checkpoint's is applied or refused by its rule in
  omni_fast.config.RESUME_RULES (free: used from the next step on; schedule: the learning-rate schedule is
  rebuilt, MasterAdamW.rebase_schedule; batch: per_device_train_batch_size and gradient_accumulation_steps may
  split the same global batch otherwise, as under another number of processes, and no more; fixed: refused with
  the field, both values and the reason).
* A checkpoint older than one already in output_dir is refused: the resumed run would write over the later
  checkpoints (and drop their metrics.jsonl lines).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omni_fast.config import RESUME_BATCH, RESUME_RULES, RESUME_SCHEDULE, ConfigError, GRPOConfig
from omni_fast.grpo import checkpoints


def check_resume(cfg: GRPOConfig, checkpoint: Path, state: dict, output_dir: Path, world_size: int = 1) -> list[str]:
    """The checks above (world_size: the processes of this run); returns one line per applied change, for
    train.log."""
    step = state["position"]["step"]
    later = [c.name for c in checkpoints.complete(output_dir) if (checkpoints.step_of(c) or -1) > step]
    if later:
        raise checkpoints.ResumeError(f"--resume_from_checkpoint {checkpoint}: {output_dir} already holds later "
                               f"checkpoint(s) {', '.join(later)}, which this run would overwrite; resume from "
                               "latest, or move them away first")
    saved = state.get("config", {})
    changes = cfg.resume_changes(saved, str(checkpoint))
    if any(RESUME_RULES[name][0] == RESUME_BATCH for name, _, _ in changes):
        saved_world = state.get("world_size") or checkpoints.saved_world_size(checkpoint)
        old = saved["per_device_train_batch_size"] * saved["gradient_accumulation_steps"] * saved_world
        if old != cfg.prompts_per_step * world_size:
            raise ConfigError(
                f"{checkpoint} was trained with a global batch of {old} prompts a step (per_device_train_batch_size "
                f"{saved['per_device_train_batch_size']} x gradient_accumulation_steps "
                f"{saved['gradient_accumulation_steps']} x {saved_world} process(es)), this run would take "
                f"{cfg.prompts_per_step * world_size} ({cfg.per_device_train_batch_size} x "
                f"{cfg.gradient_accumulation_steps} x {world_size}): the global batch cannot change on resume ("
                f"{RESUME_RULES['per_device_train_batch_size'][1]}); split {old} prompts otherwise, or start a new "
                "run in another output_dir")
    return [describe_change(name, old, new, step) for name, old, new in changes]


def describe_change(name: str, old: Any, new: Any, step: int) -> str:
    if RESUME_RULES[name][0] == RESUME_SCHEDULE:
        return (f"resume: {name} {old!r} -> {new!r}: the learning-rate schedule is rebuilt with it; step {step + 1} "
                "on run at the rate a run started with these values has there")
    if RESUME_RULES[name][0] == RESUME_BATCH:
        return f"resume: {name} {old!r} -> {new!r}: the same global batch, split otherwise, from step {step + 1} on"
    return f"resume: {name} {old!r} -> {new!r}, used from step {step + 1} on"
