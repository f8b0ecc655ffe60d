"""One GRPO optimizer step of the R1-Omni shape (B prompts x G=8 completions, towers included): omni_fast's
trainer path (OURS) against the reference trainer's mechanics composed from transformers classes (REFERENCE),
same weights, same run.

OURS: the trainer's step itself, omni_fast.grpo.step.grpo_step (grpo/trainer.py runs the same function):
  towers     grpo.step.clip_features: the towers once per clip (or the tower-feature store, below)
  rollout    prompt embeddings (no grad) + engine.Engine.generate (n=8, top_k 50, T=1, ignore_eos so every
             completion has exactly N tokens) + rewards + group advantages
  reference  the frozen initial weights sharing the towers, shared-prefix forward (no grad)
  policy     prompt embeddings with grad + completion_logprobs + grpo_loss + backward
  optimizer  the trainer's: gradient-norm clip + AdamW over fp32 masters (LLM, projectors, BERT, gate; towers frozen)
REFERENCE (humanOmni_grpo_trainer.py, docs/REFERENCE.md §7):
  towers     the towers once per clip for generate's prompt (the reference's generate encodes once)
  rollout    transformers' Qwen2ForCausalLM.generate(inputs_embeds=spliced prompt, do_sample, top_k 50,
             num_return_sequences=8, min_new_tokens = max_new_tokens = N) + rewards + advantages
  reference  the towers + projectors + BERT gate re-run on the 8x repeated inputs, a separate frozen HF LLM's
             full forward over cat(prompt x 8, completion), full logits, a per-row log_softmax + gather
             (_get_per_token_logps), under inference_mode
  policy     the same with grad through projectors / BERT / gate / LLM, the §5 loss, backward
  optimizer  torch.optim.AdamW step over the same parameter set
So the towers run 1 + 8 + 8 = 17 times per clip in the reference and once in ours; the prompt (~990
embeddings) goes through the LLM 8x per pass in the reference and once in ours.

OURS with the tower-feature store (omni_fast/features/, GRPOConfig.tower_cache_dir), same run, same step:
  store cold  every clip a miss: the towers run and their features are written to the store (each timed step
              starts from an emptied store), as in a run's first epoch
  store warm  every clip found: its entry is looked up, read and checked (counted in the towers phase here;
              in a run the loader's threads do it ahead, overlapped) and nothing is encoded, as in every later
              epoch, later stage and eval of the same clips
Projected hours with the store: the first epoch at the cold step's time, the second at the warm step's (a store
filled ahead by omni-fast cache-features makes both warm).

The towers are omni_fast's SigLIP / Whisper / projector modules in both paths (the work counted is how
often they run, not whose implementation). --quick runs the tiny checkpoint (omni_fast.testing) on the CPU:
it measures the algorithmic savings (towers once vs 17x, prompt once vs 8x), not the kernels. The full mode
(a GPU) takes --model_path, a HumanOmni / R1-Omni checkpoint directory; without one it builds random weights
of the real R1-Omni-0.5B shape in memory (omni_fast.testing.random_r1omni) and says so. Projected hours of
the recipe = seconds per prompt x 15,306 clips x 2 epochs / 3600 on one device of this kind (the recipe: 16
prompts per optimizer step, about 1,914 steps).
Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from common import emit
from omni_fast.config import EngineConfig, GRPOConfig, LoaderConfig
from omni_fast.distributed import DistContext
from omni_fast.engine.kv_cache import pool_bytes
from omni_fast.features.key import FeatureSettings
from omni_fast.features.store import FeatureStore
from omni_fast.features.towers import CachedTowers
from omni_fast.grpo.inputs import grpo_bert_inputs, grpo_prompt_ids
from omni_fast.grpo.rewards import compute_rewards
from omni_fast.grpo.step import build_context, check_config, grpo_step, train_dtype
from omni_fast.model.checkpoint import load_checkpoint
from omni_fast.task import EMOTION_LABELS, solution
from omni_fast.testing import make_tiny_checkpoint, random_r1omni, transformers_twin

PHASES = ("towers", "rollout", "reference", "policy", "optimizer")
CLIPS, EPOCHS, PROMPTS_PER_STEP = 15306, 2, 16
HOURS_FORMULA = "hours = (step_s / B) * 15306 clips * 2 epochs / 3600"


class Timer:
    """Wall seconds per phase (the device synchronised at both ends)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                _sync(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                _sync(timer.device)
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0
        return _Phase()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- OURS ------------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Prompt:
    label: str  # the clip's emotion, what the accuracy reward checks
    index: int  # its entry in an annotation file: keys the rollout seeds
    video: Path | None = None  # a file standing for the clip (its bytes key the tower-feature store)


class Ours:
    """The trainer's own step (grpo/step.py's grpo_step, as grpo/trainer.py runs it), on one process."""

    def __init__(self, loaded, b: int, cfg: GRPOConfig, device: torch.device, steps: int):
        check_config(cfg)
        reference = loaded.model.copy_sharing_towers()  # the frozen initial weights, as the trainer keeps them
        pool = 2 * pool_bytes(loaded.model.config, loaded.model.lm_head_weight.dtype, b * (1 + cfg.num_generations),
                              2048 + cfg.max_completion_length)  # prompts and completions, twice over
        self.ctx = build_context(cfg, loaded, DistContext(device=device), reference, steps,
                                 EngineConfig(max_num_seqs=b * cfg.num_generations, kv_cache_memory=pool,
                                              max_num_batched_tokens=b * 2048))
        self.ctx.ignore_eos = True  # every completion has exactly N tokens, as in the reference path

    def step(self, frames, mel, ids, bert, labels, step: int, phases: Timer) -> float:
        micro = [SimpleNamespace(frames=frames, mel=mel, records=[Prompt(l, i) for i, l in enumerate(labels)])]
        (metrics,) = grpo_step(self.ctx, micro, step, phases)
        assert metrics["completion_length"] == self.ctx.cfg.max_completion_length, metrics
        return metrics["loss"]


class OursStore(Ours):
    """The same step with the towers behind a tower-feature store: `warm` finds every clip there, else every
    timed step starts from an empty store."""

    def __init__(self, loaded, b: int, cfg: GRPOConfig, device: torch.device, steps: int, directory: Path,
                 warm: bool):
        super().__init__(loaded, b, cfg, device, steps)
        loader = LoaderConfig(aspect="pad", num_frames=loaded.config.num_frames,
                              n_mels=loaded.model.towers.audio.num_mel_bins)
        self.store = FeatureStore(directory, FeatureSettings.of(loaded.model, loader, device))
        self.ctx.towers = CachedTowers(loaded.model, self.store)
        self.warm, self.records = warm, []
        for i in range(b):  # files standing for the clips: what their entries are keyed by
            (directory / f"clip{i}.bin").write_bytes(f"clip {i}".encode())
            self.records.append(Prompt("", i, directory / f"clip{i}.bin"))

    def step(self, frames, mel, ids, bert, labels, step: int, phases: Timer) -> float:
        records = [dataclasses.replace(r, label=label) for r, label in zip(self.records, labels)]
        if not self.warm:
            shutil.rmtree(self.store.dir, ignore_errors=True)
            self.store.dir.mkdir()
        with phases("towers"):  # the loader's lookups (in a run: ahead, in its threads)
            found = [self.ctx.towers.lookup(r) for r in records]
        decoded = [i for i, entry in enumerate(found) if entry is None]
        rows = torch.tensor(decoded, dtype=torch.long, device=frames.device)
        micro = [SimpleNamespace(frames=frames[rows], mel=mel[rows], records=records, found=found)]
        (metrics,) = grpo_step(self.ctx, micro, step, phases)
        assert metrics["completion_length"] == self.ctx.cfg.max_completion_length, metrics
        assert self.ctx.towers.store.stats.corrupt == 0
        assert not (self.warm and step > 1 and decoded), "a warm step found a clip missing from the store"
        return metrics["loss"]


# --- REFERENCE -------------------------------------------------------------------------------------------------
class Reference:
    """The reference trainer's step: HF LLM (same weights), towers + projectors re-run per completion, the
    prompt repeated per completion, full logits and a per-row log_softmax loop."""

    def __init__(self, loaded, cfg: GRPOConfig, ref_tokens: int):
        # multimodal side (towers shared and frozen; projectors, BERT, gate trainable) + a transformers LLM
        self.mm = loaded.model.copy_sharing_towers()
        self.llm = transformers_twin(loaded.model)
        self.ref_mm = self.mm.copy_sharing_towers().requires_grad_(False).eval()
        self.ref_llm = copy.deepcopy(self.llm).requires_grad_(False).eval()
        self.mm.model.layers = torch.nn.ModuleList()  # the LLM lives in self.llm; drop the unused copy
        self.ref_mm.model.layers = torch.nn.ModuleList()
        for p in self.llm.parameters():
            p.requires_grad_(True)
        params = [p for n, p in self.mm.named_parameters()
                  if not n.startswith(("model.vision_tower.", "model.audio_tower.", "model.embed_tokens",
                                       "model.norm"))]
        self.optimizer = torch.optim.AdamW(list(self.llm.parameters()) + params, lr=1e-6)
        self.cfg, self.tokenizer, self.ref_tokens = cfg, loaded.tokenizer, ref_tokens
        self.eos = loaded.generation.eos_token_ids
        self.pad = loaded.generation.pad_token_id if loaded.generation.pad_token_id is not None else self.eos[0]

    def _embeds(self, mm, llm, ids, frames, mel, bert, rows_per_clip: int) -> torch.Tensor:
        """Towers + gate + projectors on inputs repeated rows_per_clip times, spliced: (B*rows, P, H)."""
        frames = frames.repeat_interleave(rows_per_clip, 0)
        mel = mel.repeat_interleave(rows_per_clip, 0)
        with torch.no_grad():  # frozen towers (the reference runs them inside the grad-enabled forward)
            vision, audio = mm.vision_features(frames), mm.audio_features(mel)
        bert_rows = {k: v.expand(frames.shape[0], -1) for k, v in bert.items()}
        weights = mm.gate_weights(bert_rows)
        video, aud = mm.project_video(vision, weights), mm.project_audio(audio)
        embed = llm.get_input_embeddings()
        text = embed(ids.clamp(min=0))
        rows = []
        for r in range(frames.shape[0]):  # prepare_inputs_labels_for_multimodal: splice per row
            pieces, start = [], 0
            for pos in torch.nonzero(ids < 0).flatten().tolist():
                pieces += [text[start:pos], video[r] if int(ids[pos]) == -201 else aud[r]]
                start = pos + 1
            rows.append(torch.cat(pieces + [text[start:]]))
        return torch.stack(rows)

    def _per_token_logps(self, llm, prompt_embeds, completions) -> torch.Tensor:
        """_get_per_token_logps on cat(prompt x G, completion): full logits, a per-row log_softmax + gather."""
        c = completions.shape[1]
        embeds = torch.cat((prompt_embeds, llm.get_input_embeddings()(completions)), dim=1)
        logits = llm(inputs_embeds=embeds).logits[:, :-1][:, -c:]
        out = []
        for logits_row, ids_row in zip(logits, completions):
            out.append(torch.gather(logits_row.log_softmax(dim=-1), 1, ids_row[:, None])[:, 0])
        return torch.stack(out)

    def step(self, frames, mel, ids, bert, labels, step: int, phases: Timer) -> float:
        cfg, g, n = self.cfg, self.cfg.num_generations, self.cfg.max_completion_length
        device = frames.device
        with phases("towers"):  # generate encodes each clip once
            with torch.no_grad():
                prompt = self._embeds(self.mm, self.llm, ids, frames, mel, bert, 1)
        with phases("rollout"):
            with torch.inference_mode():
                out = self.llm.generate(inputs_embeds=prompt, attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long,
                                                                                       device=device),
                                        do_sample=True, temperature=1.0, top_k=50, num_return_sequences=g,
                                        max_new_tokens=self.ref_tokens, min_new_tokens=self.ref_tokens,
                                        eos_token_id=list(self.eos), pad_token_id=self.pad)
            completions = out[:, -self.ref_tokens:].clone()
            if self.ref_tokens < n:  # fewer decode steps: the forward passes still see N tokens
                filler = torch.randint(0, self.llm.config.vocab_size, (completions.shape[0], n - self.ref_tokens),
                                       device=device)
                completions = torch.cat((completions, filler), dim=1)
            texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
            raw = compute_rewards(cfg.reward_funcs, texts, [solution(l) for l in labels for _ in range(g)])
            rewards = torch.tensor(list(raw.values()), dtype=torch.float32, device=device).sum(0)
            mean_g = rewards.view(-1, g).mean(1).repeat_interleave(g)
            std_g = rewards.view(-1, g).std(1).repeat_interleave(g)
            advantages = (rewards - mean_g) / (std_g + 1e-4)
            is_eos = completions == self.eos[0]  # the reference's mask: up to the first <|im_end|>, included
            first = torch.full((is_eos.shape[0],), n, dtype=torch.long, device=device)
            hit = is_eos.any(1)
            first[hit] = is_eos.int().argmax(1)[hit]
            mask = (torch.arange(n, device=device)[None] <= first[:, None]).int()
        with phases("reference"):
            with torch.inference_mode():
                ref_embeds = self._embeds(self.ref_mm, self.ref_llm, ids, frames, mel, bert, g)
                ref_logp = self._per_token_logps(self.ref_llm, ref_embeds, completions)
            ref_logp = ref_logp.clone()
        with phases("policy"):
            embeds = self._embeds(self.mm, self.llm, ids, frames, mel, bert, g)
            logp = self._per_token_logps(self.llm, embeds, completions)
            kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
            per_token = -(torch.exp(logp - logp.detach()) * advantages[:, None] - cfg.beta * kl)
            loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
            loss.backward()
        with phases("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# --- the run ---------------------------------------------------------------------------------------------------
def measure(path, args, device, inputs, reps: int) -> dict:
    """One warm-up step, then `reps` timed steps: median seconds per phase, the peak memory of a step."""
    runs = []
    for i in range(1 + reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start_bytes = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        phases = Timer(device)
        path.step(*inputs, step=i + 1, phases=phases)
        if i:
            runs.append(phases.times)
    phase_s = {p: statistics.median(r.get(p, 0.0) for r in runs) for p in PHASES}
    step_s = sum(phase_s.values())
    memory = None
    if device.type == "cuda":
        memory = {"peak_bytes": torch.cuda.max_memory_allocated(),
                  "peak_over_step_start_bytes": torch.cuda.max_memory_allocated() - start_bytes}
    b = inputs[0].shape[0]
    hours = step_s / b * CLIPS * EPOCHS / 3600
    return {"phase_s": phase_s, "step_s": step_s, "s_per_prompt": step_s / b, "peak_memory": memory,
            "projected_recipe_hours": hours}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny checkpoint on the CPU (algorithmic savings only)")
    ap.add_argument("--model_path", default=None, help="HumanOmni / R1-Omni checkpoint directory (full mode)")
    ap.add_argument("--prompts", type=int, default=None, help="B, prompts per step (default: 2 quick, 1 full)")
    ap.add_argument("--completion_length", type=int, default=None, help="N (default: 8 quick, 256 full)")
    ap.add_argument("--ref_tokens", type=int, default=None,
                    help="decode steps of HF generate (default N); fewer: its rollout time is scaled by N/ref_tokens")
    ap.add_argument("--reps", type=int, default=None, help="timed steps after one warm-up (default: 2 quick, 3 full)")
    ap.add_argument("--store_dir", default=None, help="where the tower-feature store rows keep their stores "
                    "(default: a temporary folder)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    b = args.prompts or (2 if args.quick else 1)
    n = args.completion_length or (8 if args.quick else 256)
    ref_tokens = min(args.ref_tokens or n, n)
    reps = args.reps or (2 if args.quick else 3)
    notes = []
    if args.quick:
        notes.append("--quick: tiny checkpoint on the CPU; measures the algorithmic savings (towers once vs 17x, "
                     "prompt once vs 8x), not the kernels")
    tmp = None
    # the trainer's settings but a constant learning rate (the reference path's AdamW has no schedule)
    cfg = GRPOConfig(num_generations=8, max_completion_length=n, lr_scheduler_type="constant")
    dtype = train_dtype(cfg, device)
    if args.model_path is not None:
        loaded = load_checkpoint(args.model_path, device=device, dtype=dtype)
    else:
        tmp = tempfile.TemporaryDirectory()
        tiny = make_tiny_checkpoint(tmp.name)
        if args.quick:
            loaded = load_checkpoint(tiny, device=device, dtype=dtype)
        else:
            loaded = random_r1omni(tiny, device, dtype)
            notes.append("no --model_path: random weights of the real R1-Omni-0.5B shape (omni_fast.testing."
                         "random_r1omni: Qwen2.5-0.5B, SigLIP-base, Whisper-large-v3, bert-base)")
    torch.manual_seed(0)
    x_start_end = loaded.config.mm_use_x_start_end
    ids = torch.tensor(grpo_prompt_ids(loaded.tokenizer, cfg.max_prompt_length, cfg.prompt_template, x_start_end),
                       device=device)
    bert = grpo_bert_inputs(loaded.model, loaded.bert_tokenizer, cfg.prompt_template, x_start_end)
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(b, loaded.config.num_frames, 3, 224, 224, generator=g).to(device, dtype)
    mel = torch.randn(b, 128, 3000, generator=g).mul_(0.5).to(device, dtype)
    labels = [EMOTION_LABELS[i % len(EMOTION_LABELS)] for i in range(b)]
    inputs = (frames, mel, ids, bert, labels)

    reference = Reference(loaded, cfg, ref_tokens)  # built before Ours touches requires_grad / the weights
    ours = Ours(loaded, b, cfg, device, steps=1 + reps)
    r_ours = measure(ours, args, device, inputs, reps)
    del ours
    with tempfile.TemporaryDirectory(prefix="bench_grpo_step-store-", dir=args.store_dir) as store_dir:
        r_store = {}
        for name in ("cold", "warm"):
            with_store = OursStore(loaded, b, cfg, device, 1 + reps, Path(store_dir) / name, warm=name == "warm")
            r_store[name] = measure(with_store, args, device, inputs, min(reps, 2))  # (gpu_check's time limit)
            del with_store
    r_ref = measure(reference, args, device, inputs, reps)
    if ref_tokens < n:
        r_ref["phase_s"]["rollout"] *= n / ref_tokens
        r_ref["step_s"] = sum(r_ref["phase_s"].values())
        r_ref["s_per_prompt"] = r_ref["step_s"] / b
        r_ref["projected_recipe_hours"] = r_ref["s_per_prompt"] * CLIPS * EPOCHS / 3600
        notes.append(f"reference rollout: HF generate ran {ref_tokens} of {n} decode steps (the forward passes saw "
                     f"{n} tokens); its rollout time is scaled by {n}/{ref_tokens} (prefill included: an overestimate)")
    ratio = r_ref["step_s"] / r_ours["step_s"]
    prompt_len = int((ids >= 0).sum()) + loaded.model.num_video_tokens + loaded.model.num_audio_tokens
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    kind = "CPU, tiny checkpoint: algorithmic savings, not kernels" if device.type == "cpu" else device_name
    print(f"GRPO step, B={b} prompts x G=8, N={n} completion tokens, prompt {prompt_len} embeddings ({kind})")
    for note in notes:
        print("note:", note)
    rows = [[p, r_ours["phase_s"][p], r_ref["phase_s"][p], r_ref["phase_s"][p] / max(r_ours["phase_s"][p], 1e-12)]
            for p in PHASES]
    rows.append(["step", r_ours["step_s"], r_ref["step_s"], ratio])
    rows.append(["recipe hours", r_ours["projected_recipe_hours"], r_ref["projected_recipe_hours"], ratio])
    steps = math.ceil(CLIPS / PROMPTS_PER_STEP) * EPOCHS
    print(f"projected recipe: {HOURS_FORMULA} (15,306 x 2 / 16 = {steps} optimizer steps of 16 prompts)")
    store_hours = (r_store["cold"]["s_per_prompt"] + (EPOCHS - 1) * r_store["warm"]["s_per_prompt"]) * CLIPS / 3600
    print(f"with the tower-feature store (same run): step {r_store['cold']['step_s']:.4g} s cold, "
          f"{r_store['warm']['step_s']:.4g} s warm (towers {r_store['cold']['phase_s']['towers']:.4g} -> "
          f"{r_store['warm']['phase_s']['towers']:.4g} s); recipe hours {r_ours['projected_recipe_hours']:.4g} "
          f"without, {store_hours:.4g} with (epoch 1 cold, epoch 2 warm), "
          f"{r_store['warm']['projected_recipe_hours']:.4g} on a store filled ahead")
    if device.type == "cuda":
        print(f"peak memory (GiB): ours {r_ours['peak_memory']['peak_bytes'] / 2**30:.2f}, "
              f"reference {r_ref['peak_memory']['peak_bytes'] / 2**30:.2f}")
    result = emit("grpo_step", ["phase", "ours s", "reference s", "ref/ours"], rows, {
        "device": device_name, "dtype": str(dtype), "quick": args.quick,
        "model": str(args.model_path) if args.model_path else
        "tiny (omni_fast.testing.make_tiny_checkpoint)" if args.quick else "random R1-Omni-0.5B shape",
        "prompts": b, "num_generations": 8, "completion_length": n, "ref_decode_tokens": ref_tokens,
        "prompt_embeddings": prompt_len,
        "ours": r_ours, "reference": r_ref, "ratio": ratio,
        "ours_store": {**r_store, "projected_recipe_hours": store_hours,
                       "formula": "(cold s/prompt + (epochs - 1) x warm s/prompt) x 15306 clips / 3600"},
        "projected_hours_formula": HOURS_FORMULA, "recipe_optimizer_steps": steps, "notes": notes,
        "rows": [{"phase": p, "ours_s": r_ours["phase_s"][p], "reference_s": r_ref["phase_s"][p]} for p in PHASES],
    }, args.out)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
