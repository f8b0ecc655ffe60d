"""The encoder cache: clips' tower features in host memory, least recently used first out, bounded in bytes.

    cache = MemoryCache(1 << 30)
    cache.put(settings.key(content), {"vision": v, "audio": a}, info)    # key.FeatureSettings.key(content_hash(...))
    entry = cache.get(settings.key(content))                              # a store.Entry (source "memory"), or None

It sits in front of the tower-feature store (store.py) in towers.CachedTowers, under the same keys: a clip seen
before, by this process, with the same settings, is neither decoded nor run through a tower, nor read from disk.
An entry holds a dense copy of each tensor on the CPU, in the memory layout the tower gave it (as the store
keeps it), so it pins no batch and no device memory (the KV pool is sized from what the device has) and its
bytes are its tensors' bytes: the bound counts exactly them. Putting an entry that does not fit evicts the least
recently used ones (a get or a put makes an entry the most recent) until it does; an entry larger than the
whole bound is not kept. Safe to use from the media loader's worker threads.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from omni_fast.features.store import Entry, inverse_layout, layout

MEMORY = "memory"  # Entry.source of an entry read from this cache


@dataclass(slots=True)
class MemoryStats:
    hits: int = 0  # get() found the entry
    misses: int = 0  # get() found none
    evictions: int = 0  # entries dropped to make room
    entries: int = 0  # entries held now
    bytes: int = 0  # their tensors' bytes
    capacity: int = 0  # the bound on bytes

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def dense_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of t on the CPU that owns exactly its own bytes, with t's order of dims in memory (its strides,
    when t is dense; a row of a batch is copied out of the batch)."""
    order = layout(t)
    src = t.detach().permute(order)  # t's dims in memory order
    return torch.empty(src.shape, dtype=t.dtype).copy_(src).permute(inverse_layout(order))


def nbytes(features: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in features.values())


class MemoryCache:
    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"encoder cache: capacity must be a positive number of bytes, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[Entry, int]] = OrderedDict()  # key -> (entry, bytes); oldest first
        self._bytes = 0
        self._stats = MemoryStats(capacity=capacity)
        self._lock = threading.Lock()

    def get(self, key: str) -> Entry | None:
        """The clip's entry (now the most recently used), or None."""
        with self._lock:
            held = self._entries.get(key)
            if held is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return held[0]

    def put(self, key: str, features: dict[str, torch.Tensor], info: dict | None = None) -> bool:
        """Keep a clip's features (copied to the CPU, see the module docstring) -> whether they are held: False when
        they are larger than the whole cache. A key already held is only made the most recent."""
        size = nbytes(features)
        if size > self.capacity:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        entry = Entry({name: dense_copy(t) for name, t in features.items()}, dict(info or {}), source=MEMORY)
        with self._lock:
            if key in self._entries:  # put by another thread meanwhile
                self._entries.move_to_end(key)
                return True
            while self._bytes + size > self.capacity:
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed
                self._stats.evictions += 1
            self._entries[key] = (entry, size)
            self._bytes += size
        return True

    def keys(self) -> list[str]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def stats(self) -> MemoryStats:
        with self._lock:
            return MemoryStats(self._stats.hits, self._stats.misses, self._stats.evictions, len(self._entries),
                               self._bytes, self.capacity)
