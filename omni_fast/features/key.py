"""What a clip's tower features are keyed by: the one definition, for the disk store and any in-memory cache.

The frozen towers turn a clip into the same features every time as long as nothing below changes, so a
clip's features are named by

    FeatureSettings  everything but the clip: the towers (a fingerprint of their weights and configs, which
                     includes the dtype they run in), the device type they run on, the media path (decoder
                     backend and audio resampler, omni_fast.media.loader.media_path), the preprocessing version
                     (omni_fast.media.loader.PREPROCESS_VERSION), num_frames, aspect ("pad" trains, "stretch"
                     infers), modal and n_mels;
    content          the SHA-256 of the clip's file (and of its separate audio file where the features use one).

`FeatureSettings.key(content)` is the clip's key. A clip whose file changes gets another content hash, so
features of its old bytes are never served; a clip whose file is missing has no key (a miss).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_fast.config import LoaderConfig
from omni_fast.media.loader import PREPROCESS_VERSION, media_path, resolve_backend
from omni_fast.model.prompt import MODALS

_CHUNK = 1 << 20  # bytes hashed per read
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tower module -> its fingerprint
_contents: OrderedDict[tuple, str] = OrderedDict()  # (path, device, inode, size, mtime_ns, ctime_ns) -> SHA-256
_CONTENTS_KEPT = 1 << 16  # files remembered, least recently used out (a server hashes new temporary files)
_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class FeatureSettings:
    """Everything but the clip that a clip's tower features depend on."""
    towers: str  # towers_fingerprint(): SHA-256 of both towers' weights (in the dtype they run in) and configs
    dtype: str  # the dtype the towers run in, which is the stored features' dtype ("bfloat16", ...)
    device: str  # device type the towers run on ("cpu", "cuda"): their kernels round differently
    media: str  # decoder backend + audio resampler (omni_fast.media.loader.media_path)
    preprocess: int  # omni_fast.media.loader.PREPROCESS_VERSION
    num_frames: int  # frames sampled per clip
    aspect: str  # "pad" (training) or "stretch" (inference)
    modal: str  # "video_audio", "video" or "audio": which towers' features an entry holds
    n_mels: int  # Whisper mel bins

    def __post_init__(self) -> None:
        if self.aspect not in ("pad", "stretch"):
            raise ValueError(f"FeatureSettings.aspect {self.aspect!r}: expected 'pad' or 'stretch'")
        if self.modal not in MODALS:
            raise ValueError(f"FeatureSettings.modal {self.modal!r}: expected one of {MODALS}")
        if self.num_frames < 1 or self.n_mels < 1:
            raise ValueError(f"FeatureSettings.num_frames and n_mels must be >= 1, got {self.num_frames}, "
                             f"{self.n_mels}")

    @classmethod
    def of(cls, model, loader: LoaderConfig, device: torch.device, modal: str = "video_audio") -> FeatureSettings:
        """The settings of a run: `model` (a HumanOmniForCausalLM) with the clips `loader` makes on `device`."""
        tower = model.model.vision_tower
        return cls(towers=towers_fingerprint(model), dtype=str(next(tower.parameters()).dtype).removeprefix("torch."),
                   device=torch.device(device).type, media=media_path(resolve_backend(loader.backend, device)),
                   preprocess=PREPROCESS_VERSION, num_frames=loader.num_frames, aspect=loader.aspect, modal=modal,
                   n_mels=loader.n_mels)

    @property
    def uses_video(self) -> bool:
        return self.modal != "audio"

    @property
    def uses_audio(self) -> bool:
        return self.modal != "video"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        """16 hex digits naming these settings (the store's folder for them)."""
        return _digest(self)

    def key(self, content: str) -> str:
        """The key of one clip's features under these settings (content: content_hash())."""
        return f"{self.digest}-{content}"

    def differences(self, other: dict) -> list[str]:
        """'field: X there, Y here' for each field where `other` (another settings dict) differs."""
        mine = self.as_dict()
        return [f"{k}: {other.get(k)!r} there, {v!r} here" for k, v in mine.items() if other.get(k) != v] + \
               [f"{k}: {other[k]!r} there, absent here" for k in sorted(set(other) - set(mine))]


@functools.lru_cache(maxsize=64)
def _digest(settings: FeatureSettings) -> str:
    return hashlib.sha256(json.dumps(settings.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def towers_fingerprint(model) -> str:
    """SHA-256 over both towers' configs, the SigLIP layer they stop at, and every parameter and buffer (name,
    dtype, shape, bytes) as loaded: towers with other weights, another dtype or another select layer give another
    fingerprint. Computed once per tower module (about a second for Whisper-large-v3's 1.3 GB in bf16)."""
    towers = (model.model.vision_tower, model.model.audio_tower)
    with _lock:
        cached = [_fingerprints.get(t) for t in towers]
    if all(c is not None for c in cached):
        return hashlib.sha256("".join(cached).encode()).hexdigest()
    parts = [_tower_digest(t) for t in towers]
    with _lock:
        for t, d in zip(towers, parts):
            _fingerprints[t] = d
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def _tower_digest(tower: torch.nn.Module) -> str:
    h = hashlib.sha256()
    config = {k: v for k, v in tower.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "architectures", "name_or_path")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"run_layers={getattr(tower, 'num_layers_run', None)}".encode())
    for name, t in sorted([*tower.named_parameters(), *tower.named_buffers()], key=lambda kv: kv[0]):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, inode, size, mtime, ctime) for the process (the last
    _CONTENTS_KEPT files): a file rewritten in place changes its mtime and ctime, so it is hashed again.
    FileNotFoundError when missing."""
    path = Path(path)
    st = os.stat(path)
    memo = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _lock:
        known = _contents.get(memo)
        if known is not None:
            _contents.move_to_end(memo)
    if known is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _contents[memo] = digest
        while len(_contents) > _CONTENTS_KEPT:
            _contents.popitem(last=False)
    return digest


def content_hash(record, uses_audio: bool = True) -> str:
    """The content hash of a clip: its video file's SHA-256, combined with its separate audio file's where the
    record names one (`.audio`) and the features use audio. record: a path or anything with `.video`.
    FileNotFoundError when a file is missing."""
    if isinstance(record, (str, Path)):
        return file_hash(record)
    video = file_hash(record.video)
    audio = getattr(record, "audio", None)
    if audio is None or not uses_audio:
        return video
    return hashlib.sha256(f"video:{video}\naudio:{file_hash(audio)}".encode()).hexdigest()
