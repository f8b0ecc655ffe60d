"""One optimizer step of GRPO (and of the cold-start SFT stage): the one function the trainer
(grpo/trainer.py) and benchmarks/bench_grpo_step.py both run.

    ctx = build_context(cfg, loaded, dist, reference, total_steps)
    for metrics in grpo_step(ctx, micro_batches, step, phases): ...     # one dict per optimizer step

`grpo_step` reads top to bottom as the step runs, per generation batch (GRPOConfig.generation_batch_size
prompts, the whole step's by default), per micro-batch of B prompts, then once for the step:
    towers      the frozen towers once per clip, no grad; with a tower-feature store, clips the loader found
                there are read instead and the others are added to it            (features/towers.py)
    rollout     the policy's prompt embeddings (no grad) -> ONE engine call for the generation batch (its
                rows decode together, each prompt's group sharing its prefilled prompt): G completions per
                prompt, sampled with seeds keyed by (seed, step, prompt index), decoded   (grpo/rollout.py)
    rewards     each completion against its own prompt's label -> group advantages, the completion mask
                (dynamic_sampling: zero-variance groups dropped, more prompts drawn: grpo/dynamic.py)
    reference   the frozen initial weights' log-probs of the completions, no grad   (shared-prefix forward;
                with use_peft the policy's pass with its LoRA adapters off: the base weights, no second copy)
    policy      the policy's log-probs with grad -> the loss over the whole step's totals -> backward
    optimizer   gradients summed over ranks, their norm clipped, AdamW (fp32 masters for bf16 weights); the
                engine decodes the next step with the new weights, in place
    metrics     summed over ranks
With num_iterations > 1 the policy -> optimizer -> metrics part runs that many times on the same rollouts (PPO's
clipped ratio against the rollout policy's log-probs), each time one optimizer step.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from omni_fast import distributed
from omni_fast.config import ConfigError, EngineConfig, GRPOConfig
from omni_fast.devices import resolve_dtype
from omni_fast.distributed import DistContext
from omni_fast.engine.engine import Engine
from omni_fast.engine.kv_cache import pool_bytes
from omni_fast.features.store import FeatureStore
from omni_fast.features.towers import CachedTowers
from omni_fast.grpo import dynamic, fsdp
from omni_fast.grpo.advantage import check_scale
from omni_fast.grpo.inputs import ClipFeatures, grpo_bert_inputs, grpo_prompt_ids
from omni_fast.grpo.loss import LOSS_TYPES, grpo_loss
from omni_fast.grpo.optim import MasterAdamW, lr_lambda
from omni_fast.grpo.rewards import metric_name, resolve_rewards
from omni_fast.grpo.rollout import (Rollout, RolloutPrompts, make_rollout, rollout_logprobs, rollout_sums,
                                    sample_completions, score)
from omni_fast.grpo.sft import sft_batch, sft_loss
from omni_fast.model import lora


def check_config(cfg: GRPOConfig) -> None:
    """The GRPOConfig choices whose lists live with the code that uses them (the config imports none of it):
    loss_type (grpo/loss.NORMALIZERS), scale_rewards (the advantage kernels' scales), reward_funcs (the reward
    registry, importing "module:function" names), lora_target_modules (model/lora.py's targets). A ConfigError
    names the field."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type {cfg.loss_type!r}: expected one of {LOSS_TYPES}")
    try:
        check_scale(cfg.scale_rewards)
    except ValueError as e:
        raise ConfigError(f"scale_rewards: {e}") from None
    resolve_rewards([name for name, _ in cfg.rewards])
    if cfg.use_peft:
        try:
            lora.require_peft()
            lora.check_targets(cfg.lora_target_modules)
        except lora.LoraError as e:
            raise ConfigError(str(e)) from None


def train_dtype(cfg: GRPOConfig, device: torch.device) -> torch.dtype:
    """The parameters' dtype: GRPOConfig.dtype, "auto" being bfloat16 on a GPU (fp32 masters) and float32 on the CPU."""
    return resolve_dtype(None if cfg.dtype == "auto" else cfg.dtype, device, "bfloat16")


def set_trainable(model: nn.Module, stage: str) -> list[tuple[str, nn.Parameter]]:
    """GRPO trains the LLM, projectors, BERT and gate (the reference freezes only the towers); SFT also freezes
    BERT (train_humanomni.py). Sets requires_grad and returns the trained (name, parameter) pairs."""
    frozen = ["model.vision_tower.", "model.audio_tower."] + (["model.bert_model."] if stage == "sft" else [])
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in frozen))
        if p.requires_grad:
            trainable.append((name, p))
    return trainable


def _non_finite(value: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"the {what} is not finite")


@dataclass(slots=True)
class StepContext:
    """The models, engine and optimizer a run steps with (build_context makes it)."""
    cfg: GRPOConfig
    dist: DistContext  # torchrun's ranks, or one process
    rollout_model: nn.Module  # full weights on this rank: the towers, the engine's model, what checkpoints save
    trained: nn.Module  # the model the optimizer updates: rollout_model, or its FSDP2-sharded copy
    trainable: list[tuple[str, nn.Parameter]]  # trained's (name, parameter) pairs the optimizer steps
    policy: fsdp.ModelCall  # what the policy pass runs through (trained itself, or the FSDP2 root over it)
    reference: nn.Module | None  # the frozen initial weights (None: beta == 0, SFT, or LoRA)
    reference_call: Callable | None  # what the reference pass runs through (LoRA: the policy, adapters off)
    engine: Engine  # decodes with rollout_model's own weights
    tokenizer: object  # the checkpoint's tokenizer
    bert_tokenizer: object  # the gate's
    optimizer: MasterAdamW
    check_finite: Callable[[torch.Tensor, str], None] = _non_finite  # stops the run on a NaN / inf reward, loss, norm
    ignore_eos: bool = False  # completions run to max_completion_length (benchmarks)
    towers: CachedTowers | None = None  # the towers, behind the tower-feature store when the run has one
    prompt: tuple[torch.Tensor, dict] | None = None  # the GRPO prompt's ids and BERT inputs, made at the first step

    def policy_pass(self):
        """What the policy's gradient passes run under: the adapters' dropout on (LoRA), else nothing."""
        if self.cfg.use_peft and self.cfg.lora_dropout > 0:
            return lora.dropout_active(self.trained)
        return contextlib.nullcontext()

    @property
    def sharded(self) -> bool:
        """FSDP2 over more than one rank: the trained model is a sharded copy of the rollout model."""
        return self.trained is not self.rollout_model


class AdaptersOff:
    """The LoRA reference: the policy's pass (`call`, a ModelCall or FSDP2's root) with the adapters of `model`
    (the trained model) disabled, so the base weights alone compute it."""

    def __init__(self, call, model: nn.Module):
        self.call, self.model = call, model

    def __call__(self, fn, *args):
        with lora.disabled(self.model):
            return self.call(fn, *args)


def build_context(cfg: GRPOConfig, loaded, dist: DistContext, reference: nn.Module | None, total_steps: int,
                  engine_config: EngineConfig | None = None, log=None,
                  store: FeatureStore | None = None, adapter: Path | None = None) -> StepContext:
    """The StepContext of a run on `loaded` (a LoadedCheckpoint, its model in eval mode: no dropout anywhere):
    the stage's trainable parameters (with use_peft: LoRA adapters injected, `adapter` a saved one to start
    from), the policy (and `reference`, the frozen initial weights sharing the towers, or None; with use_peft the
    policy with its adapters off) as they are under DDP or sharded by FSDP2, the engine on the full weights, AdamW
    with the config's schedule over total_steps, and the towers behind `store` (a tower-feature store, or None)."""
    model = loaded.model
    if cfg.use_peft and reference is not None:
        raise ValueError("with use_peft the reference is the policy with its adapters off: pass no reference model")
    if cfg.use_peft:
        device = model.lm_head_weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # A's random start is the run's, whatever ran before
            trainable = lora.apply(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        if adapter is not None:
            lora.load_adapter(model, adapter)
    else:
        trainable = set_trainable(model, cfg.stage)
    if reference is not None:
        reference.requires_grad_(False).eval()
    trained, policy, reference_call = model, fsdp.ModelCall(model), None if reference is None else \
        fsdp.ModelCall(reference)
    if cfg.parallelism == "fsdp" and dist.enabled:  # the engine keeps the full copy; the policy is sharded
        trained = model.copy_sharing_towers()
        policy = fsdp.shard(trained, dist)
        trainable = [(n, p) for n, p in trained.named_parameters() if p.requires_grad]
        reference_call = None if reference is None else fsdp.shard(reference, dist)
    elif cfg.parallelism == "fsdp" and log is not None:
        log.info("parallelism fsdp in one process: nothing to shard, the model stays whole")
    if cfg.use_peft and cfg.stage == "grpo" and cfg.beta > 0:
        reference_call = AdaptersOff(policy, trained)
    optimizer = MasterAdamW(
        [p for _, p in trainable], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        schedule=lr_lambda(cfg.lr_scheduler_type, total_steps, math.ceil(cfg.warmup_ratio * total_steps)))
    return StepContext(cfg=cfg, dist=dist, rollout_model=model, trained=trained, trainable=trainable, policy=policy,
                       reference=reference, reference_call=reference_call,
                       engine=Engine(model, engine_config or engine_for(cfg, model), loaded.generation.eos_token_ids),
                       tokenizer=loaded.tokenizer, bert_tokenizer=loaded.bert_tokenizer, optimizer=optimizer,
                       towers=CachedTowers(model, store))


def clip_features(ctx: StepContext, batch) -> ClipFeatures:
    """A micro-batch's frozen tower features, once per clip: read from the tower-feature store for the clips the
    loader found there, the towers' for the others (which the store then keeps)."""
    towers = ctx.towers or CachedTowers(ctx.rollout_model)
    feats = towers.features(batch)
    return ClipFeatures(vision=feats.vision, audio=feats.audio)


def engine_for(cfg: GRPOConfig, model: nn.Module) -> EngineConfig:
    """The rollout engine's config: rows for a whole group of G completions at least, and a KV pool of twice
    what one step's prompts (spliced with 392 video and 500 audio embeddings) and their G completions each hold
    at most; preemption covers anything beyond."""
    dtype, prompts = model.lm_head_weight.dtype, cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    memory = pool_bytes(model.config, dtype, prompts, cfg.max_prompt_length + 892) + pool_bytes(
        model.config, dtype, prompts * cfg.num_generations, cfg.max_completion_length)
    return EngineConfig(max_num_seqs=max(EngineConfig().max_num_seqs, cfg.num_generations),
                        kv_cache_memory=2 * memory)


def grpo_prompt(ctx: StepContext) -> tuple[torch.Tensor, dict]:
    """The GRPO prompt's ids and the gate's BERT inputs, the same for every clip (tokenised once)."""
    if ctx.prompt is None:
        cfg, model = ctx.cfg, ctx.rollout_model
        x_start_end = model.config.mm_use_x_start_end
        ids = grpo_prompt_ids(ctx.tokenizer, cfg.max_prompt_length, cfg.prompt_template, x_start_end)
        ctx.prompt = (torch.tensor(ids, device=model.lm_head_weight.device),
                      grpo_bert_inputs(model, ctx.bert_tokenizer, cfg.prompt_template, x_start_end))
    return ctx.prompt


def grpo_step(ctx: StepContext, micro: list, step: int, phases, more=None) -> Iterator[dict]:
    """One GRPO step over this rank's micro-batches (objects with .frames, .mel and .records, each record with
    .label and .index, as omni_fast.media.loader yields them): the rollouts for optimizer step `step` (1-based),
    then num_iterations optimizer steps on them, yielding each one's metrics. `phases(name)` is a context
    manager timing each phase. With dynamic_sampling, `more()` gives this rank's share of the next step's worth
    of prompts (None: the data has no more this epoch) and grpo/dynamic.py fills the step."""
    cfg, g, model = ctx.cfg, ctx.cfg.num_generations, ctx.rollout_model
    ids, bert = grpo_prompt(ctx)
    rollouts = step_rollouts(ctx, micro, ids, bert, step, phases)
    sampled = {}
    if cfg.dynamic_sampling:
        rollouts, sampled = dynamic.fill_step(ctx.dist, cfg, rollouts, more,
                                              lambda drawn: step_rollouts(ctx, drawn, ids, bert, step, phases))
    pads = fsdp.pad_rollouts(ctx.dist, ctx.sharded, model, rollouts, ids, g, ctx.engine.default_stop[0])
    ref_logps: list[torch.Tensor | None] = [None] * len(rollouts)
    if ctx.reference_call is not None:
        with phases("reference"), torch.no_grad():
            ref_logps = [ctx.reference_call(rollout_logprobs, ro, bert, g, cfg.temperature) for ro in rollouts]
            for pad in pads:  # FSDP2: the sharded reference gathers its layers on every rank alike
                ctx.reference_call(rollout_logprobs, pad, bert, g, cfg.temperature)
    counts = torch.tensor([sum(int(r.mask.any(1).sum()) for r in rollouts),  # completions in the loss, their tokens
                           sum(float(r.mask.sum()) for r in rollouts)], dtype=torch.float64)
    sequences, tokens = distributed.all_reduce_sum(ctx.dist, counts).tolist()  # the global batch's
    old_logps: list[torch.Tensor | None] = [None] * len(rollouts)
    for iteration in range(cfg.num_iterations):
        loss = kl = clipped = 0.0
        for i, ro in enumerate(rollouts):
            with phases("policy"), ctx.policy_pass():
                logp = ctx.policy(rollout_logprobs, ro, bert, g, cfg.temperature)
                out = grpo_loss(logp, ro.advantages, ro.mask, ref_logp=ref_logps[i], old_logp=old_logps[i],
                                beta=cfg.beta, eps_low=cfg.epsilon, eps_high=cfg.epsilon_high or cfg.epsilon,
                                loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
                                num_sequences=int(sequences), num_items_in_batch=tokens)  # the step's totals
                ctx.check_finite(out.loss, "loss")
                out.loss.backward()
                if cfg.num_iterations > 1 and iteration == 0:
                    old_logps[i] = logp.detach()
            loss += float(out.loss.detach())
            kl += float(out.kl) * ro.mask.shape[0]
            clipped += float(out.clip_ratio) * float(ro.mask.sum())
        for pad in pads:
            with phases("policy"), ctx.policy_pass():
                (ctx.policy(rollout_logprobs, pad, bert, g, cfg.temperature).sum() * 0.0).backward()
        with phases("optimizer"):
            grad_norm, lr = optimizer_step(ctx)
        yield {**grpo_metrics(ctx, rollouts, loss, kl, clipped, grad_norm, lr), **sampled}


def step_rollouts(ctx: StepContext, micro: list, ids: torch.Tensor, bert: dict, step: int,
                  phases) -> list[Rollout]:
    """The rollouts of a step's worth of micro-batches, one per micro-batch: generation batches of
    GRPOConfig.generation_batch_size prompts (the whole step's by default), each in one engine call."""
    per_call = ctx.cfg.generation_prompts // ctx.cfg.per_device_train_batch_size  # micro-batches per engine call
    return [ro for lo in range(0, len(micro), per_call)
            for ro in generation_batch(ctx, micro[lo:lo + per_call], ids, bert, step, phases)]


def generation_batch(ctx: StepContext, micro: list, ids: torch.Tensor, bert: dict, step: int,
                     phases) -> list[Rollout]:
    """The rollouts of a generation batch (GRPOConfig.generation_batch_size prompts): the towers per
    micro-batch, every prompt's G completions from one engine call, then each micro-batch's rewards and
    Rollout."""
    cfg, g, model = ctx.cfg, ctx.cfg.num_generations, ctx.rollout_model
    prompts = []
    for batch in micro:
        with phases("towers"):
            feats = clip_features(ctx, batch)
        prompts.append(RolloutPrompts(feats, [ids] * len(batch.records), [r.index for r in batch.records]))
    rollouts = []
    with phases("rollout"):
        completions = sample_completions(model, ctx.engine, prompts, bert, step, cfg, ctx.ignore_eos)
        for batch, p, done in zip(micro, prompts, completions):
            token_ids = [c.token_ids for c in done]
            texts = [ctx.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
            rewards = score(cfg, texts, [len(t) for t in token_ids], [r.label for r in batch.records])
            rollouts.append(make_rollout(p.features, p.prompt_ids, token_ids, texts, rewards, g, cfg.scale_rewards,
                                         ctx.engine.default_stop[0], [c.finish_reason == "length" for c in done],
                                         cfg.mask_truncated_completions))
    for ro in rollouts:
        ctx.check_finite(ro.total_rewards, "reward")
    return rollouts


def grpo_metrics(ctx: StepContext, rollouts: list[Rollout], loss: float, kl: float, clipped: float,
                 grad_norm: float, lr: float) -> dict:
    """The step's metrics over every rank's rollouts (loss: the step's, summed over micro-batches; kl: summed
    per-sequence means; clipped: completion tokens whose ratio was clipped). "_tokens" is the step's completion
    tokens, for the caller's throughput."""
    cfg = ctx.cfg
    keys = [metric_name(n) for n, _ in cfg.rewards]
    sums = rollout_sums(rollouts, keys, cfg.num_generations)
    sums.update(loss=loss, kl=kl, clipped=clipped)
    names = sorted(sums)
    total = dict(zip(names, distributed.all_reduce_sum(
        ctx.dist, torch.tensor([sums[k] for k in names], dtype=torch.float64)).tolist()))
    n = max(total["sequences"], 1.0)
    return {"loss": total["loss"], "reward": total["reward"] / n,
            "reward_std": total["reward_std"] / max(total["groups"], 1.0), **{k: total[k] / n for k in keys},
            "kl": total["kl"] / n if ctx.reference_call is not None else math.nan,
            "completion_length": total["completion_length"] / n, "truncated_ratio": total["truncated"] / n,
            "clip_ratio": total["clipped"] / max(total["completion_length"], 1.0), "grad_norm": grad_norm,
            "learning_rate": lr, "_tokens": total["completion_length"]}


def sft_step(ctx: StepContext, micro: list, phases, pad_record) -> Iterator[dict]:
    """One SFT step over this rank's micro-batches (records with .question and .target): the towers once per
    clip, the cross-entropy of the assistant turn over the step's target tokens, backward, the optimizer.
    pad_record is what a pad pass trains on with weight 0 under FSDP2."""
    cfg, model, pad = ctx.cfg, ctx.rollout_model, ctx.engine.default_stop[0]
    x_start_end = model.config.mm_use_x_start_end
    batches = []
    for batch in micro:
        with phases("towers"):
            feats = clip_features(ctx, batch)
        batches.append(sft_batch(ctx.tokenizer, feats, batch.records, cfg.max_length, x_start_end, pad))
    tokens = int(distributed.all_reduce_sum(ctx.dist, torch.tensor([sum(b.num_tokens for b in batches)])))
    pads = fsdp.pad_sft_batches(ctx.dist, ctx.sharded, model, ctx.tokenizer, batches, pad_record, cfg.max_length,
                                x_start_end, pad)
    loss = 0.0
    for b in batches:
        with phases("policy"), ctx.policy_pass():
            scaled = ctx.policy(sft_loss, ctx.bert_tokenizer, b, tokens)
            ctx.check_finite(scaled, "loss")
            scaled.backward()
        loss += float(scaled.detach())
    for b in pads:
        with phases("policy"), ctx.policy_pass():
            (ctx.policy(sft_loss, ctx.bert_tokenizer, b, tokens) * 0.0).backward()
    with phases("optimizer"):
        grad_norm, lr = optimizer_step(ctx)
    loss = float(distributed.all_reduce_sum(ctx.dist, torch.tensor([loss], dtype=torch.float64)))
    yield {"loss": loss, "num_tokens": tokens, "grad_norm": grad_norm, "learning_rate": lr, "_tokens": float(tokens)}


def optimizer_step(ctx: StepContext) -> tuple[float, float]:
    """Gradients summed over ranks (FSDP2 has reduce-scattered them during backward), their norm clipped,
    AdamW, the schedule; under FSDP2 the new weights are gathered into the rollout model. Returns the
    pre-clip gradient norm and the learning rate the step used."""
    lr = ctx.optimizer.lr
    if not ctx.sharded:
        distributed.all_reduce_grads(ctx.dist, ctx.optimizer.params)
    norm = ctx.optimizer.clip(ctx.cfg.max_grad_norm)
    ctx.check_finite(norm, "gradient norm")
    ctx.optimizer.apply()
    if ctx.sharded:
        fsdp.gather_into(ctx.trained, ctx.rollout_model)  # the engine decodes the next step with the new weights
    return float(norm), lr
