"""The R1-Omni trainer: GRPO with verifiable rewards, and the cold-start SFT stage, on one process or on every
rank of a torchrun job (omni_fast/distributed.py: data parallel, each rank with its own rollout engine; with
`parallelism: fsdp` the trained and reference models are sharded by FSDP2, grpo/fsdp.py).

    trainer = Trainer(GRPOConfig(model_path=..., train_annotations=..., output_dir=...))
    trainer.train()                        # or: omni-fast train --config run.yaml

The trainer is the loop around the step: the data (annotations, bad entries, each epoch's order, this rank's
share of each step's prompts, decoded ahead by the MediaLoader with pad-to-square frames, as the reference
trains), checkpoints and resume, metrics. One optimizer step (per_device_train_batch_size x
gradient_accumulation_steps prompts per rank) is grpo/step.py's `grpo_step` (or `sft_step`), the function
benchmarks/bench_grpo_step.py times as well.

Where it departs from the reference trainer (humanOmni_grpo_trainer.py), and why, is docs/REFERENCE.md §8:
the towers once per clip, each prompt once per group, BERT's dropout off, the mask up to each completion's own
stop token, any per-device batch size, rollout seeds keyed by (seed, step, prompt index), bad entries skipped.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni_fast import distributed
from omni_fast.config import GRPOConfig, LoaderConfig
from omni_fast.data import BadEntry, check_records, load_annotations, missing_clips_hint
from omni_fast.devices import resolve_device
from omni_fast.diskerrors import describe
from omni_fast.features.key import FeatureSettings
from omni_fast.features.store import FeatureStore, StoreUnwritable
from omni_fast.grpo import checkpoints
from omni_fast.grpo.metrics import MetricsLog, Phases, make_logger
from omni_fast.grpo.resume import check_resume
from omni_fast.grpo.rewards import RewardError
from omni_fast.grpo.rundir import RunDir
from omni_fast.grpo.step import (StepContext, build_context, check_config, grpo_prompt, grpo_step, sft_step,
                                 train_dtype)
from omni_fast.interrupt import StopRequests
from omni_fast.media.loader import MediaLoader
from omni_fast.media.pyav import MediaError
from omni_fast.model.checkpoint import load_checkpoint

SHOWN_BAD_ENTRIES = 5  # bad entries named on stderr one by one at the start (train.log lists every one)


class TrainingError(RuntimeError):
    """Training cannot go on (a bad entry with on_bad_clip="raise", a NaN); the message says where."""


@dataclass(slots=True)
class Position:
    """Where the run is: what resume restores besides weights, optimizer and RNG states."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the data
    consumed: int = 0  # records of this epoch's order already used
    excluded: list[int] = field(default_factory=list)  # entries left out of this epoch's order (bad so far)


class Trainer:
    def __init__(self, config: GRPOConfig, resume_from_checkpoint: str | None = None, on_step=None):
        """Checks, then claims output_dir (RunDir: created, locked against a second run) and starts: the model,
        the data, the resume. A start that fails leaves output_dir as it found it and releases it."""
        if config.model_path is None or config.train_annotations is None:
            raise TrainingError("model_path and train_annotations must be set (in the config file or as "
                                "--model_path / --train_annotations)")
        check_config(config)  # what the config cannot check without importing grpo/: before anything is loaded
        if config.device is not None:
            resolve_device(config.device)  # "cuda" without a GPU is an error, never a silent CPU run
        self.dist = distributed.init(config.device)  # torchrun's environment, or one process
        self.out = Path(config.output_dir).expanduser()
        self.run_dir = RunDir(self.out, self.dist.is_main).claim()
        try:
            self._start(config, resume_from_checkpoint, on_step)
        except BaseException:
            self.run_dir.abandon(getattr(self, "log", None))
            raise

    def _start(self, config: GRPOConfig, resume_from_checkpoint: str | None, on_step) -> None:
        self.cfg = cfg = config
        self.on_step = on_step  # called with each step's metrics (the demo prints its reward curve)
        self.history: list[dict] = []
        self.stop_signal = 0  # the signal that asked the run to stop (interrupt.StopRequests), 0: none
        self._stop = StopRequests()  # entered by train()
        resume = checkpoints.resolve(self.out, resume_from_checkpoint) if resume_from_checkpoint else None
        if resume is None and checkpoints.complete(self.out):
            raise TrainingError(f"{self.out} already holds checkpoints; pass --resume_from_checkpoint latest to "
                                "continue that run, or choose another output_dir (nothing was overwritten)")
        state = checkpoints.load_trainer_state(resume) if resume else {}
        changes = check_resume(cfg, resume, state, self.out, self.dist.world_size) if resume else []
        distributed.barrier(self.dist)  # every rank has looked before rank 0 tidies up
        if self.dist.is_main:
            checkpoints.clean_partial(self.out)
        self.log = make_logger(self.out, self.dist.rank)
        self.init_model_path = state.get("init_model_path", str(Path(cfg.model_path).expanduser().resolve()))
        self.device = self.dist.device
        whole = resume if resume and not cfg.use_peft else None  # a LoRA checkpoint holds the adapter only
        self.loaded = load_checkpoint(whole or self.init_model_path, bert_path=None if whole else cfg.bert_path,
                                      device=self.device, dtype=train_dtype(cfg, self.device))
        self.loaded.model.eval()  # no dropout anywhere (docs/REFERENCE.md §8)
        reference = self._reference(resume) if cfg.stage == "grpo" and cfg.beta > 0 and not cfg.use_peft else None
        self.records, self.skipped = self._records(state)
        self.step_prompts = cfg.prompts_per_step * self.dist.world_size  # the global batch of one step
        rollouts_per_epoch = math.ceil(len(self.records) / self.step_prompts)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else rollouts_per_epoch * cfg.num_train_epochs \
            * cfg.num_iterations
        self.ctx: StepContext = build_context(cfg, self.loaded, self.dist, reference, self.total_steps, log=self.log,
                                              store=self._store(), adapter=resume if cfg.use_peft else None)
        self.ctx.check_finite = self._check_finite
        if cfg.stage == "grpo":
            grpo_prompt(self.ctx)  # a max_prompt_length that cuts the placeholders is refused here, before training
        self.pos = Position(**state["position"]) if resume else Position()
        if resume:
            saved_world = checkpoints.restore(resume, self.optimizer, [n for n, _ in self.trainable],
                                              self.dist.rank, self.dist.world_size)
            self.optimizer.rebase_schedule(cfg.learning_rate)  # this config's schedule (RESUME_RULES)
            self.log.info(f"resumed from {resume} at step {self.pos.step}")
            if saved_world != self.dist.world_size:
                self.log.warning(f"resuming a run saved by {saved_world} process(es) with {self.dist.world_size}: "
                                 f"the global batch is now {self.step_prompts} prompts a step and the RNG states "
                                 "are rank 0's, so the run continues but does not repeat the original exactly")
        else:
            torch.manual_seed(cfg.seed)
        self.last_checkpoint = resume
        for line in changes:  # only once the start has succeeded: train.log records what the run uses
            self.log.info(line)
        self.log.info(f"config: {cfg.to_dict()}")

    # --- what the step context holds, under the names callers use ---------------------------------------------
    model = property(lambda self: self.ctx.trained, doc="the model the optimizer updates (the rollout model, or "
                                                        "its FSDP2-sharded copy)")
    rollout_model = property(lambda self: self.ctx.rollout_model, doc="full weights: towers, engine, checkpoints")
    reference = property(lambda self: self.ctx.reference, doc="the frozen initial weights (None: beta 0, SFT, LoRA)")
    trainable = property(lambda self: self.ctx.trainable, doc="(name, parameter) pairs the optimizer steps")
    optimizer = property(lambda self: self.ctx.optimizer)
    engine = property(lambda self: self.ctx.engine)
    tokenizer = property(lambda self: self.ctx.tokenizer)
    bert_tokenizer = property(lambda self: self.ctx.bert_tokenizer)

    # --- setup ---------------------------------------------------------------------------------------------
    def _reference(self, resume: Path | None):
        """A frozen copy of the initial weights sharing the policy's (frozen) towers."""
        model = self.loaded.model
        if resume is None:
            ref = model.copy_sharing_towers()
        else:  # the initial weights are the run's model_path, not the checkpoint being resumed
            ref = load_checkpoint(self.init_model_path, bert_path=self.cfg.bert_path, device=self.device,
                                  dtype=next(model.parameters()).dtype).model
            ref.model.vision_tower, ref.model.audio_tower = model.model.vision_tower, model.model.audio_tower
        return ref.requires_grad_(False).eval()

    def _records(self, state: dict):
        bad: list[BadEntry] = []
        records = load_annotations(self.cfg.train_annotations, self.cfg.video_root, errors=bad)
        good, unusable = check_records(records, self.cfg.label_set, need_target=self.cfg.stage == "sft")
        skipped = {b["index"]: b for b in state.get("skipped", [])}
        every = sorted(bad + unusable, key=lambda b: b.index)
        for i, b in enumerate(every):  # on stderr the first few, in train.log all of them
            self._bad(b.index, b.path, b.reason, skipped, shown=i < SHOWN_BAD_ENTRIES)
        cause = missing_clips_hint(every, len(records) + len(bad), self.cfg.video_root, self.cfg.train_annotations)
        if not good:
            raise TrainingError(f"{self.cfg.train_annotations}: no usable entry ({len(skipped)} skipped)"
                                + (f"; {cause}" if cause else ""))
        if len(every) > SHOWN_BAD_ENTRIES or cause:
            self.log.warning(f"{len(every)} of {len(records) + len(bad)} entries skipped (all listed in train.log)"
                             + (f"; {cause}" if cause else ""))
        return good, skipped

    def _bad(self, index: int, path: str, reason: str, skipped: dict | None = None, shown: bool = True) -> None:
        message = f"entry {index} ({path}): {reason}"
        if self.cfg.on_bad_clip == "raise":
            raise TrainingError(f"{self.cfg.train_annotations}: {message}")
        skipped = self.skipped if skipped is None else skipped
        if index not in skipped:
            (self.log.warning if shown else self.log.info)(f"skipping {message}")
            skipped[index] = {"index": index, "path": path, "reason": reason}

    # --- the loop ------------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """The run has done its total_steps (a resumed one may have nothing left to do)."""
        return self.pos.step >= self.total_steps

    def train(self) -> list[dict]:
        """Run to total_steps; returns the logged metrics. Saves every save_steps and at the end. A SIGINT or
        SIGTERM ends the run after the step in flight, with a checkpoint (stop_signal says which; a second
        signal stops at once). Releases output_dir at the end."""
        history, start = self.history, self.pos.step
        try:
            if self.complete:
                self.log.warning(f"the run is complete: {self.last_checkpoint} is at step {self.pos.step} of "
                                 f"{self.total_steps}; nothing to train (raise max_steps or num_train_epochs to "
                                 "go on)")
                return history
            metrics_log = MetricsLog(self.out, self.total_steps, self.pos.step, self.cfg.progress) \
                if self.dist.is_main else None
            try:
                with StopRequests("stopping after the step in flight, with a checkpoint") as self._stop:
                    while self.pos.step < self.total_steps and not self.stop_signal:
                        if not self._epoch(metrics_log, history):
                            break
                    if self.pos.step > start and (self.last_checkpoint is None or
                                                  self.last_checkpoint.name != f"checkpoint-{self.pos.step}"):
                        self.save()
            finally:
                if metrics_log is not None:
                    metrics_log.close()
        finally:
            self.run_dir.release()
        return history

    def _epoch_order(self) -> list:
        seeded = torch.Generator().manual_seed(self.cfg.seed + self.pos.epoch)
        order = torch.randperm(len(self.records), generator=seeded)
        excluded = set(self.pos.excluded)
        return [self.records[i] for i in order.tolist() if self.records[i].index not in excluded]

    def _loader_config(self) -> LoaderConfig:
        """How this rank's clips are decoded: pad-to-square frames, as the reference trains."""
        cfg = self.cfg
        return LoaderConfig(batch_size=cfg.per_device_train_batch_size, backend=cfg.media_backend,
                            workers=cfg.media_workers, prefetch=2, on_error=cfg.on_bad_clip, aspect="pad",
                            num_frames=self.loaded.config.num_frames,
                            n_mels=self.loaded.model.towers.audio.num_mel_bins)

    def _store(self) -> FeatureStore | None:
        """The tower-feature store of tower_cache_dir (every rank reads it and writes the clips it computed), or
        None: none configured, or one that cannot be written at all (a warning, then the run goes on)."""
        if self.cfg.tower_cache_dir is None:
            return None
        settings = FeatureSettings.of(self.loaded.model, self._loader_config(), self.device)
        try:
            return FeatureStore(self.cfg.tower_cache_dir, settings)
        except StoreUnwritable as e:
            self.log.warning(f"{e}; training goes on without the tower-feature store")
            return None

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
        loader = MediaLoader(mine, self._loader_config(), device=self.device, lookup=self.ctx.towers.lookup)
        with contextlib.closing(iter(loader)) as batches:
            def draw():
                """This rank's share of the next step's prompts (None: the epoch has no more), consumed."""
                if self.pos.consumed >= len(order):
                    return None
                micro = self._next_batches(batches, mine, phases)
                self.pos.consumed = min(len(order), self.pos.consumed + self.step_prompts)
                self._share_skipped()
                return micro

            while self.pos.step < self.total_steps and self.pos.consumed < len(order) and not self.stop_signal:
                phases, t0 = Phases(), time.perf_counter()
                micro = draw()
                if not int(distributed.all_reduce_sum(self.dist, torch.tensor([sum(len(b) for b in micro)]))):
                    continue  # every clip of this step was bad, on every rank
                before, cache = (self.ctx.towers.hits, self.ctx.towers.misses), None
                for metrics in self._run_step(micro, phases, draw):
                    cache = self._cache_counts(before) if cache is None else cache  # the towers ran by now
                    metrics.update(epoch=self.pos.epoch + self.pos.consumed / len(order),
                                   skipped_clips=len(self.skipped), **phases.as_metrics(), **cache)
                    metrics["tokens_per_s"] = metrics.pop("_tokens") / max(time.perf_counter() - t0, 1e-9)
                    if metrics.get("groups", self.step_prompts) < self.step_prompts:
                        self.log.info(f"step {self.pos.step + 1}: dynamic sampling found {metrics['groups']} of "
                                      f"{self.step_prompts} groups with varied rewards in "
                                      f"{metrics['num_gen_batches']} batch(es) of prompts; training on those")
                    self._after_step(metrics, metrics_log, history)
        return True

    def _run_step(self, micro: list, phases: Phases, draw):
        """The stage's step (its metrics per optimizer step; `draw` gives dynamic sampling more prompts); a reward
        function that raises names the step."""
        try:
            if self.cfg.stage == "grpo":
                yield from grpo_step(self.ctx, micro, self.pos.step + 1, phases, draw)
            else:
                yield from sft_step(self.ctx, micro, phases, pad_record=self.records[0])
        except RewardError as e:
            self.optimizer.zero_grad()
            raise TrainingError(f"step {self.pos.step + 1}: {e}; stopping ({self._kept()})") from None

    def _cache_counts(self, before: tuple[int, int]) -> dict[str, int]:
        """With a tower-feature store: the clips of the step read from it and computed by the towers since
        `before` (the towers' counts then), over all ranks."""
        if self.ctx.towers.store is None:
            return {}
        mine = torch.tensor([self.ctx.towers.hits - before[0], self.ctx.towers.misses - before[1]])
        hits, misses = distributed.all_reduce_sum(self.dist, mine).tolist()
        return {"tower_cache/hits": int(hits), "tower_cache/misses": int(misses)}

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
        self.stop_signal = distributed.all_reduce_max(self.dist, self._stop.signum or 0)  # every rank stops together
        if self.pos.step % self.cfg.save_steps == 0 or self.stop_signal:
            self.save()

    # --- stopping and saving ----------------------------------------------------------------------------------
    def _adapter_settings(self) -> dict | None:
        """What checkpoints.save writes in the adapter's config (use_peft), else None (the whole model is saved)."""
        cfg = self.cfg
        return dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target_modules,
                    base_model=self.init_model_path) if cfg.use_peft else None

    def _kept(self) -> str:
        return f"the last good checkpoint, {self.last_checkpoint}, is untouched" if self.last_checkpoint \
            else "no checkpoint was written"

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        if not bool(torch.isfinite(value).all()):
            self.optimizer.zero_grad()
            shown = value.flatten()[~torch.isfinite(value.flatten())][0].item()
            raise TrainingError(f"step {self.pos.step + 1}: the {what} is {shown}; stopping ({self._kept()})")

    def save(self) -> Path:
        """checkpoint-<step> (every rank calls it); refused when the weights or the optimizer state hold inf/NaN,
        and one line naming the checkpoint when the disk refuses it (the last good checkpoint stays whole)."""
        bad = checkpoints.nonfinite(self.trainable, self.optimizer, self.dist)
        if bad:
            raise TrainingError(f"step {self.pos.step}: {bad} hold inf/NaN after the optimizer step; "
                                f"checkpoint-{self.pos.step} was not written ({self._kept()})")
        state = {"position": {"step": self.pos.step, "epoch": self.pos.epoch, "consumed": self.pos.consumed,
                              "excluded": self.pos.excluded},
                 "skipped": sorted(self.skipped.values(), key=lambda b: b["index"]),
                 "init_model_path": self.init_model_path, "total_steps": self.total_steps,
                 "world_size": self.dist.world_size,
                 "config": self.cfg.to_dict()}
        rng = distributed.all_gather_objects(self.dist, checkpoints.rng_state())
        path = self.out / f"checkpoint-{self.pos.step}"
        names = [n for n, _ in self.trainable]
        optimizer = masters = None
        if self.dist.is_main or self.optimizer.sharded:  # shards are gathered by every rank, kept by rank 0
            optimizer = self.optimizer.state_dict(keep=self.dist.is_main)
            masters = self.optimizer.master_state(names, keep=self.dist.is_main)
        if self.dist.is_main:
            try:
                checkpoints.save(self.out, self.pos.step, self.loaded, optimizer, masters, state, rng,
                                 self.cfg.save_total_limit, adapter=self._adapter_settings())
            except OSError as e:
                raise TrainingError(f"step {self.pos.step}: cannot save {describe(e, path)}; "
                                    f"{self._kept()}") from None
            self.log.info(f"saved {path}")
        distributed.barrier(self.dist)  # no rank goes on (or stops) before the checkpoint is whole
        self.last_checkpoint = path
        return path
