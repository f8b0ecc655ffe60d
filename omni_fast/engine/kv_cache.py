"""The KV pool and the attention contexts that read and write it.

Pages, not slots. The pool is one tensor per K and V, [layers, num_blocks + 1, block_size, Hkv, D], sized once
from a byte budget (EngineConfig.kv_cache_memory, or gpu_memory_utilization on a GPU) and never reallocated,
so captured CUDA graphs stay valid; the last block is the pad block that rows padding a graph batch to its
bucket read and write. A sequence is a list of block ids: each prompt's KV (written once by its prefill and
read once per group by cascade attention, kernels/cascade_attention.py) and each sample's own generated KV.
Blocks are allocated as a sequence grows (block_manager.py), so a request holds what it has written, rounded up
to a block, never what it might write.

Why pages: what a request needs is unknown at admission (max_tokens is an upper bound; completions stop at
EOS) and varies widely, so slots sized per request would reserve the worst case. On the benchmark's mixed
workload (bench_rollout.py --workload mixed: 1,000-position prompts, 8 samples each stopping after 16-256
tokens, mean 136), slots of max_tokens per sample would reserve 1,000 + 8 x 256 = 3,048 positions per request
and use 1,000 + 8 x 136 = 2,088: 31% of the pool wasted. With 16-token pages the waste is the unfilled tail
of each sequence's last block, measured at 8 + 8 x 7.5 = 68 positions per request (3.2%); the prompt's tail
block is not shared with its samples (they write their own blocks), so no copy-on-write is needed. The cost
is a block-table lookup per 64-key tile in the decode kernel and, on the CPU, a gather of a prompt's keys
when its blocks are not one consecutive run (the allocator hands out the lowest ids first, so they mostly
are, and are read as a view).

Never-written memory is zeroed on first use (`zero_through`, driven by the allocator's high-water mark), so
masked positions of a partly filled block hold finite values, and a large CPU pool costs only what is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_fast import ops
from omni_fast.config import ModelConfig


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Pool bytes of one block: K and V of every layer for block_size positions."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * itemsize


def pool_bytes(config: ModelConfig, dtype: torch.dtype, sequences: int, positions: int, block_size: int = 16) -> int:
    """Pool bytes that hold `sequences` sequences of up to `positions` positions each (a caller sizing
    EngineConfig.kv_cache_memory for a known workload: a request is 1 + n sequences, its prompt and n samples)."""
    return sequences * -(-positions // block_size) * bytes_per_block(config, block_size, dtype)


class KVPool:
    def __init__(self, config: ModelConfig, block_size: int, num_blocks: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (config.num_hidden_layers, num_blocks + 1, block_size, config.num_key_value_heads, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.dtype, self.device = dtype, device
        self.zeroed = 0  # blocks [0, zeroed) have been zeroed
        self.k[:, num_blocks].zero_()
        self.v[:, num_blocks].zero_()

    @property
    def pad_block(self) -> int:
        return self.num_blocks

    def zero_through(self, high_water: int) -> None:
        """Zero the blocks below `high_water` that were never handed out before."""
        if high_water > self.zeroed:
            self.k[:, self.zeroed:high_water].zero_()
            self.v[:, self.zeroed:high_water].zero_()
            self.zeroed = high_water

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V as [(num_blocks + 1) * block_size, Hkv, D]: row b * block_size + i is position i of
        block b (a pool slot)."""
        return self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k / v [N, Hkv, D] into pool slots [N] (int64)."""
        fk, fv = self.flat(layer)
        fk.index_copy_(0, slots, k)
        fv.index_copy_(0, slots, v)


def slots_of(blocks: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Pool slots of positions [start, end) of the sequence stored in `blocks`."""
    return [blocks[t // block_size] * block_size + t % block_size for t in range(start, end)]


@dataclass(slots=True)
class PrefillContext:
    """Packed chunks of N tokens in all: chunk c is rows spans[c] of the flat batch (a piece of a prompt, or the
    generated tokens of a preempted sample being recomputed). Token i's key and value go to pool slot
    slots[i]; a chunk attends causally to itself and, when history[c] is given (the pool slots of every position
    of its sequence before it, then its own), to those keys: a prompt's earlier chunks, or for generated tokens
    the prompt and the sample's earlier tokens."""
    pool: KVPool
    slots: torch.Tensor  # (N,) int64
    spans: list[tuple[int, int]]
    history: list[torch.Tensor | None]  # per chunk: (T_c,) int64 slots of its sequence up to its end, or None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.pool.write(layer, self.slots, k, v)
        fk, fv = self.pool.flat(layer)
        outs = []
        for (r0, r1), seen in zip(self.spans, self.history):
            if seen is None:  # the chunk is its sequence's start: attend to its own keys
                keys, values = k[r0:r1], v[r0:r1]
            else:  # (T_c, Hkv, D), the chunk's own keys last; causal_attention aligns the queries to the end
                keys, values = fk[seen], fv[seen]
            outs.append(ops.causal_attention(q[None, r0:r1], keys[None], values[None])[0])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


@dataclass(slots=True)
class DecodeContext:
    """One new token per row: row b writes its key at pool slot slots[b] and attends over its group's prefix
    (prefix_tables[groups[b]], prefix_lens) and its own generated keys (gen_tables[b], gen_lens[b], this
    token's included). Rows are sorted by group; everything here is a tensor, so a captured CUDA graph replays
    it after its buffers are refilled."""
    pool: KVPool
    slots: torch.Tensor  # (B,) int64
    groups: torch.Tensor  # (B,) row of prefix_tables, non-decreasing
    gen_tables: torch.Tensor  # (B, Wg) int32
    gen_lens: torch.Tensor  # (B,)
    prefix_tables: torch.Tensor  # (G, Wp) int32
    prefix_lens: torch.Tensor  # (G,)
    group_offsets: torch.Tensor  # (G + 1,) rows of group g: group_offsets[g]:group_offsets[g + 1]
    splits: int  # prefix splits per (group, KV head) in the kernel

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.pool.write(layer, self.slots, k, v)
        return ops.cascade_attention(q, self.pool.k[layer], self.pool.v[layer], self.prefix_tables, self.prefix_lens,
                                     self.groups, self.gen_tables, self.gen_lens, self.group_offsets, self.splits)
