"""MediaLoader: batches of preprocessed clips decoded ahead of use, so decoding overlaps the GPU's work.

    loader = MediaLoader(records, LoaderConfig(batch_size=32), device="cuda")
    for batch in loader:            # batch.frames (B, 8, 3, 224, 224), batch.mel (B, 128, 3000) on the device
        train_step(batch.frames, batch.mel, batch.records)

records: anything with a `.video` path (and optionally `.audio`), e.g. omni_fast.data.Record, or plain
paths. Batch k holds records [k*B, (k+1)*B) in order, less the clips that failed: with on_error="skip" each
failure is logged (one line naming the file, logger omni_fast.media.loader) and listed in batch.failures;
with "raise" the first one raises its MediaError. `prefetch` batches beyond the one being consumed are decoded
in the background.

Backends (one is picked per loader):
  dali  omni_fast.media.dali.DaliMedia: NVDEC decode + device-side preprocessing, one batch at a time in a
        background thread; the loader's thread pool serves its frame-count probes and the (PyAV) audio.
  pyav  the PyAV path (load_clip's semantics) in a pool of `workers` threads, one clip per task. Threads, not
        processes: PyAV decodes and converts with the GIL released, so threads decode in parallel as processes
        would, while they skip pickling ~6 MB of frames per clip and share the CUDA context. On a CUDA device
        workers only decode (uint8 frames + 16 kHz samples) and the resize, normalisation and log-mel run on
        the GPU in the consuming thread; on the CPU the workers run the whole of load_clip.
"auto" is dali when nvidia.dali imports and the device is CUDA, else pyav.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from omni_fast.config import LoaderConfig
from omni_fast.devices import resolve_device
from omni_fast.media import dali as mdali
from omni_fast.media.pyav import Clip, DecodedClip, MediaError, decode_clip, or_error, preprocess_clip

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Failure:
    index: int  # position of the record in the loader's list
    path: str  # the clip that could not be used
    error: str  # why (the MediaError's message)


@dataclass(slots=True)
class ClipInfo:
    indices: list[int]  # the sampled frame indices
    num_frames_total: int  # N the indices were taken over
    audio_seconds: float  # decoded audio length (0 with the fallback silence)
    audio_fallback: bool  # True when the clip had no usable audio


@dataclass(slots=True)
class Batch:
    frames: torch.Tensor  # (B, num_frames, 3, 224, 224) float32, SigLIP-normalised, on the device
    mel: torch.Tensor  # (B, n_mels, 3000) float32 Whisper log-mel, on the device
    records: list[Any]  # the B records, in order
    clips: list[ClipInfo]  # per clip: indices, N, audio facts
    failures: list[Failure]  # records of this batch's range that were skipped
    positions: list[int]  # index of each of the B records in the loader's list

    def __len__(self) -> int:
        return len(self.records)


def _paths(record) -> tuple[Path, Path | None]:
    if isinstance(record, (str, Path)):
        return Path(record), None
    audio = getattr(record, "audio", None)
    return Path(record.video), None if audio is None else Path(audio)


class MediaLoader:
    def __init__(self, records: Sequence[Any], config: LoaderConfig | None = None,
                 device: torch.device | str | None = None):
        self.records = list(records)
        self.config = config or LoaderConfig()
        self.device = resolve_device(device)
        self.backend = self._pick_backend()

    def _pick_backend(self) -> str:
        wanted = self.config.backend
        if wanted == "auto":
            return "dali" if mdali.available() and self.device.type == "cuda" else "pyav"
        if wanted == "dali" and not mdali.available():
            raise ImportError(f"LoaderConfig.backend='dali' but NVIDIA DALI is not installed; {mdali.INSTALL_HINT}")
        return wanted

    def __len__(self) -> int:
        return -(-len(self.records) // self.config.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        cfg = self.config
        pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="omni-media")
        dali_thread = ThreadPoolExecutor(1, thread_name_prefix="omni-dali") if self.backend == "dali" else None
        dali = (mdali.DaliMedia(self.device, cfg.batch_size, cfg.dali_threads, cfg.aspect, cfg.num_frames,
                                cfg.n_mels) if dali_thread is not None else None)
        pending: deque[tuple[range, Any]] = deque()
        starts = iter(range(0, len(self.records), cfg.batch_size))

        def top_up(depth: int) -> None:
            while len(pending) < depth and (start := next(starts, None)) is not None:
                pending.append(self._submit(start, pool, dali_thread, dali))

        try:
            while True:
                top_up(cfg.prefetch + 1)  # the batch to collect next, and `prefetch` behind it
                if not pending:
                    return
                span, handle = pending.popleft()
                batch = self._collect(span, handle)
                top_up(cfg.prefetch)  # `prefetch` batches decode while the caller works on this one
                yield batch
        finally:
            for _, handle in pending:
                for f in handle if isinstance(handle, list) else [handle]:
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            if dali_thread is not None:
                dali_thread.shutdown(wait=True, cancel_futures=True)

    # --- submitting work ------------------------------------------------------------------------------------------
    def _submit(self, start: int, pool: Executor, dali_thread: Executor | None, dali) -> tuple[range, Any]:
        span = range(start, min(start + self.config.batch_size, len(self.records)))
        paths = [_paths(self.records[i]) for i in span]
        if dali_thread is not None:
            videos, audios = zip(*paths)
            return span, dali_thread.submit(dali.load, list(videos), list(audios), pool, self.config.audio)
        # on the CPU the workers preprocess too; on a GPU they only decode and the GPU preprocesses in _collect
        on = self.device if self.device.type == "cpu" else None
        return span, [pool.submit(_load, video, audio, self.config, on) for video, audio in paths]

    # --- collecting a batch ---------------------------------------------------------------------------------------
    def _collect(self, span: range, handle) -> Batch:
        if isinstance(handle, Future):  # DALI: one future for the whole batch
            results = handle.result()
        else:
            results = [or_error(f.result) for f in handle]
        clips, failures, positions = [], [], []
        for i, result in zip(span, results):
            if isinstance(result, MediaError):
                self._fail(i, result, failures)
                continue
            clips.append(result if isinstance(result, Clip) else
                         preprocess_clip(result, self.config.aspect, self.config.n_mels, self.device))
            positions.append(i)
        return self._stack(clips, failures, positions)

    def _fail(self, i: int, error: MediaError, failures: list[Failure]) -> None:
        path = str(_paths(self.records[i])[0])
        if self.config.on_error == "raise":
            raise error
        log.warning("skipping clip %d: %s", i, error)  # a MediaError's message starts with the path
        failures.append(Failure(index=i, path=path, error=str(error)))

    def _stack(self, clips: list[Clip], failures: list[Failure], positions: list[int]) -> Batch:
        cfg = self.config
        if clips:
            frames = torch.stack([c.frames for c in clips]).to(self.device)
            mel = torch.stack([c.mel for c in clips]).to(self.device)
        else:
            frames = torch.empty(0, cfg.num_frames, 3, 224, 224, device=self.device)
            mel = torch.empty(0, cfg.n_mels, 3000, device=self.device)
        infos = [ClipInfo(c.indices, c.num_frames_total, c.audio_seconds, c.audio_fallback) for c in clips]
        return Batch(frames=frames, mel=mel, records=[self.records[i] for i in positions], clips=infos,
                     failures=failures, positions=positions)


def _load(video: Path, audio: Path | None, cfg: LoaderConfig, device: torch.device | None) -> Clip | DecodedClip:
    """load_clip's steps, with the audio read from `audio` when the record names a file; preprocessed on
    `device` when one is given, else returned decoded for the consumer to preprocess on its device."""
    raw = decode_clip(video, cfg.num_frames, cfg.audio, audio)
    return raw if device is None else preprocess_clip(raw, cfg.aspect, cfg.n_mels, device)
