"""Training checkpoints: output_dir/checkpoint-<step>/ = a HumanOmni checkpoint + the trainer state, atomic.

    checkpoint-<step>/
      config.json, model.safetensors, tokenizer files, bert-base-uncased/   the HumanOmni format, in the
                                                  parameters' dtype (loadable by OmniModel.from_pretrained)
      trainer_state.json     step, epoch, data position, skipped entries, the training config
      optimizer.pt           AdamW + scheduler state
      rng_state.pt           per rank: Python, NumPy, torch CPU and every CUDA device's RNG state
      master_weights.safetensors   fp32 master weights, only when the parameters are bf16
    latest                   the name of the newest complete checkpoint

With use_peft (LoRA) the weights of a checkpoint are the adapter alone, in PEFT's format (model/lora.py:
adapter_config.json, naming the run's initial model as base_model_name_or_path, and adapter_model.safetensors);
`omni-fast export --merge` makes a HumanOmni checkpoint of it.

A checkpoint is assembled in a hidden sibling directory and renamed into place only once every file is
written; `latest` is replaced (os.replace) after that rename. A run killed during a save leaves the
previous checkpoint whole and `latest` pointing at it; leftovers are removed when the next run starts.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from omni_fast.atomic import sibling, write_text
from omni_fast.diskerrors import os_error
from omni_fast.model import lora
from omni_fast.model.checkpoint import move_into_place, save_checkpoint

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(ValueError):
    """A checkpoint to resume from that is missing or incomplete; the message names it."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file object, so that a failed write carries its OSError (diskerrors)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def complete(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a trainer state), oldest first."""
    found = []
    for d in output_dir.glob("checkpoint-*") if output_dir.is_dir() else []:
        m = _CHECKPOINT.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def clean_partial(output_dir: Path) -> None:
    """Remove what an interrupted save left behind (hidden .checkpoint-* / ..checkpoint-* directories), except a
    .checkpoint-<step>.old-* copy (checkpoint-<step> moved aside to be replaced): while checkpoint-<step> is
    missing it is the only whole copy (the save stopped between its two renames), so it is renamed back; while
    checkpoint-<step> is incomplete it is kept."""
    for d in output_dir.glob(".*checkpoint-*"):
        name, moved_aside, _ = d.name[1:].partition(".old-")
        target = output_dir / name
        if moved_aside and _CHECKPOINT.match(name) and not target.exists() and (d / STATE_FILE).is_file():
            d.rename(target)
        elif not (moved_aside and _CHECKPOINT.match(name)) or (target / STATE_FILE).is_file():
            shutil.rmtree(d, ignore_errors=True)


def save(output_dir: Path, step: int, loaded, optimizer_state: dict, masters: dict[str, torch.Tensor],
         trainer_state: dict, rng_states: list[dict], total_limit: int | None = None,
         adapter: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically, point `latest` at it, and drop the oldest beyond total_limit.
    optimizer_state and masters are MasterAdamW.state_dict() / master_state() (full tensors, whatever the
    sharding). With `adapter` (LoRA: r, alpha, dropout, targets, base_model) the weights written are the
    model's adapter, in PEFT's format, instead of the whole model."""
    final = output_dir / f"checkpoint-{step}"
    partial = sibling(final, "partial")
    shutil.rmtree(partial, ignore_errors=True)
    dtype = next(loaded.model.parameters()).dtype
    config = dataclasses.replace(loaded.config, torch_dtype=str(dtype).removeprefix("torch."))
    try:
        if adapter is not None:
            partial.mkdir(parents=True)
            lora.save_adapter(loaded.model, partial, adapter["base_model"], adapter)
        else:
            save_checkpoint(dataclasses.replace(loaded, config=config), partial)
        _torch_save(optimizer_state, partial / "optimizer.pt")
        _torch_save({"world_size": len(rng_states), "ranks": rng_states}, partial / "rng_state.pt")
        if masters:
            save_file({k: v.contiguous() for k, v in masters.items()}, str(partial / "master_weights.safetensors"))
        (partial / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        move_into_place(partial, final)
        write_text(output_dir / LATEST, final.name + "\n")
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        err = os_error(e, output_dir) if isinstance(e, Exception) else None
        if err is None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(final)) from e  # one line naming the checkpoint
    if total_limit is not None:
        for stale in complete(output_dir)[:-total_limit]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    return final


def nonfinite(trainable: list[tuple[str, torch.Tensor]], optimizer, dist=None) -> str:
    """"" when every trained weight, fp32 master weight and AdamW moment is finite (on every rank); else what is
    not, for a message: "3 of 40 tensors of the weights and optimizer state (first: <name>)"."""
    from omni_fast import distributed

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = []
    for (name, p), m in zip(trainable, optimizer.masters):
        tensors.append((name, p))
        if m is not p:
            tensors.append((f"{name} (fp32 master)", m))
        for key, v in optimizer.optimizer.state.get(m, {}).items():
            if key != "step" and torch.is_tensor(v) and v.is_floating_point():
                tensors.append((f"{name} (AdamW {key})", v))
    bad = [name for name, t in tensors if not bool(torch.isfinite(local(t.detach())).all())]
    # FSDP: each rank checks its shards (and every rank must agree whether to save)
    n_bad = distributed.all_reduce_max(dist, len(bad)) if dist is not None else len(bad)
    if not n_bad:
        return ""
    first = f" (first: {bad[0]})" if bad else ""
    return f"{n_bad} of {len(tensors)} tensors of the weights and optimizer state{first}"


def resolve(output_dir: Path, spec: str) -> Path:
    """--resume_from_checkpoint: "latest" (the `latest` pointer, else the newest complete checkpoint) or a
    checkpoint directory."""
    if spec == "latest":
        pointer = output_dir / LATEST
        if pointer.is_file():
            named = output_dir / pointer.read_text().strip()
            if (named / STATE_FILE).is_file():
                return named
        found = complete(output_dir)
        if not found:
            raise ResumeError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return found[-1]
    path = Path(spec).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ResumeError(f"--resume_from_checkpoint {path}: not a training checkpoint (no {STATE_FILE})")
    return path


def load_trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint, checked: a position, and (for a checkpoint-<step> directory) that
    step."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        step = state["position"]["step"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ResumeError(f"{path / STATE_FILE}: cannot read the trainer state ({type(e).__name__}: {e})") from None
    named = _CHECKPOINT.match(path.name)
    if named and int(named.group(1)) != step:
        raise ResumeError(f"{path / STATE_FILE}: says step {step}, but the directory is {path.name}: the checkpoint "
                          "is inconsistent (copied over another?); resume from another checkpoint")
    return state


def saved_world_size(path: Path) -> int:
    """The number of processes that wrote a checkpoint (from its RNG states)."""
    return int(_load(path / "rng_state.pt")["world_size"])


def step_of(path: Path) -> int | None:
    """The step of a checkpoint-<step> directory (None for another name)."""
    named = _CHECKPOINT.match(path.name)
    return int(named.group(1)) if named else None


def _load(path: Path):
    """torch.load of a checkpoint file, or a ResumeError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated zip, a pickle error, an I/O error: all mean "cannot read"
        raise ResumeError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "the checkpoint is damaged: resume from an earlier one") from None


def restore(path: Path, optimizer, param_names: list[str], rank: int = 0, world_size: int = 1) -> int:
    """Optimizer, scheduler, master weights and this rank's RNG states from a checkpoint (the weights are
    loaded with it); returns the number of processes that saved it. Under another world size every rank
    takes rank 0's RNG states."""
    for name in ("optimizer.pt", "rng_state.pt"):
        if not (path / name).is_file():
            raise ResumeError(f"{path}: {name} is missing; the checkpoint cannot be resumed exactly")
    # on the CPU first: the file holds full tensors saved from rank 0's device, and AdamW's load moves each
    # entry to its parameter's device (and cuts it to this rank's shard under FSDP)
    try:
        optimizer.load_state_dict(_load(path / "optimizer.pt"))
    except (KeyError, ValueError, RuntimeError) as e:
        if isinstance(e, ResumeError):
            raise
        raise ResumeError(f"{path / 'optimizer.pt'}: does not fit this run's trained parameters ({e})") from None
    if optimizer.has_copies:
        masters = path / "master_weights.safetensors"
        if not masters.is_file():
            raise ResumeError(f"{path}: master_weights.safetensors is missing (the run had bf16 parameters)")
        try:
            tensors = load_file(str(masters))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise ResumeError(f"{masters}: cannot be read ({e}); the checkpoint is damaged: resume from an earlier "
                              "one") from None
        optimizer.load_master_state(param_names, tensors)
    rng = _load(path / "rng_state.pt")
    saved_world = rng["world_size"]
    set_rng_state(rng["ranks"][rank if saved_world == world_size else 0])
    return saved_world
