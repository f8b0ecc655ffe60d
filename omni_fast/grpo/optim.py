"""AdamW over fp32 master weights, gradient clipping, and the learning-rate schedules (pure functions).

The rollout engine decodes with the policy's own parameters, so an optimizer step must update them in place:
with float32 parameters AdamW steps them directly; with bfloat16 parameters (the GPU default) it steps an
fp32 master copy and writes the result back into the bf16 storage (DeepSpeed's bf16 mode, which the
reference trained with). Either way no tensor the engine or a captured CUDA graph holds changes address.

Under FSDP2 (grpo/fsdp.py) the parameters, their gradients, the masters and AdamW's moments are Shard(0)
DTensors: AdamW steps each rank's shard, the gradient norm sums the shards' squares over the ranks, and
`state_dict` / `master_state` gather full tensors (collectives: every rank calls them), so that a checkpoint
does not depend on the world size.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor

from omni_fast.grpo.fsdp import full, like, sum_of_squares


def lr_lambda(kind: str, total_steps: int, warmup_steps: int):
    """Multiplier of the peak learning rate after `step` optimizer steps, as transformers' schedules:
    linear warmup over warmup_steps, then linear decay to 0 at total_steps ("linear"), half a cosine to 0
    ("cosine"), or constant."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


class MasterAdamW:
    """AdamW (torch.optim.AdamW) over `params`; for low-precision params over fp32 master copies of them."""

    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, schedule):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
                        for p in self.params]
        self.has_copies = any(m is not p for m, p in zip(self.masters, self.params))
        self.sharded = any(isinstance(p, DTensor) for p in self.params)  # FSDP2
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                           foreach=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def rebase_schedule(self, lr: float) -> None:
        """After load_state_dict: `lr` is the schedule's peak and the next step's rate is this schedule's at the
        saved step, as in a run started with it (the loaded rate is the saved run's schedule's, which a changed
        learning_rate or length would otherwise keep for one step)."""
        step = self.scheduler.last_epoch
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients (fp32), before clipping."""
        return sum_of_squares([p.grad for p in self.params if p.grad is not None]).sqrt()

    def clip(self, max_grad_norm: float) -> torch.Tensor:
        """Move the gradients to the masters and clip their global norm to max_grad_norm (0: no clipping).
        Returns the pre-clip norm; nothing has changed the weights yet, so a non-finite norm can still stop the
        run with the weights intact."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        norm = self.grad_norm()
        if max_grad_norm > 0:  # torch.nn.utils.clip_grad_norm_'s rule, which also holds on FSDP2's shards
            scale = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
            for m in self.masters:
                if m.grad is not None:
                    m.grad.mul_(scale.to(m.grad.dtype))
        return norm

    def apply(self) -> None:
        """Step AdamW and the schedule, write the masters back into the parameters (in place)."""
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)
        self.zero_grad()

    def state_dict(self, keep: bool = True) -> dict | None:
        """AdamW's and the schedule's state with full tensors on the CPU (sharded moments are gathered one at a
        time, so the device holds one whole tensor at most). Under FSDP every rank must call it; those that
        do not write the checkpoint pass keep=False and get None (they only serve the gathers)."""
        optimizer = self.optimizer.state_dict()
        state = {i: {k: _on_cpu(v, keep) for k, v in s.items()} for i, s in optimizer["state"].items()}
        if not keep:
            return None
        optimizer["state"] = state
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The inverse of `state_dict`; full moments are cut to this rank's shards."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for m in self.masters:
            for k, v in self.optimizer.state.get(m, {}).items():
                if torch.is_tensor(v):
                    self.optimizer.state[m][k] = like(v, m)

    def master_state(self, names: list[str], keep: bool = True) -> dict[str, torch.Tensor] | None:
        """The fp32 masters by parameter name on the CPU, when they are copies (what a bf16 run must save to
        resume); gathered like `state_dict`, with the same keep."""
        masters = {n: _on_cpu(m.detach(), keep) for n, m, p in zip(names, self.masters, self.params) if m is not p}
        return masters if keep else None

    def load_master_state(self, names: list[str], state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, m, p in zip(names, self.masters, self.params):
                if m is not p:
                    if n not in state:
                        raise KeyError(f"master weight {n!r} missing from the checkpoint's trainer state")
                    m.copy_(like(state[n].to(torch.float32), m))
                    p.copy_(m)


def _on_cpu(value, keep: bool):
    """A state entry as saved: a tensor gathered whole (a collective for shards) and moved to the CPU, or
    dropped (None) on a rank that does not keep it; anything else as it is."""
    if not torch.is_tensor(value):
        return value
    whole = full(value)
    return whole.detach().cpu() if keep else None
