"""generate(): prefill each prompt once, fork its n samples onto the shared prefix, decode them together.

Rows that finish stop costing work at the next host check (every `sync_every` steps, the only per-step
synchronisation besides none at all): the active set is compacted then, and until then finished rows still
run but nothing of theirs is recorded.
"""
from __future__ import annotations

import torch

from omni_fast.config import ConfigError, EngineConfig, SamplingParams
from omni_fast.engine.model_runner import DecodeInputs, ModelRunner
from omni_fast.engine.sampler import Sampler
from omni_fast.engine.sequence import Completion, SampleRows
from omni_fast.model.qwen2 import Qwen2LM


class Engine:
    def __init__(self, model: Qwen2LM, config: EngineConfig | None = None,
                 stop_token_ids: tuple[int, ...] | None = None):
        self.config = config or EngineConfig()
        self.model = model
        self.runner = ModelRunner(model, self.config)
        self.default_stop = tuple(stop_token_ids) if stop_token_ids else (model.config.eos_token_id,)

    @torch.inference_mode()
    def generate(self, prompts: list[torch.Tensor], params: SamplingParams | list[SamplingParams]) -> list[list[Completion]]:
        """prompts: embeddings (T_i, hidden) each; params: one for all or one per prompt -> per prompt, its n
        completions."""
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"generate: {len(prompts)} prompts but {len(params)} SamplingParams")
        hidden = self.model.config.hidden_size
        for i, p in enumerate(prompts):
            if p.dim() != 2 or p.shape[1] != hidden or p.shape[0] < 1:
                raise ValueError(f"generate: prompt {i} has shape {tuple(p.shape)}; expected (T >= 1, {hidden})")
        for sp in params:
            if sp.n > self.config.max_samples:
                raise ConfigError(f"SamplingParams.n = {sp.n} exceeds EngineConfig.max_samples = {self.config.max_samples}")
        seeds = [sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, ()).item()) for sp in params]
        out: list[list[Completion]] = []
        for lo, hi in self._batches(params):
            out.extend(self._generate_batch(prompts[lo:hi], params[lo:hi], seeds[lo:hi]))
        return out

    def _batches(self, params: list[SamplingParams]) -> list[tuple[int, int]]:
        spans, lo, rows = [], 0, 0
        for i, sp in enumerate(params):
            if i > lo and (i - lo >= self.config.max_prompts or rows + sp.n > self.config.max_samples):
                spans.append((lo, i))
                lo, rows = i, 0
            rows += sp.n
        return spans + [(lo, len(params))]

    def _generate_batch(self, prompts, params, seeds) -> list[list[Completion]]:
        device = self.runner.device
        rows = SampleRows.build(params, self.default_stop, device, seeds)
        num_rows, max_len = len(rows), rows.max_len
        lens = torch.tensor([p.shape[0] for p in prompts], device=device)
        self.runner.reserve(len(prompts), max(p.shape[0] for p in prompts), num_rows, max_len)
        sampler = Sampler(rows, self.model.config.vocab_size)
        out_tokens = torch.full((num_rows, max_len), -1, dtype=torch.int64, device=device)
        out_logprobs = torch.zeros(num_rows, max_len, dtype=torch.float32, device=device)
        done = torch.zeros(num_rows, dtype=torch.bool, device=device)
        active = torch.arange(num_rows, device=device)

        logits = self.runner.prefill([p.to(self.runner.cache.dtype) for p in prompts])[rows.groups]  # (S, V)
        tokens = self._record(sampler, logits, active, rows, 0, out_tokens, out_logprobs, done)
        current, first_pos = rows, lens[rows.groups] - 1  # per active row; re-gathered only when the set shrinks
        for step in range(1, max_len):
            if step % self.config.sync_every == 0:
                keep = ~done[active]
                if not bool(keep.any()):
                    break
                if not bool(keep.all()):
                    active, tokens = active[keep], tokens[keep]
                    current, first_pos = rows.select(active), first_pos[keep]
            write_pos = torch.full_like(active, step - 1)
            logits = self.runner.decode(DecodeInputs(tokens, first_pos + step, active, current.groups, write_pos))
            tokens = self._record(sampler, logits, active, current, step, out_tokens, out_logprobs, done)
        return self._completions(rows, out_tokens.cpu(), out_logprobs.cpu(), len(prompts))

    @staticmethod
    def _record(sampler, logits, active, rows, step, out_tokens, out_logprobs, done) -> torch.Tensor:
        """Sample step `step` for `active` (parameters `rows`); store it for rows still running and mark the
        rows it ends."""
        tokens, logprobs = sampler(logits, active, rows, step)
        live = ~done[active]
        out_tokens[active, step] = torch.where(live, tokens, -1)
        out_logprobs[active, step] = torch.where(live, logprobs, 0.0)
        stop = (tokens[:, None] == rows.stop_ids).any(dim=1) | (step + 1 >= rows.max_tokens)
        done[active] = done[active] | (live & stop)
        return tokens

    @staticmethod
    def _completions(rows: SampleRows, tokens: torch.Tensor, logprobs: torch.Tensor, num_prompts: int):
        out: list[list[Completion]] = [[] for _ in range(num_prompts)]
        stop_sets = [set(s) - {-1} for s in rows.stop_ids.tolist()]
        for r, g in enumerate(rows.groups.tolist()):
            n = int((tokens[r] >= 0).sum())
            ids = tokens[r, :n].tolist()
            reason = "stop" if ids and ids[-1] in stop_sets[r] else "length"
            out[g].append(Completion(token_ids=ids, logprobs=logprobs[r, :n].clone(), finish_reason=reason))
        return out
