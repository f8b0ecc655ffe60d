"""FSDP2 (torch.distributed.fsdp.fully_shard) for the trainer: `parallelism: fsdp`.

What is sharded over the ranks, and what is not:
  * the trained model (LLM, projectors, BERT, gate): each decoder layer is one FSDP2 unit, the rest is the root
    unit; its parameters, gradients, fp32 master weights and AdamW moments live as Shard(0) DTensors, 1/N each;
  * the frozen reference model: sharded the same way (gathered layer by layer when it scores);
  * the frozen towers are not sharded (`ignored_params`): every rank runs them on its own clips, and the plain
    model, the sharded one and the reference share the one copy;
  * a plain, full copy of the trained model (`replica`) stays on every rank for the rollout engine, which
    decodes token by token with every weight at every step: gathering the weights layer by layer for each of
    hundreds of decode steps would cost a full all-gather per token. After each optimizer step the new
    weights are gathered once into the replica, in place (its tensors keep their addresses, so the engine's
    CUDA graphs stay valid). Cost: one full model's weights in the parameter dtype per rank (1 GB for the
    0.5B, 15 GB for a 7B in bf16) and one all-gather of the weights per optimizer step.

The trainer calls the model's pieces directly (projectors, BERT gate, decoder, LM head), not its forward. So
that FSDP2's hooks see one forward (gather each unit before use, free it after, reduce-scatter the gradients
in backward), every computation on the sharded model runs inside `ModelCall.forward(fn, *args)`, which is
fn(model, *args) under the root unit. Gradients are reduce-scattered as sums (divide factor 1): the trainer's
losses are already scaled by the global batch, as with DDP.

Every forward and backward of a sharded model is a collective, so every rank must run as many of them per
step: a rank with fewer micro-batches than the busiest one (the end of an epoch, bad clips) makes up the
difference with pad passes whose loss is 0 x log-probs (`pad_rollouts`, `pad_sft_batches`).

Checkpoints hold full tensors (the replica's weights, the optimizer state and masters gathered), so a run
saved under FSDP resumes under any world size, or under DDP, and the other way round.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from omni_fast import distributed
from omni_fast.distributed import DistContext
from omni_fast.grpo.inputs import ClipFeatures, tower_features
from omni_fast.grpo.rollout import Rollout, make_rollout
from omni_fast.grpo.sft import SFTBatch, sft_batch


class ModelCall(nn.Module):
    """FSDP2's root unit: forward(fn, *args) = fn(model, *args), so any use of the model is one forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def shard(model: nn.Module, ctx: DistContext) -> ModelCall:
    """Shard `model` (HumanOmniForCausalLM) in place over every rank: one unit per decoder layer, the rest in
    the root; the towers stay plain and replicated. Returns the root to call."""
    import inspect

    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        fully_shard = None
    if (fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters
            or not hasattr(FSDPModule, "set_force_sum_reduction_for_comms")):
        raise RuntimeError(f"parallelism: fsdp needs FSDP2's fully_shard(ignored_params=...) and "
                           f"set_force_sum_reduction_for_comms (torch >= 2.8); this is torch {torch.__version__}. "
                           "Use parallelism: ddp, or a newer torch")

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    towers = {p for name, p in model.named_parameters() if "_tower." in name}
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    root = fully_shard(ModelCall(model), mesh=mesh, reshard_after_forward=True, ignored_params=towers)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sums, like all_reduce_grads: the loss carries the 1/N
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM; NCCL zero-copy)
    return root


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: every rank must call it, in the same order), else t."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as `param` (this rank's shard of it when param is a DTensor; no communication,
    every rank holds the full value)."""
    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


@torch.no_grad()
def gather_into(sharded: nn.Module, replica: nn.Module) -> None:
    """Copy the sharded model's trained weights (those that require grad: the frozen ones never change, which
    with LoRA is all but the adapters) into the replica's tensors, in place (every rank calls it)."""
    plain = dict(replica.named_parameters())
    for name, p in sharded.named_parameters():
        if isinstance(p, DTensor) and p.requires_grad:
            plain[name].copy_(p.full_tensor())


def sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """sum(g ** 2) in fp32 over whole tensors, for plain and Shard(0) DTensor gradients alike (the shards'
    sums are all-reduced over their mesh, so every rank must call it)."""
    plain = [g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    total = torch.stack(plain).sum() if plain else torch.zeros((), device=grads[0].device if grads else "cpu")
    if sharded:
        shards = torch.stack([g.to_local().float().pow(2).sum() for g in sharded]).sum()
        dist.all_reduce(shards, op=dist.ReduceOp.SUM, group=sharded[0].device_mesh.get_group())
        total = total + shards.to(total.device)
    return total


# --- pad passes: as many sharded passes on every rank -------------------------------------------------------------
def missing_passes(ctx: DistContext, sharded: bool, mine: int) -> int:
    """How many sharded passes this rank must add to match the busiest rank (0 unless the model is sharded)."""
    return distributed.all_reduce_max(ctx, mine) - mine if sharded else 0


def pad_features(model: nn.Module, feats: ClipFeatures | None) -> ClipFeatures:
    """One clip's features for a pad pass: the first of `feats`, or the towers' output for a zero clip."""
    if feats is not None:
        return ClipFeatures(feats.vision[:1], feats.audio[:1])
    device = model.lm_head_weight.device
    frames = torch.zeros(1, model.config.num_frames, 3, 224, 224, device=device)
    mel = torch.zeros(1, model.towers.audio.num_mel_bins, 3000, device=device)
    return tower_features(model, frames, mel)


def pad_rollouts(ctx: DistContext, sharded: bool, model: nn.Module, rollouts: list[Rollout],
                 prompt_ids: torch.Tensor, group_size: int, pad_id: int) -> list[Rollout]:
    """GRPO's pad passes for this rank: G one-token completions with zero advantages on its last micro-batch's
    features (a zero clip's when it has none). Under DDP, or on the busiest rank, there are none."""
    missing = missing_passes(ctx, sharded, len(rollouts))
    if not missing:
        return []
    feats = pad_features(model, rollouts[-1].features if rollouts else None)
    pad = make_rollout(feats, [prompt_ids], [[pad_id]] * group_size, [""] * group_size, {}, group_size, "group",
                       pad_id)
    return [pad] * missing


def pad_sft_batches(ctx: DistContext, sharded: bool, model: nn.Module, tokenizer, batches: list[SFTBatch], record,
                    max_length: int, use_x_start_end: bool, pad_id: int) -> list[SFTBatch]:
    """SFT's pad passes for this rank: `record` on one clip's features (see pad_rollouts)."""
    missing = missing_passes(ctx, sharded, len(batches))
    if not missing:
        return []
    feats = pad_features(model, batches[-1].features if batches else None)
    return [sft_batch(tokenizer, feats, [record], max_length, use_x_start_end, pad_id)] * missing
