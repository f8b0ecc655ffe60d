"""Data parallelism with PyTorch's own machinery: torchrun starts the processes, torch.distributed connects them.

    torchrun --nproc_per_node 8 $(which omni-fast) train --config grpo.yaml
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 $(which omni-fast) ...

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL and one GPU per
local rank on CUDA machines, gloo on CPUs; without that environment it is one process and every helper here
is the identity. Collectives carry a timeout (`DistContext.timeout_s`), and a rank that raises exits its
process, which torchrun notices and answers by stopping the other ranks: a failure ends the job with that
rank's message in bounded time, never a hang on a collective.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from omni_fast.devices import resolve_device


@dataclass(slots=True)
class DistContext:
    rank: int = 0  # global rank
    world_size: int = 1  # processes in the job
    local_rank: int = 0  # rank on this node (the GPU it drives)
    device: torch.device = torch.device("cpu")  # this rank's device
    timeout_s: float = 600.0  # collective timeout

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """The process group from torchrun's environment (once per process), or a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if world > 1 and target.type == "cuda":  # one GPU per local rank
        torch.cuda.set_device(local)
        target = torch.device("cuda", local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=target, timeout_s=timeout_s)


def all_reduce_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """The sum of `values` over all ranks (returned on values' device; the input is left alone). The
    reduction runs on the rank's device, as NCCL needs."""
    if not ctx.enabled:
        return values.clone()
    out = values.detach().to(ctx.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def all_reduce_max(ctx: DistContext, value: int) -> int:
    """The largest `value` over all ranks."""
    if not ctx.enabled:
        return value
    out = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out)


def all_reduce_grads(ctx: DistContext, params: list[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """Sum the gradients over ranks in place, in flat buckets (what DDP's reducer does after backward; the
    loss is already scaled by the global batch, so the sum is the big-batch gradient). A parameter with a
    gradient on some ranks counts as zero on the others; one with none on any rank keeps none, as it would in
    one process (so AdamW skips it there too)."""
    if not ctx.enabled:
        return
    has = all_reduce_sum(ctx, torch.tensor([p.grad is not None for p in params], dtype=torch.int32))
    used = [p for p, n in zip(params, has.tolist()) if n > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in used:
        bucket.append(p)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(params: list[torch.nn.Parameter]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def all_gather_objects(ctx: DistContext, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard_step(chunk: list, ctx: DistContext, per_rank: int) -> list:
    """This rank's part of one optimizer step's records: rank r takes chunk[r * per_rank : (r + 1) * per_rank]
    (per_rank = per_device_train_batch_size x gradient_accumulation_steps). The last step of an epoch may leave
    a rank fewer records, or none; it still joins every collective."""
    return chunk[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
