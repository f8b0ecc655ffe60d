"""The engine: requests join and leave a running batch at every step (continuous batching, vLLM's API shape).

    engine.add_request("a", prompt_embeds, SamplingParams(n=8, seed=1), cache_key="clip-hash/question")
    while engine.has_unfinished_requests():
        for out in engine.step():          # one scheduling round, one token per running sample
            print(out.request_id, out.new_token_ids, out.finished)

A step (scheduler.py decides what runs): prefill this step's chunks (new prompts, continuing long prompts,
preempted requests' recomputation) in one packed forward, then one decode forward for every running row, then
one sampling call over both - the first tokens of the prompts whose prefill completed (or whose prefix was a
cache hit) and the next token of every running sample. A request leaves the step its last sample stops, and
its KV is free for the next admission. Each sample draws with its own seed (row_seed of the request's seed)
at its own token index, so a seeded request gets the same tokens whatever runs beside it and whenever it
joins. `generate()` is a loop over these calls.
"""
from __future__ import annotations

import itertools

import torch

from omni_fast.config import ConfigError, EngineConfig, SamplingParams
from omni_fast.engine.block_manager import BlockAllocator, BlockTables, PrefixCache
from omni_fast.engine.model_runner import ModelRunner
from omni_fast.engine.sampler import Sampler, batch_filters
from omni_fast.engine.scheduler import Scheduler, StepPlan, blocks_for
from omni_fast.engine.sequence import Completion, Request, RequestOutput, Sample, Status, row_seed
from omni_fast.model.qwen2 import Qwen2LM


class Engine:
    def __init__(self, model: Qwen2LM, config: EngineConfig | None = None,
                 stop_token_ids: tuple[int, ...] | None = None):
        self.config = config or EngineConfig()
        self.model = model
        self.runner = ModelRunner(model, self.config)
        pool = self.runner.pool
        self.allocator = BlockAllocator(pool.num_blocks)
        self.prefix_cache = PrefixCache(self.allocator)
        self.tables = BlockTables(self.config.max_num_seqs, self.runner.width, pool.pad_block)
        self.scheduler = Scheduler(self.config, self.allocator, self.prefix_cache, self.tables)
        self.sampler = Sampler(self.config.max_num_seqs, model.config.vocab_size, pool.device)
        self.default_stop = tuple(stop_token_ids) if stop_token_ids else (model.config.eos_token_id,)
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()

    # --- the request API ---------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: torch.Tensor, params: SamplingParams,
                    cache_key: str | None = None) -> None:
        """Queue a request: prompt embeddings (T, hidden), its sampling parameters, and optionally a key naming
        the prompt (a request with the same key and prompt reuses its KV while it is in the pool)."""
        self._check(request_id, prompt, params)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        stop = () if params.ignore_eos else (params.stop_token_ids if params.stop_token_ids is not None
                                             else self.default_stop)
        samples = [Sample(index=j, seed=row_seed(seed, j)) for j in range(params.n)]
        req = Request(request_id, prompt, params, frozenset(stop), cache_key, next(self._arrivals), samples)
        self.requests[request_id] = req
        self.runner.note_prompt(prompt.shape[0])
        self.scheduler.waiting.append(req)

    def _check(self, request_id: str, prompt: torch.Tensor, params: SamplingParams) -> None:
        hidden, limit = self.model.config.hidden_size, self.model.config.max_position_embeddings
        if request_id in self.requests:
            raise ValueError(f"add_request: request id {request_id!r} is already in the engine")
        if prompt.dim() != 2 or prompt.shape[1] != hidden or prompt.shape[0] < 1:
            raise ValueError(f"add_request {request_id!r}: prompt has shape {tuple(prompt.shape)}; expected "
                             f"(T >= 1, {hidden})")
        if prompt.shape[0] + params.max_tokens > limit:
            raise ValueError(f"add_request {request_id!r}: {prompt.shape[0]} prompt positions + max_tokens "
                             f"{params.max_tokens} exceed the model's {limit} (max_position_embeddings)")
        if params.n > self.config.max_num_seqs:
            raise ConfigError(f"SamplingParams.n = {params.n} exceeds EngineConfig.max_num_seqs = "
                              f"{self.config.max_num_seqs}")
        bs = self.config.block_size
        need = blocks_for(prompt.shape[0], bs) + params.n * blocks_for(params.max_tokens - 1, bs)
        if need > self.allocator.num_blocks:
            raise ConfigError(f"add_request {request_id!r}: its prompt and {params.n} x {params.max_tokens} tokens "
                              f"need {need} KV blocks, the pool holds {self.allocator.num_blocks}; raise "
                              "EngineConfig.kv_cache_memory (or gpu_memory_utilization)")

    def abort_request(self, request_id: str) -> None:
        """Drop a request (waiting or running); its memory is free at once. Unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_waiting_requests(self) -> int:
        """Requests added (or preempted) and not admitted yet: a caller feeding the engine adds more when none wait."""
        return len(self.scheduler.waiting)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt KV (call it after the weights change)."""
        self.prefix_cache.clear()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling round: admit and prefill, one decode step for every running row -> the requests that
        advanced (a new token, or finished)."""
        plan = self.scheduler.schedule()
        self.runner.pool.zero_through(self.allocator.high_water)
        self._assign_rows(plan)
        logits, rows = self._forward(plan)
        if not rows:
            return []
        ids = torch.tensor([s.row for _, s in rows], device=self.runner.device)
        steps = torch.tensor([len(s.token_ids) for _, s in rows], device=self.runner.device)
        requests = plan.first_token + plan.decode
        penalty = any(r.params.repetition_penalty != 1.0 for r in requests)
        tokens, logprobs = self.sampler(logits, ids, steps, batch_filters([r.params for r in requests]), penalty)
        drawn = torch.stack([tokens.double(), logprobs.double()]).tolist()  # one host sync per step
        return self._record(rows, drawn[0], drawn[1])

    def _assign_rows(self, plan: StepPlan) -> None:
        samples = [(r, s) for r in plan.admitted for s in r.live]
        self.sampler.assign([s.row for _, s in samples], [r.params for r, _ in samples], [s.seed for _, s in samples],
                            [s.token_ids for _, s in samples])

    def _forward(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[tuple[Request, Sample]]]:
        """Prefill and decode -> (logits of every row drawing a token, those rows as (request, sample))."""
        parts, rows, hidden = [], [], None
        if plan.chunks:
            hidden = self.runner.prefill(plan.chunks)
            self._cache_prompts(plan, hidden)
        if plan.first_token:
            last = torch.stack([self._last_hidden(r, plan, hidden) for r in plan.first_token])
            logits = self.runner.logits(last)  # (R, V)
            counts = torch.tensor([len(r.samples) for r in plan.first_token], device=logits.device)
            parts.append(logits.repeat_interleave(counts, dim=0))
            rows += [(r, s) for r in plan.first_token for s in r.samples]
        if plan.decode:
            parts.append(self.runner.decode(self.runner.prepare_decode(plan.decode, self.tables)))
            rows += [(r, s) for r in plan.decode for s in r.samples if s.finish_reason is None]
        if not parts:
            return None, rows
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), rows

    @staticmethod
    def _last_hidden(req: Request, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor:
        """The hidden state at a fresh request's last prompt position: its cache entry's, or this step's."""
        if req.prefix_entry is not None:
            return req.prefix_entry.last_hidden
        i = next(i for i, c in enumerate(plan.chunks) if c.request is req and c.sample is None)
        return hidden[i]

    def _cache_prompts(self, plan: StepPlan, hidden: torch.Tensor) -> None:
        """Prompts with a cache_key whose prefill completed this step become prefix-cache entries."""
        for i, c in enumerate(plan.chunks):
            req = c.request
            if (c.sample is None and c.end == req.prompt_len and req.cache_key is not None
                    and req.prefix_entry is None):
                entry = self.prefix_cache.insert(req.cache_key, req.prefix_blocks, req.prompt, hidden[i].clone())
                if entry is not None:
                    req.prefix_entry = entry

    def _record(self, rows: list[tuple[Request, Sample]], tokens: list[float],
                logprobs: list[float]) -> list[RequestOutput]:
        touched: dict[str, Request] = {}
        for (req, s), tok, lp in zip(rows, tokens, logprobs):
            tok = int(tok)
            s.token_ids.append(tok)
            s.logprobs.append(lp)
            if tok in req.stop_ids or len(s.token_ids) >= req.params.max_tokens:
                s.finish_reason = "stop" if tok in req.stop_ids else "length"
                self.scheduler.finish_sample(s)
            touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            new = [s.token_ids[s.reported:] for s in req.samples]
            for s in req.samples:
                s.reported = len(s.token_ids)
            done = all(s.finish_reason is not None for s in req.samples)
            if done:
                self.scheduler.finish(req)
                del self.requests[req.request_id]
            outputs.append(RequestOutput(req.request_id, new, done, req.completions() if done else None,
                                         req.num_cached_tokens or 0))
        return outputs

    # --- generate ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[torch.Tensor], params: SamplingParams | list[SamplingParams],
                 cache_keys: list[str | None] | None = None) -> list[list[Completion]]:
        """prompts: embeddings (T_i, hidden) each; params: one for all or one per prompt -> per prompt, its n
        completions. Drives the engine itself, so it must hold no other request."""
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        keys = list(cache_keys) if cache_keys is not None else [None] * len(prompts)
        if len(params) != len(prompts) or len(keys) != len(prompts):
            raise ConfigError(f"generate: {len(prompts)} prompts but {len(params)} SamplingParams and "
                              f"{len(keys)} cache keys")
        if self.has_unfinished_requests():
            raise RuntimeError("generate() drives the engine itself; it holds requests added with add_request")
        ids = [f"generate-{next(self._arrivals)}-{i}" for i in range(len(prompts))]
        done: dict[str, list[Completion]] = {}
        try:
            for rid, prompt, sp, key in zip(ids, prompts, params, keys):
                self.add_request(rid, prompt, sp, key)
            while self.has_unfinished_requests():
                done.update((o.request_id, o.completions) for o in self.step() if o.finished)
        finally:
            for rid in ids:
                self.abort_request(rid)  # only what an exception left behind
        return [done[rid] for rid in ids]
