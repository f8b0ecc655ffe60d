"""One request's clip -> the engine's input: prompt embeddings built by OmniModel itself, and the cache key.

The prompt is OmniModel.prompt_embeds' (the reference inference prompt through the checkpoint's chat template,
the encoders' outputs spliced in), and max_tokens is capped by OmniModel.fit_positions: the same code
`omni-fast infer` runs, so a greedy request gets infer's text. The decoded clip is preprocessed once, by
the worker that decoded it when the model runs on the CPU, else on the loop thread on the model's device (as
the media loader does it for infer).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_fast.config import SamplingParams
from omni_fast.serve.chat import ChatInput, MediaRef
from omni_fast.serve.config import ServeConfig
from omni_fast.serve.loop import Prepared
from omni_fast.serve.media import (DecodedMedia, decode, file_hash, local_file, preprocess, probe, scheme,
                                   write_fetched, write_inline)
from omni_fast.serve.protocol import ServeError

REMOTE = ("http", "https")


@dataclass(slots=True)
class ClipInput:
    media: DecodedMedia  # the decoded frames / samples
    modal: str  # video_audio, video or audio
    content_key: str  # what identifies the clip: its parts' content hashes and the modality
    frames: torch.Tensor | None = None  # (1, T, 3, 224, 224) once preprocessed
    mel: torch.Tensor | None = None  # (1, n_mels, 3000) once preprocessed
    ready: bool = False

    def tensors(self, n_mels: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.ready:
            self.frames, self.mel = preprocess(self.media, n_mels, device)
            self.ready = True
        return self.frames, self.mel


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


def load_clip(chat: ChatInput, fetched: dict[str, bytes], config: ServeConfig, num_frames: int, n_mels: int,
              device: torch.device) -> ClipInput:
    """In a worker: the request's parts as files (inline data and fetched bytes written to a temporary directory,
    removed before returning), probed (length limit, streams, hence the modality), decoded, hashed, and on the
    CPU preprocessed. `fetched`: the bytes of the remote parts, by kind."""
    workdir = Path(tempfile.mkdtemp(prefix="omni-serve-"))
    try:
        files = {ref.kind: (ref, _file(ref, fetched, config, workdir)) for ref in (chat.video, chat.audio)
                 if ref is not None}
        probes = {kind: probe(ref, path, config.max_clip_seconds) for kind, (ref, path) in files.items()}
        modal = chat.modal(video_has_audio="video" in probes and probes["video"].has_audio)
        media = decode(files.get("video"), files.get("audio"), modal, num_frames, config.max_clip_seconds)
        clip = ClipInput(media, modal, content_key([file_hash(path) for _, path in files.values()], modal))
        if device.type == "cpu":
            clip.tensors(n_mels, device)
        return clip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def content_key(hashes: list[str], modal: str) -> str:
    return hashlib.sha256(json.dumps([hashes, modal]).encode()).hexdigest()


def prefix_cache_key(clip: ClipInput, chat: ChatInput) -> str:
    """Everything the prompt embeddings depend on besides the weights: the clip, the modality, the system turn
    and the question (which the BERT gate reads too)."""
    return hashlib.sha256(json.dumps([clip.content_key, chat.system, chat.question]).encode()).hexdigest()


def prepare(model, clip: ClipInput, chat: ChatInput, params: SamplingParams, name: str) -> Prepared:
    """On the loop thread: encoders, projectors, BERT gate and splicing, then max_tokens fitted to the positions
    the prompt leaves (a prompt that leaves none is a 400)."""
    frames, mel = clip.tensors(model.model.towers.audio.num_mel_bins, model.device)
    embeds = model.prompt_embeds(frames, mel, [chat.question], clip.modal, chat.system)[0]
    try:
        fitted = model.fit_positions([embeds], params, [name])[0]
    except ValueError as e:
        raise ServeError(400, str(e)) from None
    return Prepared(prompt=embeds, params=fitted, cache_key=prefix_cache_key(clip, chat))
