"""The frozen towers with the encoder cache and the feature store in front of them: what a batch's clips become
before the projectors.

    towers = CachedTowers(model, store, memory=cache, settings=settings)   # store: a FeatureStore or None;
                                                                             # memory: a MemoryCache or None
    loader = MediaLoader(records, config, device, lookup=towers.lookup)
    for batch in loader:
        feats = towers.features(batch)                       # .vision (B, T, 196, mm), .audio (B, 500, hidden)

The loader asks `lookup` about each clip in its worker threads before decoding it: a clip whose features are in
the encoder cache (memory.py, keyed by settings.key(content hash)) or else in the store is read from there
instead (neither decoded nor run through a tower; a store hit is then kept in the cache too). The decoded clips
are asked about once more when their batch is used (a clip decoded ahead may have been computed since, by an
earlier batch that held it too, or by another rank): those are read as well, and only the rest go through the
towers, in one batch as without a cache, and into the cache and the store. The rows are then put together in the
batch's order, each one the exact tensor a tower gave (the towers give a clip the same values in any batch on
the CPU, tests/test_features.py), so a run reads the same numbers with and without them. BatchFeatures.sources
says, per clip, where its features came from: TOWERS, STORE or MEMORY.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from omni_fast.features.key import FeatureSettings, content_hash
from omni_fast.features.memory import MEMORY, MemoryCache
from omni_fast.features.store import STORE, Entry, FeatureStore, inverse_layout, layout

TOWERS = "towers"  # a clip's features were computed
SOURCES = (TOWERS, STORE, MEMORY)  # where a clip's features came from: computed, read from the store, the cache


@dataclass(slots=True)
class BatchFeatures:
    vision: torch.Tensor | None  # (B, T, 196, mm_hidden) SigLIP layer features; None when the modal has no video
    audio: torch.Tensor | None  # (B, 500, audio_hidden) pooled Whisper features; None when it has no audio
    sources: list[str] = field(default_factory=list)  # per clip: TOWERS (computed), STORE or MEMORY (read there)

    @property
    def hits(self) -> int:
        """Clips read (from the store or the encoder cache) instead of computed."""
        return len(self.sources) - self.misses

    @property
    def misses(self) -> int:
        return self.sources.count(TOWERS)


class CachedTowers:
    def __init__(self, model, store: FeatureStore | None = None, modal: str = "video_audio",
                 memory: MemoryCache | None = None, settings: FeatureSettings | None = None):
        self.model = model  # a HumanOmniForCausalLM (vision_features / audio_features)
        self.store = store
        self.memory = memory  # the encoder cache, keyed by settings.key(content)
        self.settings = store.settings if store is not None else settings
        if store is not None and settings is not None and settings != store.settings:
            raise ValueError("CachedTowers: the settings given differ from the store's: "
                             f"{'; '.join(store.settings.differences(settings.as_dict()))}")
        if memory is not None and self.settings is None:
            raise ValueError("CachedTowers: an encoder cache needs the FeatureSettings its keys are made with")
        self.modal = self.settings.modal if self.settings is not None else modal
        if self.settings is not None and modal != self.modal:
            raise ValueError(f"the features were keyed for modal {self.modal!r}, not {modal!r}")
        self.hits = self.misses = 0  # clips read (store or cache) / computed by the towers, since construction
        self._lock = threading.Lock()

    @property
    def lookup(self):
        """For MediaLoader(lookup=...): record -> its Entry from the encoder cache or the store, or None (neither,
        a miss, a missing file)."""
        return self._lookup if self.store is not None or self.memory is not None else None

    def _lookup(self, record) -> Entry | None:
        try:
            content = content_hash(record, self.settings.uses_audio)
        except OSError:  # a missing or unreadable clip: the loader decodes it and reports why it cannot
            return None
        key = self.settings.key(content)
        entry = self.memory.get(key) if self.memory is not None else None
        if entry is None and self.store is not None:
            entry = self.store.get(content)
            if entry is not None and self.memory is not None:
                self.memory.put(key, entry.features, entry.info)  # the next lookup reads memory
        return entry

    @torch.no_grad()
    def features(self, batch) -> BatchFeatures:
        """A MediaLoader batch (or anything with .frames, .mel and .records: every clip decoded) -> its clips'
        tower features, in record order, on the model's device; the clips the towers computed are put into the
        store."""
        found = _found(batch)
        decoded = [i for i, entry in enumerate(found) if entry is None]  # frames[k] / mel[k]: clip decoded[k]
        if self.lookup is not None:
            for i in decoded:  # computed since the loader asked (see the module docstring)
                found[i] = self._lookup(batch.records[i])
        keep = [k for k, i in enumerate(decoded) if found[i] is None]
        frames, mel = _rows(batch.frames, keep, len(decoded)), _rows(batch.mel, keep, len(decoded))
        uses_video, uses_audio = self.modal != "audio", self.modal != "video"
        vision = self.model.vision_features(frames) if uses_video and keep else None  # (K, T, 196, mm)
        audio = self.model.audio_features(mel) if uses_audio and keep else None  # (K, 500, audio_hidden)
        if keep:
            clips = getattr(batch, "clips", None)
            self._put([batch.records[decoded[k]] for k in keep], vision, audio,
                      [clips[k] for k in keep] if clips else None)
        sources = [TOWERS if entry is None else entry.source for entry in found]
        with self._lock:
            self.hits, self.misses = self.hits + len(found) - len(keep), self.misses + len(keep)
        if len(keep) == len(found):
            return BatchFeatures(vision, audio, sources)
        device = self.model.lm_head_weight.device
        return BatchFeatures(_merge("vision", vision, found, device) if uses_video else None,
                             _merge("audio", audio, found, device) if uses_audio else None, sources)

    def put(self, batch, vision: torch.Tensor | None, audio: torch.Tensor | None) -> list[int]:
        """Store the features the towers gave all of a batch's decoded clips (row k of vision / audio is clip
        batch.decoded[k]); -> the bytes written per decoded clip (0: not written, see FeatureStore.put)."""
        found = _found(batch)
        records = [r for r, entry in zip(batch.records, found) if entry is None]
        return self._put(records, vision, audio, getattr(batch, "clips", None))

    def _put(self, records: list, vision: torch.Tensor | None, audio: torch.Tensor | None,
             clips: list | None) -> list[int]:
        """Each computed clip into the encoder cache and the store -> the bytes written to the store per clip."""
        writing = self.store is not None and self.store.writable
        if not writing and self.memory is None:
            return [0] * len(records)
        vision = vision.cpu() if vision is not None else None  # one copy off the device for the whole batch
        audio = audio.cpu() if audio is not None else None
        out = []
        for k, record in enumerate(records):
            try:
                content = content_hash(record, self.settings.uses_audio)
            except OSError:  # the file went away after it was decoded: nothing to key the features by
                out.append(0)
                continue
            feats = {name: t[k] for name, t in (("vision", vision), ("audio", audio)) if t is not None}
            info = {} if not clips else {"indices": clips[k].indices, "num_frames_total": clips[k].num_frames_total,
                                         "audio_seconds": clips[k].audio_seconds,
                                         "audio_fallback": clips[k].audio_fallback}
            if self.memory is not None:
                self.memory.put(self.settings.key(content), feats, info)
            out.append(self.store.put(content, feats, info) if writing else 0)
        return out


def _found(batch) -> list:
    """Per record, its stored entry or None (decoded); a batch without `found` had every clip decoded."""
    found = getattr(batch, "found", None)
    return list(found) if found is not None else [None] * len(batch.records)


def _rows(t: torch.Tensor | None, keep: list[int], total: int) -> torch.Tensor | None:
    """t's rows `keep` (t itself when that is all of its `total` rows: no copy; None for an input the batch does not
    have, such as a server's video-only clip's mel)."""
    return t if t is None or len(keep) == total else t[torch.tensor(keep, dtype=torch.long, device=t.device)]


def _merge(name: str, computed: torch.Tensor | None, found: list, device: torch.device) -> torch.Tensor:
    """One row per clip, from the store (found) or the towers (the others, in order), in record order, in a batch
    with the memory layout the towers give one (the store keeps each row's): the same strides either way, so the
    projectors run the same kernels on it."""
    computed_rows = iter(computed) if computed is not None else iter(())
    rows = [next(computed_rows) if entry is None else entry.features[name] for entry in found]
    order = [0] + [d + 1 for d in layout(rows[0])]  # the batch dim outermost, then the rows' memory order
    shape = (len(rows), *rows[0].shape)
    out = torch.empty([shape[d] for d in order], dtype=rows[0].dtype, device=device).permute(inverse_layout(order))
    for i, row in enumerate(rows):
        out[i].copy_(row, non_blocking=True)
    return out
