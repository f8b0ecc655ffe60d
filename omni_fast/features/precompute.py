"""`omni-fast cache-features`: fill a feature store ahead of training or evaluation, data-parallel, resumable.

    omni-fast cache-features --annotations train.json --video_root /data --model_path ./R1-Omni-0.5B \\
        --tower_cache_dir /fast/tower-cache [--aspect pad|stretch]
    torchrun --nproc_per_node 8 $(which omni-fast) cache-features ...      # every rank takes its share

Steps: every rank hashes its share of the clips (entry i goes to rank i % world_size) and the ranks exchange the
hashes; each distinct clip content is computed by the rank that hashed its first entry, so no two ranks compute
(or write) one entry, and entries repeating a clip are skipped. Clips whose entry is in the store already are
skipped (a rerun after an interruption does only what is left); the rest are decoded, run through the towers in
batches and put into the store. The summary counts the clips computed, those skipped with their reasons, and
the bytes written.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from omni_fast import distributed
from omni_fast.config import LoaderConfig
from omni_fast.features.key import content_hash
from omni_fast.features.store import FeatureStore
from omni_fast.features.towers import CachedTowers
from omni_fast.media.loader import MediaLoader

log = logging.getLogger(__name__)
# why an entry was not computed
SKIP_KINDS = {"missing": "clip file missing or unreadable", "duplicate": "same clip content as an earlier entry",
              "undecodable": "clip could not be decoded", "not stored": "computed but not written",
              "bad entry": "malformed annotation entry"}


@dataclass(slots=True)
class CacheSummary:
    entries: int = 0  # annotation entries given
    computed: int = 0  # clips decoded, encoded and written now
    stored: int = 0  # clips whose entry was there already
    bytes_written: int = 0  # bytes of the entries written now
    skipped: list[dict] = field(default_factory=list)  # {"index", "path", "kind", "reason"} per entry not computed

    def kinds(self) -> Counter:
        """How many entries were skipped per kind (SKIP_KINDS)."""
        return Counter(s["kind"] for s in self.skipped)

    def as_dict(self) -> dict:
        return {"entries": self.entries, "computed": self.computed, "stored": self.stored,
                "bytes_written": self.bytes_written, "skipped": self.skipped}


def cache_features(records: list, model, store: FeatureStore, loader: LoaderConfig, device: torch.device,
                   ctx: distributed.DistContext | None = None, progress: bool = True) -> CacheSummary:
    """Compute and store the features of every record's clip not in `store` yet (this rank's share under
    torchrun); returns the whole job's summary on every rank."""
    ctx = ctx or distributed.DistContext(device=device)
    uses_audio = store.settings.uses_audio
    mine = records[ctx.rank::ctx.world_size]
    with ThreadPoolExecutor(max(1, loader.workers)) as pool:
        hashes = list(pool.map(lambda r: _hash(r, uses_audio), mine))
    every = [pair for part in distributed.all_gather_objects(ctx, [(r.index, h) for r, h in zip(mine, hashes)])
             for pair in part]
    first: dict[str, int] = {}
    for index, h in sorted(every, key=lambda p: p[0]):
        if not h.startswith("!"):
            first.setdefault(h, index)
    summary = CacheSummary(entries=len(records))
    todo = []
    for r, h in zip(mine, hashes):
        if h.startswith("!"):
            summary.skipped.append(_skip(r, "missing", h[1:]))
        elif first[h] != r.index:
            summary.skipped.append(_skip(r, "duplicate", f"same content as entry {first[h]}"))
        elif store.has(h):
            summary.stored += 1
        else:
            todo.append(r)
    summary.computed, summary.bytes_written = _compute(todo, model, store, loader, device, summary, progress and
                                                       ctx.is_main, ctx.world_size)
    return _gather(ctx, summary)


def _hash(record, uses_audio: bool) -> str:
    """The record's content hash, or "!" + why it has none."""
    try:
        return content_hash(record, uses_audio)
    except FileNotFoundError as e:
        return f"!{e.filename}: no such file"
    except OSError as e:
        return f"!{e.filename}: cannot read it ({e.strerror})"


def _skip(record, kind: str, reason: str) -> dict:
    return {"index": record.index, "path": str(record.video), "kind": kind, "reason": reason}


def _compute(todo: list, model, store: FeatureStore, loader: LoaderConfig, device: torch.device,
             summary: CacheSummary, progress: bool, world: int) -> tuple[int, int]:
    """Decode, encode and put `todo`; -> (clips written, bytes written). Clips not written are listed."""
    towers = CachedTowers(model, store)
    uses_video, uses_audio = store.settings.uses_video, store.settings.uses_audio
    written = nbytes = 0
    bar = tqdm(total=len(todo), unit="clip", disable=not progress or not todo,
               desc="tower features" + (f" (rank 0 of {world})" if world > 1 else ""))
    with bar, torch.no_grad():
        for batch in MediaLoader(todo, dataclasses.replace(loader, on_error="skip"), device):
            for f in batch.failures:
                summary.skipped.append(_skip(todo[f.index], "undecodable", f.error))
            if len(batch):
                vision = model.vision_features(batch.frames) if uses_video else None
                audio = model.audio_features(batch.mel) if uses_audio else None
                for record, size in zip(batch.records, towers.put(batch, vision, audio)):
                    if size:
                        written, nbytes = written + 1, nbytes + size
                    else:
                        why = "already stored by another process" if store.writable else \
                            f"not stored: writing to the store failed ({store.write_error})"
                        summary.skipped.append(_skip(record, "not stored", why))
            bar.update(len(batch) + len(batch.failures))
    return written, nbytes


def _gather(ctx: distributed.DistContext, summary: CacheSummary) -> CacheSummary:
    parts = distributed.all_gather_objects(ctx, summary.as_dict())
    out = CacheSummary(entries=summary.entries)
    for p in parts:
        out.computed += p["computed"]
        out.stored += p["stored"]
        out.bytes_written += p["bytes_written"]
        out.skipped += p["skipped"]
    out.skipped.sort(key=lambda s: s["index"])
    return out
