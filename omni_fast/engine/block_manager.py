"""Host-side bookkeeping of the KV pool (kv_cache.py): which blocks are free, and the prefix cache.

BlockAllocator hands out block ids lowest first (a heap), so the pool's high-water mark - the blocks ever used,
which kv_cache.KVPool zeroes on first use - only grows to the peak the workload needs, and a prompt's blocks
are often one consecutive run (the CPU attention then reads them as a view instead of a gather).

BlockTables mirrors the block tables the decode kernel reads, one row per admitted sample (its generated KV)
and one per admitted request (its prompt's KV), written as blocks are added, so a step gathers its rows with
one indexing instead of rebuilding them.

PrefixCache keeps the prompt KV of requests that came with a `cache_key` after they finish: an entry owns its
blocks and the final hidden state at the prompt's last position (what the first token is sampled from), is
reference-counted by the requests reading it, and is evicted least recently used, only when unreferenced, when
the allocator runs short. A key identifies the prompt: an entry is used only when the new prompt has the same
length and the same probe rows (8 embeddings evenly spaced over it), so a key reused for another prompt is a
miss rather than a wrong answer (unless the two agree on every probe row: the key is the caller's promise).
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a heap: lowest id first
        self.high_water = 0  # 1 + the largest id ever handed out

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV pool: {n} blocks asked, {len(self._free)} free (the scheduler checks first)")
        ids = [heapq.heappop(self._free) for _ in range(n)]
        if ids:
            self.high_water = max(self.high_water, ids[-1] + 1)
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            heapq.heappush(self._free, i)


class BlockTables:
    def __init__(self, rows: int, width: int, pad_block: int):
        self.gen = np.full((rows, width), pad_block, dtype=np.int32)  # sample row -> its generated KV blocks
        self.prefix = np.full((rows, width), pad_block, dtype=np.int32)  # request row -> its prompt's KV blocks
        self.free_rows = list(range(rows - 1, -1, -1))  # sample rows (a stack: lowest first)
        self.free_groups = list(range(rows - 1, -1, -1))  # request rows

    def set(self, table: np.ndarray, row: int, blocks: list[int], start: int = 0) -> None:
        """Write blocks[start:] at their positions of `row`."""
        table[row, start:len(blocks)] = blocks[start:]


PROBE_ROWS = 8


def prompt_probe(prompt: torch.Tensor) -> torch.Tensor:
    """The rows a cache entry is checked against: PROBE_ROWS embeddings evenly spaced over the prompt, first and
    last included."""
    t = prompt.shape[0]
    return prompt[[i * (t - 1) // (PROBE_ROWS - 1) for i in range(PROBE_ROWS)]].clone()


@dataclass(slots=True, eq=False)
class CachedPrefix:
    key: str
    blocks: list[int]  # the prompt's KV blocks, owned by the entry
    length: int  # prompt positions
    last_hidden: torch.Tensor  # (H,) final-normed hidden state at the last prompt position
    probe: torch.Tensor  # prompt_probe(prompt)
    refs: int = 0  # requests reading it now


class PrefixCache:
    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.entries: OrderedDict[str, CachedPrefix] = OrderedDict()  # least recently used first
        self.evictable_blocks = 0  # blocks of unreferenced entries: free for the asking

    def lookup(self, key: str, prompt: torch.Tensor) -> CachedPrefix | None:
        """The entry for `key` if it holds this prompt (then referenced and most recently used), else None."""
        entry = self.entries.get(key)
        if (entry is None or entry.length != prompt.shape[0]
                or not torch.equal(entry.probe, prompt_probe(prompt).to(entry.probe))):
            return None
        self.acquire(entry)
        self.entries.move_to_end(key)
        return entry

    def insert(self, key: str, blocks: list[int], prompt: torch.Tensor,
               last_hidden: torch.Tensor) -> CachedPrefix | None:
        """Hand a just-prefilled prompt's blocks to the cache (the entry then has one reference, the caller's);
        None when the key already names an entry (the caller keeps its blocks)."""
        if key in self.entries:
            return None
        entry = CachedPrefix(key, blocks, prompt.shape[0], last_hidden, prompt_probe(prompt), refs=1)
        self.entries[key] = entry
        return entry

    def acquire(self, entry: CachedPrefix) -> None:
        if entry.refs == 0:
            self.evictable_blocks -= len(entry.blocks)
        entry.refs += 1

    def release(self, entry: CachedPrefix) -> None:
        entry.refs -= 1
        assert entry.refs >= 0, f"prefix cache entry {entry.key!r} released more often than referenced"
        if entry.refs == 0:
            if self.entries.get(entry.key) is entry:
                self.evictable_blocks += len(entry.blocks)
            else:  # dropped by clear() while in use: its last reader gives the blocks back
                self.allocator.free(entry.blocks)

    def evict(self, need: int) -> None:
        """Free unreferenced entries, least recently used first, until the allocator has `need` free blocks (or
        none is left to evict)."""
        for key in [k for k, e in self.entries.items() if e.refs == 0]:
            if self.allocator.num_free >= need:
                return
            self._drop(key)

    def clear(self) -> None:
        """Forget every entry (after the weights changed, say): unreferenced ones free their blocks now, the
        others when their last reader releases them."""
        for key in list(self.entries):
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        if entry.refs == 0:
            self.evictable_blocks -= len(entry.blocks)
            self.allocator.free(entry.blocks)
