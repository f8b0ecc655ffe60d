"""The frozen towers with the feature store in front of them: what a batch's clips become before the projectors.

    towers = CachedTowers(model, store)                      # store: a FeatureStore, or None (no store)
    loader = MediaLoader(records, config, device, lookup=towers.lookup)
    for batch in loader:
        vision, audio = towers.features(batch)               # (B, T, 196, mm), (B, 500, audio_hidden)

The loader asks `lookup` about each clip in its worker threads before decoding it: a clip whose entry is in the
store is read from there instead (neither decoded nor run through a tower); the others are decoded, their
features computed by the towers in one batch as without a store, and put into the store. The rows are then put
together in the batch's order, each one the exact tensor a tower gave (the towers give a clip the same values
in any batch on the CPU, tests/test_features.py), so a run reads the same numbers with and without the store.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from omni_fast.features.key import content_hash
from omni_fast.features.store import Entry, FeatureStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchFeatures:
    vision: torch.Tensor | None  # (B, T, 196, mm_hidden) SigLIP layer features; None when the modal has no video
    audio: torch.Tensor | None  # (B, 500, audio_hidden) pooled Whisper features; None when it has no audio
    hits: int = 0  # clips read from the store
    misses: int = 0  # clips decoded and run through the towers


class CachedTowers:
    def __init__(self, model, store: FeatureStore | None = None, modal: str = "video_audio"):
        self.model = model  # a HumanOmniForCausalLM (vision_features / audio_features)
        self.store = store
        self.modal = store.settings.modal if store is not None else modal
        if store is not None and modal != self.modal:
            raise ValueError(f"the store was opened for modal {self.modal!r}, not {modal!r}")

    @property
    def lookup(self):
        """For MediaLoader(lookup=...): record -> its stored Entry, or None (no store, a miss, a missing file)."""
        return self._lookup if self.store is not None else None

    def _lookup(self, record) -> Entry | None:
        try:
            content = content_hash(record, self.store.settings.uses_audio)
        except OSError:  # a missing or unreadable clip: the loader decodes it and reports why it cannot
            return None
        return self.store.get(content)

    @torch.no_grad()
    def features(self, batch) -> BatchFeatures:
        """A MediaLoader batch -> its clips' tower features, in record order, on the model's device; the decoded
        clips' features are put into the store."""
        rows = batch.decoded
        uses_video, uses_audio = self.modal != "audio", self.modal != "video"
        vision = self.model.vision_features(batch.frames) if uses_video and rows else None  # (D, T, 196, mm)
        audio = self.model.audio_features(batch.mel) if uses_audio and rows else None  # (D, 500, audio_hidden)
        if self.store is not None and rows:
            self.put(batch, vision, audio)
        hits = len(batch) - len(rows)
        if not hits:
            return BatchFeatures(vision, audio, hits=0, misses=len(rows))
        device = self.model.lm_head_weight.device
        return BatchFeatures(_merge("vision", vision, batch, device) if uses_video else None,
                             _merge("audio", audio, batch, device) if uses_audio else None, hits=hits,
                             misses=len(rows))

    def put(self, batch, vision: torch.Tensor | None, audio: torch.Tensor | None) -> list[int]:
        """Store the features the towers gave the batch's decoded clips (row k of vision / audio is clip
        batch.decoded[k]); -> the bytes written per decoded clip (0: not written, see FeatureStore.put)."""
        rows = batch.decoded
        if self.store is None or not self.store.writable:
            return [0] * len(rows)
        vision = vision.cpu() if vision is not None else None  # one copy off the device for the whole batch
        audio = audio.cpu() if audio is not None else None
        out = []
        for k, i in enumerate(rows):
            try:
                content = content_hash(batch.records[i], self.store.settings.uses_audio)
            except OSError:  # the file went away after it was decoded: nothing to key the features by
                out.append(0)
                continue
            feats = {name: t[k] for name, t in (("vision", vision), ("audio", audio)) if t is not None}
            info = batch.clips[k]
            out.append(self.store.put(content, feats, {
                "indices": info.indices, "num_frames_total": info.num_frames_total,
                "audio_seconds": info.audio_seconds, "audio_fallback": info.audio_fallback}))
        return out


def _merge(name: str, computed: torch.Tensor | None, batch, device: torch.device) -> torch.Tensor:
    """One tensor per batch row, from the store (found) or the towers (decoded), stacked in record order."""
    rows: list[torch.Tensor | None] = [None] * len(batch)
    for k, i in enumerate(batch.decoded):
        rows[i] = computed[k]
    for i, entry in enumerate(batch.found):
        if entry is not None:
            rows[i] = entry.features[name].to(device, non_blocking=True)
    return torch.stack(rows)
