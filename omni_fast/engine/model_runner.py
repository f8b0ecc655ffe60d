"""Runs the decoder for the engine: this step's prefill chunks packed into one forward that writes the pool,
and a decode step for its rows, replayed from CUDA graphs captured per batch-size bucket on a GPU.

The pool (kv_cache.py) is sized once, here: EngineConfig.kv_cache_memory bytes, else on a GPU the
gpu_memory_utilization fraction of the card less what is in use and the peak of a max_num_batched_tokens
prefill and of max_num_seqs rows of logits (measured by running them), else 2 GiB on the CPU.

A graph is captured once per bucket (lazily, at the first step that needs it) against fixed input buffers
(DecodeInputs.empty: rows, their block tables at full width, the prefix tables of up to one group per row plus
the pad group) and the pool, which never moves; a step copies its rows in front, pads the rest with rows of
the pad group writing the pad block, replays, and reads the first B rows of the logits. The kernel reads
every length and table from those buffers, so one graph serves every mix of requests; graphs are dropped only
when a longer prompt than any before changes the prefix split count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_fast import ops
from omni_fast.config import ConfigError, EngineConfig
from omni_fast.engine.block_manager import BlockTables
from omni_fast.engine.kv_cache import DecodeContext, KVPool, PrefillContext, bytes_per_block
from omni_fast.engine.scheduler import Chunk
from omni_fast.engine.sequence import Request
from omni_fast.model.qwen2 import Qwen2LM

CPU_POOL_BYTES = 2 << 30  # the pool's size on the CPU when EngineConfig.kv_cache_memory is not given


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _positions(blocks: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Pool slots (int64) of positions [start, end) of the sequence stored in `blocks`."""
    t = torch.arange(start, end)
    return torch.tensor(blocks, dtype=torch.int64)[t // block_size] * block_size + t % block_size


@dataclass(slots=True)
class DecodeInputs:
    tokens: torch.Tensor  # (B,) ids fed this step
    positions: torch.Tensor  # (B,) their positions (prompt length + generated before them)
    slots: torch.Tensor  # (B,) pool slot of each token's key
    groups: torch.Tensor  # (B,) row of prefix_tables, non-decreasing
    gen_lens: torch.Tensor  # (B,) generated keys including this one
    gen_tables: torch.Tensor  # (B, Wg) int32 blocks of each row's generated keys
    prefix_tables: torch.Tensor  # (G, Wp) int32 blocks of each group's prompt
    prefix_lens: torch.Tensor  # (G,)

    @classmethod
    def empty(cls, size: int, width: int, pool: KVPool) -> DecodeInputs:
        """Fixed buffers for a graph of `size` rows: every row a pad row of the pad group (row `size`)."""
        def full(shape, value, dtype=torch.int64):
            return torch.full(shape, value, dtype=dtype, device=pool.device)
        return cls(full((size,), 0), full((size,), 0), full((size,), pool.pad_block * pool.block_size),
                   full((size,), size), full((size,), 1), full((size, width), pool.pad_block, torch.int32),
                   full((size + 1, width), pool.pad_block, torch.int32), full((size + 1,), 0))

    def fill(self, step: DecodeInputs, pool: KVPool) -> None:
        """Copy a step's rows and groups in front; the rest become pad rows / empty groups. Table entries past a
        row's own are left as they are: the kernel never reads them."""
        n, g = step.tokens.numel(), step.prefix_lens.numel()
        size = self.tokens.numel()
        for name, pad in (("tokens", 0), ("positions", 0), ("slots", pool.pad_block * pool.block_size),
                          ("groups", size), ("gen_lens", 1)):
            buf = getattr(self, name)
            buf[:n].copy_(getattr(step, name))
            buf[n:].fill_(pad)
        self.gen_tables[:n, :step.gen_tables.shape[1]].copy_(step.gen_tables)
        self.gen_tables[n:, 0].fill_(pool.pad_block)
        self.prefix_tables[:g, :step.prefix_tables.shape[1]].copy_(step.prefix_tables)
        self.prefix_lens[:g].copy_(step.prefix_lens)
        self.prefix_lens[g:].zero_()


class ModelRunner:
    def __init__(self, model: Qwen2LM, config: EngineConfig):
        cfg = model.config
        weight = model.lm_head_weight
        self.model, self.config = model, config
        self.dtype, self.device = weight.dtype, weight.device
        self.block_size = config.block_size
        self.width = _cdiv(cfg.max_position_embeddings, self.block_size)  # table columns: the longest sequence
        self.pool = KVPool(cfg, self.block_size, self._pool_blocks(), self.dtype, self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, DecodeInputs, torch.Tensor]] = {}
        self.graph_pool = None
        self.prefix_capacity, self.splits = 0, 1

    @property
    def use_graphs(self) -> bool:
        return self.config.cuda_graphs and self.device.type == "cuda"

    # --- the pool's size -------------------------------------------------------------------------------------------
    def _pool_blocks(self) -> int:
        per_block = bytes_per_block(self.model.config, self.block_size, self.dtype)
        if self.config.kv_cache_memory is not None:
            budget, source = self.config.kv_cache_memory, "EngineConfig.kv_cache_memory"
        elif self.device.type == "cuda":
            budget, source = self._gpu_budget(), "EngineConfig.gpu_memory_utilization"
        else:
            budget, source = CPU_POOL_BYTES, "the CPU default"
        if budget < per_block:
            raise ConfigError(f"KV pool: {source} leaves {budget} bytes, less than one block ({per_block} bytes: "
                              f"{self.block_size} positions); raise it")
        return budget // per_block

    @torch.inference_mode()
    def _gpu_budget(self) -> int:
        """gpu_memory_utilization x the card, less what is allocated now (by anything) and the activation peak of
        the largest prefill and of max_num_seqs rows of float32 logits with their sampling temporaries."""
        hidden, n = self.model.config.hidden_size, self.config.max_num_batched_tokens
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        embeds = torch.zeros(1, n, hidden, dtype=self.dtype, device=self.device)
        self.model.model(embeds, torch.arange(n, device=self.device)[None])  # plain causal attention, no pool
        logits = self.model.logits(torch.zeros(self.config.max_num_seqs, hidden, dtype=self.dtype,
                                               device=self.device)).float()
        torch.topk(logits, 50, dim=1)
        del embeds, logits
        peak = torch.cuda.max_memory_allocated(self.device) - before
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total * self.config.gpu_memory_utilization) - (total - free) - 2 * peak

    # --- prefill -----------------------------------------------------------------------------------------------
    def note_prompt(self, length: int) -> None:
        """Size the decode kernel's prefix splits for prompts up to this long (graphs are recaptured after)."""
        if length > self.prefix_capacity:
            self.prefix_capacity = max(256, 1 << (length - 1).bit_length())
            self.splits = ops.cascade_splits(self.prefix_capacity)
            self.graphs.clear()

    def prefill(self, chunks: list[Chunk]) -> torch.Tensor:
        """Chunks of prompts (or of preempted samples' generated tokens) -> the final-normed hidden state at each
        chunk's last position (C, H). Their keys and values land in the pool."""
        bs, embeds, positions, slots, spans, history = self.block_size, [], [], [], [], []
        row = 0
        for c in chunks:
            req = c.request
            if c.sample is None:
                embeds.append(req.prompt[c.start:c.end].to(self.device, self.dtype))
                positions.append(torch.arange(c.start, c.end))
                slots.append(_positions(req.prefix_blocks, c.start, c.end, bs))
                history.append(_positions(req.prefix_blocks, 0, c.end, bs) if c.start else None)
            else:
                s = c.sample
                ids = torch.tensor(s.token_ids[c.start:c.end], device=self.device)
                embeds.append(self.model.embed(ids))
                positions.append(torch.arange(c.start, c.end) + req.prompt_len)
                slots.append(_positions(s.blocks, c.start, c.end, bs))
                history.append(torch.cat([_positions(req.prefix_blocks, 0, req.prompt_len, bs),
                                          _positions(s.blocks, 0, c.end, bs)]))
            spans.append((row, row + c.end - c.start))
            row += c.end - c.start
        to = dict(device=self.device, non_blocking=True)
        ctx = PrefillContext(self.pool, torch.cat(slots).to(**to), spans,
                             [None if h is None else h.to(**to) for h in history])
        hidden = self.model.model(torch.cat(embeds), torch.cat(positions).to(**to), ctx)  # (N, H)
        return hidden[torch.tensor([r1 - 1 for _, r1 in spans], device=self.device)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden).float()

    # --- decode ------------------------------------------------------------------------------------------------
    def prepare_decode(self, requests: list[Request], tables: BlockTables) -> DecodeInputs:
        """One row per live sample of each request, in order: feed its last token, write its key."""
        bs, meta, rows = self.block_size, [], []
        for g, req in enumerate(requests):
            p = req.prompt_len
            for s in req.samples:
                if s.finish_reason is None:
                    w = len(s.token_ids) - 1
                    meta.append((s.token_ids[-1], p + w, s.blocks[w // bs] * bs + w % bs, g, w + 1))
                    rows.append(s.row)
        host = torch.tensor(meta, dtype=torch.int64).T.contiguous()  # (5, B)
        gen_width = _cdiv(int(host[4].max()), bs)
        prefix_width = _cdiv(max(r.prompt_len for r in requests), bs)
        gen_tables = torch.from_numpy(tables.gen[rows, :gen_width])
        prefix_tables = torch.from_numpy(tables.prefix[[r.group for r in requests], :prefix_width])
        prefix_lens = torch.tensor([r.prompt_len for r in requests], dtype=torch.int64)
        to = dict(device=self.device, non_blocking=True)
        host, gen_tables, prefix_tables, prefix_lens = (t.to(**to) for t in (host, gen_tables, prefix_tables,
                                                                             prefix_lens))
        return DecodeInputs(*host.unbind(0), gen_tables, prefix_tables, prefix_lens)

    def _forward(self, inputs: DecodeInputs) -> torch.Tensor:
        ids = torch.arange(inputs.prefix_lens.numel() + 1, device=self.device)
        offsets = torch.searchsorted(inputs.groups, ids)  # sorted rows: first row of each group, no host sync
        ctx = DecodeContext(self.pool, inputs.slots, inputs.groups, inputs.gen_tables, inputs.gen_lens,
                            inputs.prefix_tables, inputs.prefix_lens, offsets, self.splits)
        hidden = self.model.model(self.model.embed(inputs.tokens), inputs.positions, ctx)  # (B, H)
        return self.model.logits(hidden).float()

    def decode(self, inputs: DecodeInputs) -> torch.Tensor:
        """One token per row -> logits (B, V) float32."""
        n = inputs.tokens.numel()
        buckets = [b for b in self.config.graph_buckets if b >= n]
        if not (self.use_graphs and buckets):
            return self._forward(inputs)
        graph, static, logits = self.graphs.get(buckets[0]) or self._capture(buckets[0])
        static.fill(inputs, self.pool)
        graph.replay()
        return logits[:n]

    def _capture(self, size: int):
        static = DecodeInputs.empty(size, self.width, self.pool)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels and warm the GEMM heuristics outside the capture
                self._forward(static)
        torch.cuda.current_stream().wait_stream(stream)
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self._forward(static)
        self.graphs[size] = (graph, static, logits)
        return self.graphs[size]

