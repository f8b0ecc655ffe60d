"""The R1-Omni trainer: GRPO with verifiable rewards, and the cold-start SFT stage, on one process or on every
rank of a torchrun job (omni_fast/distributed.py: data parallel, each rank with its own rollout engine; with
`parallelism: fsdp` the trained and reference models are sharded by FSDP2, grpo/fsdp.py).

    trainer = Trainer(GRPOConfig(model_path=..., train_annotations=..., output_dir=...))
    trainer.train()                        # or: omni-fast train --config run.yaml

One GRPO optimizer step (per_device_train_batch_size x gradient_accumulation_steps prompts per rank):
  1. clips come decoded ahead from the MediaLoader (pad-to-square frames, as the reference trains);
  2. per micro-batch: the frozen towers run ONCE per clip (no grad), the projectors + gate make the prompt
     embeddings, the engine samples G completions with the policy's own weights (prefix prefilled once,
     shared-prefix decode), rewards -> group advantages (one kernel), and the frozen reference model scores
     the completions (shared-prefix forward, no grad);
  3. per micro-batch again: the policy's prompt embeddings with grad, its shared-prefix log-probs through
     ops.selective_logprob, the loss (grpo/loss.py, normalised by the whole step's totals), backward;
  4. sum the gradients over ranks, clip their norm, AdamW (fp32 masters for bf16 weights), the schedule;
     the parameters change in place, so the engine (and its CUDA graphs) decodes the next step with the new
     weights, no copy.

Where it departs from the reference trainer (humanOmni_grpo_trainer.py) and why:
  * The towers run once per clip per step, not once per completion and pass (17x in the reference); they
    are frozen there too, so the features are the same.
  * Each prompt is computed once per group in the rollout, the reference pass and the policy pass (the
    reference prefills and re-encodes it G times); values and gradients are those of the repeated forward
    (tests/test_logprobs.py).
  * BERT's dropout is off everywhere (the whole model stays in eval mode). The reference trains in train mode,
    so its BERT drops out differently in generate and in each of the G repeated policy rows, and its
    reference model (eval mode) sees no dropout: the policy's log-probs are then taken under a prompt that
    differs from the one the completions were sampled from, and the KL compares two different prompts. With
    dropout off the update is exactly on-policy and the KL compares like with like. Qwen2, SigLIP and
    Whisper have no active dropout in R1-Omni's configs, so BERT was the only difference.
  * The completion mask covers each completion up to its own stop token (<|im_end|> or <|endoftext|>), not up
    to the first <|im_end|> only: the reference also trains on the pad tail of a completion that ended on
    <|endoftext|>.
  * per_device_train_batch_size may be any value (the reference requires 1: its reward grouping breaks above
    it), and the loss of each micro-batch is scaled so that any split of a step's prompts into micro-batches
    gives the update of the whole batch at once (the reference averages micro-batch means, which only agrees
    when every micro-batch holds the same number of sequences, as it does at batch size 1).
  * Rollout seeds are keyed by (seed, step, prompt index), so runs are reproducible and resume exactly.
  * A bad entry (missing or undecodable clip, a label outside label_set) is skipped and listed, or fatal
    (on_bad_clip); the reference falls back to 10 s of silence only for bad audio and crashes otherwise.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni_fast import distributed
from omni_fast.config import ConfigError, EngineConfig, GRPOConfig, LoaderConfig
from omni_fast.devices import resolve_dtype
from omni_fast.engine.engine import Engine
from omni_fast.grpo import fsdp
from omni_fast.grpo import state as ckpt
from omni_fast.grpo.data import BadEntry, check_records, load_annotations
from omni_fast.grpo.inputs import ClipFeatures, grpo_bert_inputs, grpo_prompt_ids, tower_features
from omni_fast.grpo.advantage import check_scale
from omni_fast.grpo.loss import LOSS_TYPES, grpo_loss
from omni_fast.grpo.metrics import MetricsLog, Phases, make_logger
from omni_fast.grpo.optim import MasterAdamW, lr_lambda
from omni_fast.grpo.rewards import metric_name, resolve_rewards
from omni_fast.grpo.rollout import Rollout, rollout, rollout_logprobs, rollout_sums
from omni_fast.grpo.sft import sft_batch, sft_loss
from omni_fast.media.loader import MediaLoader
from omni_fast.media.pyav import MediaError
from omni_fast.model.checkpoint import load_checkpoint


class TrainingError(RuntimeError):
    """Training cannot go on (a bad entry with on_bad_clip="raise", a NaN); the message says where."""


@dataclass(slots=True)
class Position:
    """Where the run is: what resume restores besides weights, optimizer and RNG states."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the data
    consumed: int = 0  # records of this epoch's order already used
    excluded: list[int] = field(default_factory=list)  # entries left out of this epoch's order (bad so far)


def check_config(cfg: GRPOConfig) -> None:
    """The GRPOConfig choices whose lists live with the code that uses them (the config imports none of it):
    loss_type (grpo/loss.NORMALIZERS), scale_rewards (the advantage kernels' scales), reward_funcs (the reward
    registry, importing "module:function" names). A ConfigError names the field."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type {cfg.loss_type!r}: expected one of {LOSS_TYPES}")
    try:
        check_scale(cfg.scale_rewards)
    except ValueError as e:
        raise ConfigError(f"scale_rewards: {e}") from None
    resolve_rewards(cfg.reward_funcs)


class Trainer:
    def __init__(self, config: GRPOConfig, resume_from_checkpoint: str | None = None, on_step=None):
        if config.model_path is None or config.train_annotations is None:
            raise TrainingError("model_path and train_annotations must be set (in the config file or as "
                                "--model_path / --train_annotations)")
        self.cfg = cfg = config
        check_config(cfg)  # what the config cannot check without importing grpo/: before anything is loaded
        self.on_step = on_step  # called with each step's metrics (the demo prints its reward curve)
        self.history: list[dict] = []
        self._prompt = None  # GRPO prompt ids + BERT inputs, tokenised at the first step
        self.dist = distributed.init(cfg.device)  # torchrun's environment, or one process
        self.out = Path(cfg.output_dir).expanduser()
        self.out.mkdir(parents=True, exist_ok=True)
        resume = ckpt.resolve(self.out, resume_from_checkpoint) if resume_from_checkpoint else None
        if resume is None and ckpt.checkpoints(self.out):
            raise TrainingError(f"{self.out} already holds checkpoints; pass --resume_from_checkpoint latest to "
                                "continue that run, or choose another output_dir (nothing was overwritten)")
        distributed.barrier(self.dist)  # every rank has looked before rank 0 tidies up
        if self.dist.is_main:
            ckpt.clean_partial(self.out)
        self.log = make_logger(self.out, self.dist.rank)
        state = ckpt.load_trainer_state(resume) if resume else {}
        self.init_model_path = state.get("init_model_path", str(Path(cfg.model_path).expanduser().resolve()))
        device = self.dist.device
        dtype = resolve_dtype(None if cfg.dtype == "auto" else cfg.dtype, device, "bfloat16")
        self.loaded = load_checkpoint(resume or cfg.model_path, bert_path=None if resume else cfg.bert_path,
                                      device=device, dtype=dtype)
        self.model, self.device = self.loaded.model, device
        self.tokenizer, self.bert_tokenizer = self.loaded.tokenizer, self.loaded.bert_tokenizer
        self.model.eval()  # no dropout anywhere (see the module docstring)
        self._set_trainable()
        self.reference = self._reference(resume) if cfg.stage == "grpo" and cfg.beta > 0 else None
        self.plain = self.model  # full weights on this rank: towers, rollouts (the engine), checkpoints
        self.policy, self.ref_call = self._parallelize()
        self.sharded = self.model is not self.plain  # FSDP2 over more than one rank
        self.engine = Engine(self.plain, EngineConfig(), self.loaded.generation.eos_token_ids)
        self.records, self.skipped = self._records(state)
        self.step_prompts = cfg.prompts_per_step * self.dist.world_size  # the global batch of one step
        rollouts_per_epoch = math.ceil(len(self.records) / self.step_prompts)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else rollouts_per_epoch * cfg.num_train_epochs \
            * cfg.num_iterations
        self.optimizer = MasterAdamW(
            [p for _, p in self.trainable], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
            schedule=lr_lambda(cfg.lr_scheduler_type, self.total_steps, math.ceil(cfg.warmup_ratio * self.total_steps)))
        self.pos = Position(**state["position"]) if resume else Position()
        if resume:
            saved_world = ckpt.restore(resume, self.optimizer, [n for n, _ in self.trainable], self.dist.rank,
                                       self.dist.world_size)
            self.log.info(f"resumed from {resume} at step {self.pos.step}")
            if saved_world != self.dist.world_size:
                self.log.warning(f"resuming a run saved by {saved_world} process(es) with {self.dist.world_size}: "
                                 f"the global batch is now {self.step_prompts} prompts a step and the RNG states "
                                 "are rank 0's, so the run continues but does not repeat the original exactly")
        else:
            torch.manual_seed(cfg.seed)
        self.last_checkpoint = resume
        self.log.info(f"config: {cfg.to_dict()}")

    # --- setup ---------------------------------------------------------------------------------------------
    def _set_trainable(self) -> None:
        """GRPO trains the LLM, projectors, BERT and gate (the reference freezes only the towers); SFT also
        freezes BERT (train_humanomni.py)."""
        frozen = ["model.vision_tower.", "model.audio_tower."]
        if self.cfg.stage == "sft":
            frozen.append("model.bert_model.")
        self.trainable = []
        for name, p in self.model.named_parameters():
            p.requires_grad_(not any(name.startswith(f) for f in frozen))
            if p.requires_grad:
                self.trainable.append((name, p))

    def _reference(self, resume: Path | None):
        """A frozen copy of the initial weights sharing the policy's (frozen) towers."""
        if resume is None:
            ref = self.model.copy_sharing_towers()
        else:  # the initial weights are the run's model_path, not the checkpoint being resumed
            ref = load_checkpoint(self.init_model_path, bert_path=self.cfg.bert_path, device=self.device,
                                  dtype=next(self.model.parameters()).dtype).model
            ref.model.vision_tower, ref.model.audio_tower = self.model.model.vision_tower, self.model.model.audio_tower
        return ref.requires_grad_(False).eval()

    def _parallelize(self) -> tuple[fsdp.ModelCall, fsdp.ModelCall | None]:
        """The callables the policy and reference passes run through: the models themselves (DDP: gradients
        all-reduced after backward), or FSDP2 roots over sharded copies (grpo/fsdp.py; self.plain then stays a
        full replica for the engine, refreshed after each optimizer step)."""
        if self.cfg.parallelism == "fsdp" and not self.dist.enabled:
            self.log.info("parallelism fsdp in one process: nothing to shard, the model stays whole")
        if self.cfg.parallelism == "ddp" or not self.dist.enabled:
            return fsdp.ModelCall(self.model), None if self.reference is None else fsdp.ModelCall(self.reference)
        self.model = self.plain.copy_sharing_towers()
        policy = fsdp.shard(self.model, self.dist)
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return policy, None if self.reference is None else fsdp.shard(self.reference, self.dist)

    def _records(self, state: dict):
        bad: list[BadEntry] = []
        records = load_annotations(self.cfg.train_annotations, self.cfg.video_root, errors=bad)
        good, unusable = check_records(records, self.cfg.label_set, need_target=self.cfg.stage == "sft")
        skipped = {b["index"]: b for b in state.get("skipped", [])}
        for b in sorted(bad + unusable, key=lambda b: b.index):
            self._bad(b.index, b.path, b.reason, skipped)
        if not good:
            raise TrainingError(f"{self.cfg.train_annotations}: no usable entry ({len(skipped)} skipped)")
        return good, skipped

    def _bad(self, index: int, path: str, reason: str, skipped: dict | None = None) -> None:
        message = f"entry {index} ({path}): {reason}"
        if self.cfg.on_bad_clip == "raise":
            raise TrainingError(f"{self.cfg.train_annotations}: {message}")
        skipped = self.skipped if skipped is None else skipped
        if index not in skipped:
            self.log.warning(f"skipping {message}")
            skipped[index] = {"index": index, "path": path, "reason": reason}

    # --- the loop ------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run to total_steps; returns the logged metrics. Saves every save_steps and at the end."""
        metrics_log = MetricsLog(self.out, self.total_steps, self.pos.step, self.cfg.progress) \
            if self.dist.is_main else None
        history = self.history
        try:
            while self.pos.step < self.total_steps:
                if not self._epoch(metrics_log, history):
                    break
            if self.last_checkpoint is None or self.last_checkpoint.name != f"checkpoint-{self.pos.step}":
                self.save()
        finally:
            if metrics_log is not None:
                metrics_log.close()
        return history

    def _epoch_order(self) -> list:
        seeded = torch.Generator().manual_seed(self.cfg.seed + self.pos.epoch)
        order = torch.randperm(len(self.records), generator=seeded)
        excluded = set(self.pos.excluded)
        return [self.records[i] for i in order.tolist() if self.records[i].index not in excluded]

    def _epoch(self, metrics_log: MetricsLog, history: list[dict]) -> bool:
        """Steps through the rest of the current epoch; False when the data is exhausted for good."""
        cfg = self.cfg
        order = self._epoch_order()
        if not order:  # every entry has turned out bad: another epoch would loop without a step
            raise TrainingError(f"{cfg.train_annotations}: no usable entry left ({len(self.skipped)} skipped)")
        if self.pos.consumed >= len(order):
            if cfg.max_steps <= 0 and self.pos.epoch + 1 >= cfg.num_train_epochs:
                return False
            self.pos = Position(self.pos.step, self.pos.epoch + 1, 0, sorted(self.skipped))
            return True
        todo = order[self.pos.consumed:]
        per_rank = cfg.prompts_per_step
        mine = [r for start in range(0, len(todo), self.step_prompts)
                for r in distributed.shard_step(todo[start:start + self.step_prompts], self.dist, per_rank)]
        loader_cfg = LoaderConfig(batch_size=cfg.per_device_train_batch_size, backend=cfg.media_backend,
                                  workers=cfg.media_workers, prefetch=2, on_error=cfg.on_bad_clip, aspect="pad",
                                  num_frames=self.loaded.config.num_frames,
                                  n_mels=self.plain.towers.audio.num_mel_bins)
        with contextlib.closing(iter(MediaLoader(mine, loader_cfg, device=self.device))) as batches:
            while self.pos.step < self.total_steps and self.pos.consumed < len(order):
                phases, t0 = Phases(), time.perf_counter()
                micro = self._next_batches(batches, mine, phases)
                self.pos.consumed = min(len(order), self.pos.consumed + self.step_prompts)
                self._share_skipped()
                if not int(distributed.all_reduce_sum(self.dist, torch.tensor([sum(len(b) for b in micro)]))):
                    continue  # every clip of this step was bad, on every rank
                for metrics in (self._grpo_step if cfg.stage == "grpo" else self._sft_step)(micro, phases):
                    metrics.update(epoch=self.pos.epoch + self.pos.consumed / len(order),
                                   skipped_clips=len(self.skipped), **phases.as_metrics())
                    metrics["tokens_per_s"] = metrics.pop("_tokens") / max(time.perf_counter() - t0, 1e-9)
                    self._after_step(metrics, metrics_log, history)
        return True

    def _next_batches(self, batches, mine: list, phases: Phases) -> list:
        """This rank's next gradient_accumulation_steps micro-batches (fewer, or none, at the end of the
        epoch), bad clips skipped and listed."""
        out = []
        for _ in range(self.cfg.gradient_accumulation_steps):
            with phases("media"):
                try:
                    batch = next(batches, None)
                except MediaError as e:  # on_bad_clip="raise"
                    bad = next((r for r in mine if str(e).startswith(str(r.video))), None)
                    raise TrainingError(f"{self.cfg.train_annotations}: entry "
                                        f"{bad.index if bad else '?'}: {e}") from None
            if batch is None:
                break
            for f in batch.failures:
                self._bad(mine[f.index].index, f.path, f.error)
            if len(batch):
                out.append(batch)
        return out

    def _share_skipped(self) -> None:
        """Every rank learns the entries the others skipped (rank 0 logs them and saves the list)."""
        if self.dist.enabled:
            for theirs in distributed.all_gather_objects(self.dist, list(self.skipped.values())):
                for b in theirs:
                    self._bad(b["index"], b["path"], b["reason"])

    def _after_step(self, metrics: dict, metrics_log: MetricsLog, history: list[dict]) -> None:
        self.pos.step += 1
        metrics = {"step": self.pos.step, **metrics}
        history.append(metrics)
        if metrics_log is not None:
            if self.pos.step % self.cfg.logging_steps == 0 or self.pos.step == self.total_steps:
                metrics_log.write(metrics)
                self.log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in metrics.items()))
            metrics_log.advance(metrics)
        if self.on_step is not None and self.dist.is_main:
            self.on_step(metrics)
        if self.pos.step % self.cfg.save_steps == 0:
            self.save()

    # --- GRPO ------------------------------------------------------------------------------------------------
    def _grpo_prompt(self) -> tuple[torch.Tensor, dict]:
        """The GRPO prompt's ids and the gate's BERT inputs, the same for every clip (tokenised once)."""
        if self._prompt is None:
            cfg, x_start_end = self.cfg, self.loaded.config.mm_use_x_start_end
            ids = grpo_prompt_ids(self.tokenizer, cfg.max_prompt_length, cfg.prompt_template, x_start_end)
            self._prompt = (torch.tensor(ids, device=self.device),
                            grpo_bert_inputs(self.plain, self.bert_tokenizer, cfg.prompt_template, x_start_end))
        return self._prompt

    def _grpo_step(self, micro: list, phases: Phases):
        cfg, g = self.cfg, self.cfg.num_generations
        ids, bert = self._grpo_prompt()
        rollouts: list[Rollout] = []
        for batch in micro:
            with phases("towers"):
                feats = tower_features(self.plain, batch.frames, batch.mel)
            with phases("rollout"):
                ro = rollout(self.plain, self.engine, self.tokenizer, feats, [ids] * len(batch), bert,
                             [r.label for r in batch.records], [r.index for r in batch.records],
                             self.pos.step + 1, cfg)
            self._check_finite(ro.total_rewards, "reward")
            rollouts.append(ro)
        pads = self._pad_rollouts(rollouts, ids)  # FSDP: as many sharded passes as the busiest rank
        if self.reference is not None:
            with phases("reference"), torch.no_grad():
                for ro in rollouts + pads:
                    ro.ref_logp = self.ref_call(rollout_logprobs, ro, bert, g, cfg.temperature)
        counts = torch.tensor([sum(r.mask.shape[0] for r in rollouts), sum(float(r.mask.sum()) for r in rollouts)],
                              dtype=torch.float64)
        sequences, tokens = distributed.all_reduce_sum(self.dist, counts).tolist()  # the global batch's
        for iteration in range(cfg.num_iterations):
            loss = kl = clipped = 0.0
            for ro in rollouts:
                with phases("policy"):
                    logp = self.policy(rollout_logprobs, ro, bert, g, cfg.temperature)
                    out = grpo_loss(logp, ro.advantages, ro.mask, ref_logp=ro.ref_logp, old_logp=ro.old_logp,
                                    beta=cfg.beta, eps_low=cfg.epsilon, eps_high=cfg.epsilon_high or cfg.epsilon,
                                    loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
                                    num_sequences=int(sequences), num_items_in_batch=tokens)  # the step's totals
                    self._check_finite(out.loss, "loss")
                    out.loss.backward()
                    if cfg.num_iterations > 1 and iteration == 0:
                        ro.old_logp = logp.detach()
                loss += float(out.loss.detach())
                kl += float(out.kl) * ro.mask.shape[0]
                clipped += float(out.clip_ratio) * float(ro.mask.sum())
            for pad in pads:
                with phases("policy"):
                    (self.policy(rollout_logprobs, pad, bert, g, cfg.temperature).sum() * 0.0).backward()
            with phases("optimizer"):
                grad_norm = self._optimizer_step()
            yield self._grpo_metrics(rollouts, loss, kl, clipped, grad_norm)

    def _pad_rollouts(self, rollouts: list[Rollout], ids: torch.Tensor) -> list[Rollout]:
        """Under FSDP2 every forward and backward of the sharded models is a collective, so a rank with fewer
        micro-batches than the busiest one (the end of an epoch, bad clips) makes up the difference with passes
        whose loss is 0 x log-probs: one completion token per row, on its last micro-batch's features (zero
        features when it has none). Under DDP there are none."""
        missing = self._missing_passes(len(rollouts))
        if not missing:
            return []
        g = self.cfg.num_generations
        feats = self._pad_features(rollouts[-1].features if rollouts else None)
        zeros = torch.zeros(g, 1, dtype=torch.long, device=self.device)
        pad = Rollout(features=feats, prompt_ids=[ids], completions=zeros, lengths=torch.ones(g, dtype=torch.long,
                      device=self.device), mask=zeros.float(), advantages=zeros[:, 0].float(), rewards={},
                      total_rewards=zeros[:, 0].float(), texts=[""] * g, ref_logp=None)
        return [pad] * missing

    def _missing_passes(self, mine: int) -> int:
        """How many sharded passes this rank must add to match the busiest rank (0 unless sharded)."""
        return distributed.all_reduce_max(self.dist, mine) - mine if self.sharded else 0

    def _pad_features(self, feats: ClipFeatures | None) -> ClipFeatures:
        """One clip's features for a pad pass: the first of `feats`, or the towers' output for a zero clip."""
        if feats is not None:
            return ClipFeatures(feats.vision[:1], feats.audio[:1])
        cfg = self.loaded.config
        frames = torch.zeros(1, cfg.num_frames, 3, 224, 224, device=self.device)
        mel = torch.zeros(1, self.plain.towers.audio.num_mel_bins, 3000, device=self.device)
        return tower_features(self.plain, frames, mel)

    def _grpo_metrics(self, rollouts: list[Rollout], loss: float, kl: float, clipped: float, grad_norm: float) -> dict:
        """The step's metrics over every rank's rollouts (clipped: completion tokens whose ratio was clipped)."""
        keys = [metric_name(n) for n in self.cfg.reward_funcs]
        sums = rollout_sums(rollouts, keys, self.cfg.num_generations)
        sums.update(loss=loss, kl=kl, clipped=clipped)
        names = sorted(sums)
        total = dict(zip(names, distributed.all_reduce_sum(
            self.dist, torch.tensor([sums[k] for k in names], dtype=torch.float64)).tolist()))
        n = max(total["sequences"], 1.0)
        return {"loss": total["loss"], "reward": total["reward"] / n,
                "reward_std": total["reward_std"] / max(total["groups"], 1.0), **{k: total[k] / n for k in keys},
                "kl": total["kl"] / n if self.reference is not None else math.nan,
                "completion_length": total["completion_length"] / n,
                "clip_ratio": total["clipped"] / max(total["completion_length"], 1.0), "grad_norm": grad_norm,
                "learning_rate": self._lr_used, "_tokens": total["completion_length"]}

    # --- SFT -------------------------------------------------------------------------------------------------
    def _sft_step(self, micro: list, phases: Phases):
        cfg, pad = self.cfg, self.engine.default_stop[0]
        batches = []
        for batch in micro:
            with phases("towers"):
                feats = tower_features(self.plain, batch.frames, batch.mel)
            batches.append(sft_batch(self.tokenizer, feats, batch.records, cfg.max_length,
                                     self.loaded.config.mm_use_x_start_end, pad))
        tokens = int(distributed.all_reduce_sum(self.dist, torch.tensor([sum(b.num_tokens for b in batches)])))
        pads = self._pad_sft(batches, pad)  # FSDP: as many sharded passes as the busiest rank (_pad_rollouts)
        loss = 0.0
        for b in batches:
            with phases("policy"):
                scaled = self.policy(sft_loss, self.bert_tokenizer, b, tokens)
                self._check_finite(scaled, "loss")
                scaled.backward()
            loss += float(scaled.detach())
        for b in pads:
            with phases("policy"):
                (self.policy(sft_loss, self.bert_tokenizer, b, tokens) * 0.0).backward()
        with phases("optimizer"):
            grad_norm = self._optimizer_step()
        loss = float(distributed.all_reduce_sum(self.dist, torch.tensor([loss], dtype=torch.float64)))
        yield {"loss": loss, "num_tokens": tokens, "grad_norm": grad_norm, "learning_rate": self._lr_used,
               "_tokens": float(tokens)}

    def _pad_sft(self, batches: list, pad_id: int) -> list:
        """SFT's pad passes (see _pad_rollouts): one record on one clip's features."""
        missing = self._missing_passes(len(batches))
        if not missing:
            return []
        feats = self._pad_features(batches[-1].features if batches else None)
        one = sft_batch(self.tokenizer, feats, [self.records[0]], self.cfg.max_length,
                        self.loaded.config.mm_use_x_start_end, pad_id)
        return [one] * missing

    # --- shared ----------------------------------------------------------------------------------------------
    def _optimizer_step(self) -> float:
        self._lr_used = self.optimizer.lr
        if not self.sharded:  # FSDP2 has reduce-scattered them during backward
            distributed.all_reduce_grads(self.dist, self.optimizer.params)
        norm = self.optimizer.clip(self.cfg.max_grad_norm)
        self._check_finite(norm, "gradient norm")
        self.optimizer.apply()
        if self.sharded:
            fsdp.gather_into(self.model, self.plain)  # the engine decodes the next step with the new weights
        return float(norm)

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        if not bool(torch.isfinite(value).all()):
            self.optimizer.zero_grad()
            kept = f"the last good checkpoint, {self.last_checkpoint}, is untouched" if self.last_checkpoint \
                else "no checkpoint was written"
            shown = value.flatten()[~torch.isfinite(value.flatten())][0].item()
            raise TrainingError(f"step {self.pos.step + 1}: the {what} is {shown}; stopping ({kept})")

    def save(self) -> Path:
        state = {"position": {"step": self.pos.step, "epoch": self.pos.epoch, "consumed": self.pos.consumed,
                              "excluded": self.pos.excluded},
                 "skipped": sorted(self.skipped.values(), key=lambda b: b["index"]),
                 "init_model_path": self.init_model_path, "total_steps": self.total_steps,
                 "config": self.cfg.to_dict()}
        rng = distributed.all_gather_objects(self.dist, ckpt.rng_state())
        path = self.out / f"checkpoint-{self.pos.step}"
        names = [n for n, _ in self.trainable]
        optimizer = masters = None
        if self.dist.is_main or self.optimizer.sharded:  # shards are gathered by every rank, kept by rank 0
            optimizer = self.optimizer.state_dict(keep=self.dist.is_main)
            masters = self.optimizer.master_state(names, keep=self.dist.is_main)
        if self.dist.is_main:
            ckpt.save(self.out, self.pos.step, self.loaded, optimizer, masters, state, rng, self.cfg.save_total_limit)
            self.log.info(f"saved {path}")
        distributed.barrier(self.dist)  # no rank goes on (or stops) before the checkpoint is whole
        self.last_checkpoint = path
        return path
