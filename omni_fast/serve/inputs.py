"""One request's clip -> the engine's input, through OmniModel's own steps: its cache key, its towers (with the
feature caches in front of them), its prompt.

    worker pool:  parts -> files -> probed (limits, modality) -> keyed -> looked up in the feature caches
                  -> decoded and preprocessed (only when not found there)             load_clip -> ClipInput
    loop thread:  tower features (cached, or computed and cached) -> projectors, gate, splicing
                  -> max_tokens fitted to the positions left                          prepare -> Prepared

A clip is keyed as `omni-fast infer` keys it: the prefix-cache key is OmniModel.prefix_key (the clip's bytes
through omni_fast.features.key.content_hash, the modality, the inference aspect, the question, the system turn),
and the tower features go through OmniModel's towers for the modality (a tower-feature store given by
--tower_cache_dir, and any cache OmniModel keeps in front of them). So the same clip asked the same question
hits the same caches whether it came as a data: URL, a path or a fetched URL, from the API, the page or
OmniModel.generate in the same process. The prompt is the reference inference prompt (OmniModel.feature_embeds)
and max_tokens is capped by OmniModel.fit_positions: the code `omni-fast infer` runs, so a greedy request gets
infer's text.

Requests for the same clip that arrive together decode it once (Decoding: the first decodes, the others wait
for its frames and samples; if it fails, each decodes for itself, so each gets the error that names its own
part): clips drawn from a pool with repeats would otherwise all be decoded before the first is in the caches.

The request's temporary files (inline and fetched parts) live until its prompt is built, since the caches hash
and store clips by their files; ClipInput.close removes them (idempotent, called by prepare and by the handler).
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from omni_fast.config import SamplingParams
from omni_fast.features.key import content_hash
from omni_fast.serve.chat import ChatInput, MediaRef
from omni_fast.serve.config import ServeConfig
from omni_fast.serve.loop import Prepared
from omni_fast.serve.media import (ASPECT, DecodedMedia, decode, local_file, preprocess, probe, scheme,
                                   write_fetched, write_inline)
from omni_fast.serve.protocol import ServeError

REMOTE = ("http", "https")


@dataclass(frozen=True, slots=True)
class ClipFiles:
    """A clip given as a video part and a separate audio part (what OmniModel's records with `.audio` are)."""
    video: str
    audio: str


@dataclass(slots=True)
class _OneClip:
    """One clip as omni_fast.features.towers.CachedTowers reads a loader batch."""
    records: list[Any]
    frames: torch.Tensor | None  # (1, T, 3, 224, 224), or None when found or the modality has no video
    mel: torch.Tensor | None  # (1, n_mels, 3000), or None when found or the modality has no audio
    found: list[Any]  # [the cached features' entry, or None: decoded]


@dataclass(slots=True)
class ClipInput:
    modal: str  # video_audio, video or audio
    record: str | ClipFiles  # the clip's file(s), as OmniModel keys a clip
    cache_key: str | None  # the engine's prefix-cache key (OmniModel.prefix_key); None: no reuse
    towers: Any  # OmniModel's towers for this modality (omni_fast.features.towers.CachedTowers)
    found: Any  # the clip's features from the towers' caches (then nothing was decoded), or None
    media: DecodedMedia | None  # the decoded frames / samples; None when found
    workdir: Path  # the request's temporary files
    frames: torch.Tensor | None = None  # (1, T, 3, 224, 224) once preprocessed
    mel: torch.Tensor | None = None  # (1, n_mels, 3000) once preprocessed
    ready: bool = False

    def tensors(self, n_mels: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.ready and self.media is not None:
            self.frames, self.mel = preprocess(self.media, n_mels, device)
        self.ready = True
        return self.frames, self.mel

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


class Decoding:
    """The clips being decoded now, by content: a second request for one waits for the first's decoding."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[tuple, Future] = {}
        self.shared = 0  # decodings a request took from another's (for tests and metrics)

    def once(self, key: tuple | None, decode: Callable[[], Any]) -> Any:
        """decode(), or the result of the same clip's decode() running in another worker (key None: no sharing)."""
        if key is None:
            return decode()
        with self._lock:
            running = self._running.get(key)
            if running is None:
                mine = self._running[key] = Future()
        if running is not None:
            try:
                media = running.result()
            except Exception:  # noqa: BLE001 - its error names its request's part: decode for this one
                return decode()
            with self._lock:
                self.shared += 1
            return media
        try:
            media = decode()
            mine.set_result(media)
            return media
        except BaseException as e:
            mine.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._running[key]


def is_remote(ref: MediaRef) -> bool:
    return ref.url is not None and scheme(ref.url) in REMOTE


def _file(ref: MediaRef, fetched: dict[str, bytes], config: ServeConfig, workdir: Path) -> Path:
    if ref.kind in fetched:
        return write_fetched(ref, fetched[ref.kind], workdir)
    kind = "data" if ref.url is None else scheme(ref.url)
    if kind == "data":
        return write_inline(ref, workdir)
    if kind in ("file", "path"):
        return local_file(ref, config.allowed_local_media_path)
    raise ServeError(400, f"{ref.where}: URL scheme {kind!r} is not supported; expected a data: URL, a file:// URL, "
                          "a path, or http(s)", ref.where)


def _record(paths: dict[str, Path]) -> str | ClipFiles:
    if "video" in paths and "audio" in paths:
        return ClipFiles(str(paths["video"]), str(paths["audio"]))
    return str(next(iter(paths.values())))


def _content(record, modal: str) -> tuple | None:
    try:
        return content_hash(record, uses_audio=modal != "video"), modal
    except OSError:
        return None


def load_clip(model, chat: ChatInput, fetched: dict[str, bytes], config: ServeConfig,
              decoding: Decoding | None = None) -> ClipInput:
    """In a worker: the request's parts as files (inline data and fetched bytes written to a temporary directory),
    probed (length limit, streams, hence the modality), keyed, looked up in the towers' caches, and decoded (on the
    CPU also preprocessed) unless found there, once for the requests `decoding` holds at the same time.
    `model`: the OmniModel; `fetched`: the bytes of the remote parts, by kind."""
    workdir = Path(tempfile.mkdtemp(prefix="omni-serve-"))
    try:
        files = {ref.kind: (ref, _file(ref, fetched, config, workdir)) for ref in (chat.video, chat.audio)
                 if ref is not None}
        probes = {kind: probe(ref, path, config.max_clip_seconds) for kind, (ref, path) in files.items()}
        modal = chat.modal(video_has_audio="video" in probes and probes["video"].has_audio)
        record = _record({kind: path for kind, (_, path) in files.items()})
        key = (model.prefix_key(record, chat.question, modal, ASPECT, chat.system)
               if config.enable_prefix_caching else None)
        towers = model.cached_towers(modal, ASPECT)
        found = towers.lookup(record) if towers.lookup is not None else None
        clip = ClipInput(modal, record, key, towers, found, None, workdir)
        if found is None:
            def decoded() -> tuple[DecodedMedia, tuple | None]:  # the media, and on the CPU its tensors
                media = decode(files.get("video"), files.get("audio"), modal, model.config.num_frames,
                               config.max_clip_seconds)
                on_cpu = model.device.type == "cpu"
                return media, preprocess(media, model.model.towers.audio.num_mel_bins, model.device) if on_cpu else None

            clip.media, tensors = (decoding or Decoding()).once(_content(record, modal), decoded)
            if tensors is not None:
                (clip.frames, clip.mel), clip.ready = tensors, True
        return clip
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def prepare(model, clip: ClipInput, chat: ChatInput, params: SamplingParams, name: str) -> Prepared:
    """On the loop thread: tower features (from the caches or the towers), projectors, BERT gate and splicing, then
    max_tokens fitted to the positions the prompt leaves (a prompt that leaves none is a 400)."""
    try:
        frames, mel = clip.tensors(model.model.towers.audio.num_mel_bins, model.device)
        with torch.inference_mode():
            feats = clip.towers.features(_OneClip([clip.record], frames, mel, [clip.found]))
        embeds = model.feature_embeds(feats.vision, feats.audio, [chat.question], clip.modal, chat.system)[0]
    finally:
        clip.close()
    try:
        fitted = model.fit_positions([embeds], params, [name])[0]
    except ValueError as e:
        raise ServeError(400, str(e)) from None
    return Prepared(prompt=embeds, params=fitted, cache_key=clip.cache_key)
