"""The KV cache and the attention contexts that read and write it.

Static slabs, not pages: a rollout batch knows at its start how many prompts (P), how long their prefixes (Tp),
how many samples (S) and how many new tokens at most (Tg) it has, so the cache is two dense slabs per layer,
    prefix_k/v [L, P, Tp, Hkv, D]   written once by the prompt's prefill, read by all its n samples
    gen_k/v    [L, S, Tg, Hkv, D]   each sample's own generated tokens
which keeps addressing trivial for the decode kernel and tensor addresses fixed for CUDA-graph replay. The
waste is the unused tail of finished samples' rows, bounded by S x Tg (6 GB at 256 x 2048 for the 0.5B, 12 KB
a token); paging would reclaim it at the cost of block tables in every kernel, which this workload does not
need. The slabs only grow (to the largest request seen); each has one spare row past its capacity, the "pad"
prompt and the "pad" sample that rows padding a CUDA-graph batch up to its bucket read and write.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_fast import ops


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.prefix_k = self.prefix_v = self.gen_k = self.gen_v = None
        self.capacity = (0, 0, 0, 0)  # (P, Tp, S, Tg)
        self.prefix_lens = None  # (P + 1,) int64: the prompts' lengths, 0 for unused slots and the pad prompt

    @property
    def pad_group(self) -> int:
        return self.capacity[0]

    @property
    def pad_slot(self) -> int:
        return self.capacity[2]

    def ensure(self, prompts: int, prefix_len: int, samples: int, gen_len: int) -> bool:
        """Grow the slabs to hold the request; True when they were (re)allocated."""
        need = (prompts, prefix_len, samples, gen_len)
        if all(n <= c for n, c in zip(need, self.capacity)):
            return False
        p, tp, s, tg = (max(n, c) for n, c in zip(need, self.capacity))
        tp, tg = -(-tp // 64) * 64, -(-tg // 64) * 64
        layers, hkv, d = self.shape
        self.prefix_k = self.prefix_v = self.gen_k = self.gen_v = None  # free before allocating anew
        kw = dict(dtype=self.dtype, device=self.device)
        self.prefix_k, self.prefix_v = (torch.zeros(layers, p + 1, tp, hkv, d, **kw) for _ in range(2))
        self.gen_k, self.gen_v = (torch.zeros(layers, s + 1, tg, hkv, d, **kw) for _ in range(2))
        self.prefix_lens = torch.zeros(p + 1, dtype=torch.int64, device=self.device)
        self.capacity = (p, tp, s, tg)
        return True


@dataclass(slots=True)
class PrefillContext:
    """Causal attention over right-padded prompts [P, T]; their keys and values go to prefix slots 0..P-1."""
    cache: KVCache

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p, t = k.shape[:2]
        self.cache.prefix_k[layer, :p, :t] = k
        self.cache.prefix_v[layer, :p, :t] = v
        # Right padding: a valid query at i only sees keys <= i, all valid; pad rows are never read.
        return ops.causal_attention(q, k, v)


@dataclass(slots=True)
class DecodeContext:
    """One new token per row: row b writes its key at gen_k[slots[b], write_pos[b]] and attends over its
    group's prefix and its own generated keys. Rows are sorted by group; everything here is a tensor, so a
    captured CUDA graph replays it after its buffers are refilled."""
    cache: KVCache
    slots: torch.Tensor  # (B,) gen-cache row
    groups: torch.Tensor  # (B,) prefix-cache row, non-decreasing
    write_pos: torch.Tensor  # (B,) where this token's key goes = number of earlier generated tokens
    gen_lens: torch.Tensor  # (B,) write_pos + 1
    group_offsets: torch.Tensor  # (P + 2,) rows of group g: group_offsets[g]:group_offsets[g + 1]
    splits: int  # prefix splits per (group, KV head) in the kernel

    @classmethod
    def build(cls, cache: KVCache, slots: torch.Tensor, groups: torch.Tensor, write_pos: torch.Tensor) -> DecodeContext:
        ids = torch.arange(cache.pad_group + 2, device=groups.device)
        offsets = torch.searchsorted(groups, ids)  # sorted rows: first row of each group, no host sync
        return cls(cache, slots, groups, write_pos, write_pos + 1, offsets, ops.cascade_splits(cache.capacity[1]))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        c.gen_k[layer, self.slots, self.write_pos] = k
        c.gen_v[layer, self.slots, self.write_pos] = v
        return ops.cascade_attention(q, c.prefix_k[layer], c.prefix_v[layer], c.prefix_lens, self.groups,
                                     c.gen_k[layer], c.gen_v[layer], self.slots, self.gen_lens,
                                     self.group_offsets, self.splits)
