"""The scheduler (nano-vllm's shape): which requests prefill and which rows decode in a step.

Admission is first come, first served: the head of `waiting` is admitted when its live samples fit under
max_num_seqs rows, the pool has room for its whole prompt (none when its prefix is a cache hit) and for the
generated tokens it must recompute, with one block per admitted row left over for the next decode step's
growth, and the step's prefill budget is not spent; otherwise nothing behind it is admitted either.

Prefill is chunked: a step prefills at most max_num_batched_tokens positions - continuing prefills first, in
admission order, then new admissions - so a long prompt is spread over several steps while the running rows
decode one token in each of them. What a step adds to a running row's time per token is bounded by one
forward over max_num_batched_tokens positions (bench_rollout.py measures it: TPOT p99 under arrivals).

Decode rows grow block by block. When a running request cannot get the block a step needs, unreferenced
prefix-cache entries are evicted (least recently used first), then the newest admitted request is preempted:
its KV freed, it goes back to the front of `waiting` with its tokens, and on readmission its prompt (or its
cache entry) and its samples' generated tokens are prefilled again before it resumes - never an out-of-memory
error, never a lost request. A step that preempted admits nothing.

The `static` policy (the benchmarks' baseline) admits only when nothing is admitted, then everything that fits,
prefilled in that one step: batches run until they drain, as a static-batching engine does.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from omni_fast.config import EngineConfig
from omni_fast.engine.block_manager import BlockAllocator, BlockTables, PrefixCache
from omni_fast.engine.sequence import Request, Sample, Status


@dataclass(slots=True)
class Chunk:
    request: Request
    sample: Sample | None  # None: prompt positions [start, end); a sample: its generated tokens [start, end)
    start: int
    end: int


@dataclass(slots=True)
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)  # this step's prefill work
    decode: list[Request] = field(default_factory=list)  # running requests: one row per live sample
    first_token: list[Request] = field(default_factory=list)  # fresh requests drawing their first tokens
    admitted: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


def blocks_for(positions: int, block_size: int) -> int:
    """KV blocks that hold `positions` positions."""
    return -(-positions // block_size)


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: BlockAllocator, cache: PrefixCache, tables: BlockTables):
        self.config, self.allocator, self.cache, self.tables = config, allocator, cache, tables
        self.block_size = config.block_size
        self.waiting: deque[Request] = deque()
        self.running: deque[Request] = deque()  # admitted (prefilling or running), oldest first
        self.preemptions = self.cache_hits = self.cache_misses = 0

    @property
    def rows(self) -> int:
        """Sample rows held by admitted requests (their live samples)."""
        return self.config.max_num_seqs - len(self.tables.free_rows)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._schedule_decode(plan)
        budget = self.config.max_num_batched_tokens
        for req in self.running:
            if req.status is Status.PREFILLING:
                budget -= self._take(req, budget, plan)
        static = self.config.admission == "static"
        if not plan.preempted and not (static and self.running):
            self._admit(plan, 1 << 62 if static else budget)  # a static batch is prefilled in one step
        for req in self.running:
            if req.status is Status.PREFILLING and req.prefilled:
                if req.fresh:
                    plan.first_token.append(req)
                req.status = Status.RUNNING  # it decodes from the next step on
        return plan

    # --- decode: every running row writes one key; a row at a block boundary needs a new block ----------------
    def _schedule_decode(self, plan: StepPlan) -> None:
        kept: deque[Request] = deque()
        while self.running:
            req = self.running.popleft()
            if req.status is not Status.RUNNING:
                kept.append(req)
                continue
            live = req.live
            grow = [s for s in live if s.cached == len(s.blocks) * self.block_size]
            while not self._room(len(grow)):
                victim = self.running.pop() if self.running else req  # the newest admitted
                self._preempt(victim, plan)
                if victim is req:
                    break
            else:
                for s in grow:
                    s.blocks += self.allocator.allocate(1)
                    self.tables.gen[s.row, len(s.blocks) - 1] = s.blocks[-1]
                for s in live:
                    s.cached += 1  # the key of its last token is written this step
                plan.decode.append(req)
                kept.append(req)
        self.running = kept

    def _room(self, blocks: int) -> bool:
        if self.allocator.num_free < blocks:
            self.cache.evict(blocks)
        return self.allocator.num_free >= blocks

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self._release(req)
        req.prompt_done = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        plan.preempted.append(req)
        self.preemptions += 1

    # --- admission -----------------------------------------------------------------------------------------------
    def _admit(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and self._try_admit(self.waiting[0], budget):
            req = self.waiting.popleft()
            self.running.append(req)
            plan.admitted.append(req)
            budget -= self._take(req, budget, plan)

    def _try_admit(self, req: Request, budget: int) -> bool:
        live = req.live
        if self.rows + len(live) > self.config.max_num_seqs:
            return False
        entry = self.cache.lookup(req.cache_key, req.prompt) if req.cache_key is not None else None
        redo = [s for s in live if len(s.token_ids) > 1]  # preempted samples: their tokens but the last
        work = (0 if entry else req.prompt_len) + sum(len(s.token_ids) - 1 for s in redo)
        need = (0 if entry else blocks_for(req.prompt_len, self.block_size)) + sum(
            blocks_for(len(s.token_ids) - 1, self.block_size) for s in redo)
        reserve = self.rows + len(live) if self.running else 0  # one decode step's growth for every row
        if (work and budget <= 0) or not self._room(need + reserve):
            if entry is not None:
                self.cache.release(entry)
            return False
        if entry is not None:
            req.prefix_entry, req.prefix_blocks, req.prompt_done = entry, entry.blocks, req.prompt_len
            self.cache_hits += 1
        else:
            req.prefix_blocks = self.allocator.allocate(blocks_for(req.prompt_len, self.block_size))
            self.cache_misses += req.cache_key is not None
        if req.num_cached_tokens is None:
            req.num_cached_tokens = req.prompt_len if entry is not None else 0
        req.group = self.tables.free_groups.pop()
        self.tables.set(self.tables.prefix, req.group, req.prefix_blocks)
        for s in live:
            s.row = self.tables.free_rows.pop()
            s.blocks = self.allocator.allocate(blocks_for(len(s.token_ids) - 1, self.block_size)) if s in redo else []
            s.cached = 0
            self.tables.set(self.tables.gen, s.row, s.blocks)
        req.status = Status.PREFILLING
        return True

    def _take(self, req: Request, budget: int, plan: StepPlan) -> int:
        """Plan up to `budget` positions of the request's remaining prefill (its prompt, then each live sample's
        generated tokens but the last) -> positions planned."""
        used = 0
        if req.prompt_done < req.prompt_len and budget > 0:
            end = min(req.prompt_len, req.prompt_done + budget)
            plan.chunks.append(Chunk(req, None, req.prompt_done, end))
            used, req.prompt_done = end - req.prompt_done, end
        if req.prompt_done == req.prompt_len:
            for s in req.live:
                target = len(s.token_ids) - 1
                if s.cached < target and used < budget:
                    end = min(target, s.cached + budget - used)
                    plan.chunks.append(Chunk(req, s, s.cached, end))
                    used, s.cached = used + end - s.cached, end
        return used

    # --- leaving ---------------------------------------------------------------------------------------------------
    def finish_sample(self, sample: Sample) -> None:
        """A sample stopped: its generated KV and its row are free at once."""
        self.allocator.free(sample.blocks)
        sample.blocks = []
        if sample.row >= 0:
            self.tables.free_rows.append(sample.row)
            sample.row = -1

    def finish(self, req: Request) -> None:
        """Every sample of an admitted request stopped, or it was aborted: free everything it holds."""
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        elif req.status is not Status.FINISHED:
            self.running.remove(req)
            self._release(req)
        req.status = Status.FINISHED

    def _release(self, req: Request) -> None:
        for s in req.samples:
            self.finish_sample(s)
            s.cached = 0
        if req.prefix_entry is not None:
            self.cache.release(req.prefix_entry)
            req.prefix_entry = None
        else:
            self.allocator.free(req.prefix_blocks)
        req.prefix_blocks = []
        if req.group >= 0:
            self.tables.free_groups.append(req.group)
            req.group = -1
