"""The KV cache and the attention contexts that read and write it.

Static slabs, not pages: a rollout batch knows at its start how many prompts (P), how long their prefixes (Tp),
how many samples (S) and how many new tokens at most (Tg) it has, so the cache is two dense slabs per layer,
    prefix_k/v [L, P, Tp, Hkv, D]   written once by the prompt's prefill, read by all its n samples
    gen_k/v    [L, S, Tg, Hkv, D]   each sample's own generated tokens
which keeps addressing trivial for the decode kernel and tensor addresses fixed for CUDA-graph replay. The
waste is the unused tail of finished samples' rows, bounded by S x Tg (6 GB at 256 x 2048 for the 0.5B, 12 KB
a token); paging would reclaim it at the cost of block tables in every kernel, which this workload does not
need. The slabs only grow (to the largest request seen), so graphs captured against them stay valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_fast import ops
from omni_fast.model.qwen2 import causal_attention


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.prefix_k = self.prefix_v = self.gen_k = self.gen_v = None
        self.capacity = (0, 0, 0, 0)  # (P, Tp, S, Tg)

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
        self.prefix_k, self.prefix_v = (torch.zeros(layers, p, tp, hkv, d, **kw) for _ in range(2))
        self.gen_k, self.gen_v = (torch.zeros(layers, s, tg, hkv, d, **kw) for _ in range(2))
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
        return causal_attention(q, k, v)


@dataclass(slots=True)
class DecodeContext:
    """One new token per row: row b writes its key at gen_k[slots[b], write_pos[b]] and attends over its
    group's prefix and its own generated keys."""
    cache: KVCache
    slots: torch.Tensor  # (B,) gen-cache row
    groups: torch.Tensor  # (B,) prefix-cache row
    prefix_lens: torch.Tensor  # (P,) prompt lengths
    write_pos: torch.Tensor  # (B,) where this token's key goes = number of earlier generated tokens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        c.gen_k[layer, self.slots, self.write_pos] = k
        c.gen_v[layer, self.slots, self.write_pos] = v
        return ops.cascade_attention(q, c.prefix_k[layer], c.prefix_v[layer], self.prefix_lens, self.groups,
                                     c.gen_k[layer], c.gen_v[layer], self.slots, self.write_pos + 1)
