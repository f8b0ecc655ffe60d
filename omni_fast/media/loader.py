"""MediaLoader: batches of preprocessed clips decoded ahead of use, so decoding overlaps the GPU's work.

    loader = MediaLoader(records, LoaderConfig(batch_size=32), device="cuda")
    for batch in loader:            # batch.frames (B, 8, 3, 224, 224), batch.mel (B, 128, 3000) on the device
        train_step(batch.frames, batch.mel, batch.records)

records: anything with a `.video` path (and optionally `.audio`), e.g. omni_fast.data.Record, or plain
paths. Batch k holds records [k*B, (k+1)*B) in order, less the clips that failed: with on_error="skip" each
failure is logged (one line naming the file, logger omni_fast.media.loader) and listed in batch.failures;
with "raise" the first one raises its MediaError. `prefetch` batches beyond the one being consumed are decoded
in the background.

lookup (optional): called with each record in the worker threads before the clip is decoded; a clip for which
it returns a value (not None) is not decoded, and the batch carries the value in `batch.found` instead (the
tower-feature store, omni_fast/features/, looks clips up this way). batch.frames / batch.mel then hold only the
decoded clips, rows `batch.decoded` of the batch.

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
from typing import Any, Callable, Iterator, Sequence

import torch

from omni_fast.config import LoaderConfig
from omni_fast.devices import resolve_device
from omni_fast.media import dali as mdali
from omni_fast.media import swr
from omni_fast.media.pyav import Clip, DecodedClip, MediaError, decode_clip, or_error, preprocess_clip

log = logging.getLogger(__name__)
# Bumped whenever anything in media/ changes the frames or log-mel a clip gives: the tower-feature store keys its
# entries by it (omni_fast/features/key.py), so features of the old preprocessing are never served.
PREPROCESS_VERSION = 1


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
    frames: torch.Tensor  # (D, num_frames, 3, 224, 224) float32, SigLIP-normalised, on the device
    mel: torch.Tensor  # (D, n_mels, 3000) float32 Whisper log-mel, on the device
    records: list[Any]  # the B records, in order
    clips: list[ClipInfo]  # per decoded clip (D): indices, N, audio facts
    failures: list[Failure]  # records of this batch's range that were skipped
    positions: list[int]  # index of each of the B records in the loader's list
    found: list[Any] = None  # per record: the lookup's value, or None where the clip was decoded
    # D = B without a lookup; with one, the decoded clips are records[i] for i in `decoded`, in order

    def __post_init__(self) -> None:
        if self.found is None:
            self.found = [None] * len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def decoded(self) -> list[int]:
        """Rows of the batch whose clips were decoded: frames[k] / mel[k] belong to records[decoded[k]]."""
        return [i for i, value in enumerate(self.found) if value is None]


@dataclass(slots=True)
class _Found:
    value: Any  # what the lookup returned for a record (its clip is not decoded)


def _paths(record) -> tuple[Path, Path | None]:
    if isinstance(record, (str, Path)):
        return Path(record), None
    audio = getattr(record, "audio", None)
    return Path(record.video), None if audio is None else Path(audio)


def resolve_backend(wanted: str, device: torch.device) -> str:
    """LoaderConfig.backend on `device` -> the backend a MediaLoader uses ("auto": DALI where it imports and the
    device is CUDA, else PyAV)."""
    if wanted == "auto":
        return "dali" if mdali.available() and device.type == "cuda" else "pyav"
    if wanted == "dali" and not mdali.available():
        raise ImportError(f"LoaderConfig.backend='dali' but NVIDIA DALI is not installed; {mdali.INSTALL_HINT}")
    return wanted


def media_path(backend: str) -> str:
    """How clips become frames and log-mel with `backend` on this installation: the backend and the audio
    resampler (decord's swresample calls, or PyAV's approximation where libswresample cannot be reached)."""
    return f"{backend}+{'swr' if swr.available() else 'approx-resampler'}"


class MediaLoader:
    def __init__(self, records: Sequence[Any], config: LoaderConfig | None = None,
                 device: torch.device | str | None = None, lookup: Callable[[Any], Any] | None = None):
        self.records = list(records)
        self.config = config or LoaderConfig()
        self.device = resolve_device(device)
        self.backend = resolve_backend(self.config.backend, self.device)
        self.lookup = lookup  # record -> a value that stands in for the decoded clip, or None (see the docstring)

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
        records = [self.records[i] for i in span]
        if dali_thread is not None:
            return span, dali_thread.submit(self._dali_batch, dali, records, pool)
        # on the CPU the workers preprocess too; on a GPU they only decode and the GPU preprocesses in _collect
        on = self.device if self.device.type == "cpu" else None
        return span, [pool.submit(_fetch, record, self.lookup, self.config, on) for record in records]

    def _dali_batch(self, dali, records: list, pool: Executor) -> list:
        """One batch through DALI, less the clips the lookup finds (looked up in the pool first)."""
        found = list(pool.map(self.lookup, records)) if self.lookup is not None else [None] * len(records)
        todo = [i for i, value in enumerate(found) if value is None]
        out: list = [_Found(value) for value in found]
        if todo:
            videos, audios = zip(*(_paths(records[i]) for i in todo))
            for i, result in zip(todo, dali.load(list(videos), list(audios), pool, self.config.audio)):
                out[i] = result
        return out

    # --- collecting a batch ---------------------------------------------------------------------------------------
    def _collect(self, span: range, handle) -> Batch:
        if isinstance(handle, Future):  # DALI: one future for the whole batch
            results = handle.result()
        else:
            results = [or_error(f.result) for f in handle]
        clips, failures, positions, found = [], [], [], []
        for i, result in zip(span, results):
            if isinstance(result, MediaError):
                self._fail(i, result, failures)
                continue
            positions.append(i)
            found.append(result.value if isinstance(result, _Found) else None)
            if not isinstance(result, _Found):
                clips.append(result if isinstance(result, Clip) else
                             preprocess_clip(result, self.config.aspect, self.config.n_mels, self.device))
        return self._stack(clips, failures, positions, found)

    def _fail(self, i: int, error: MediaError, failures: list[Failure]) -> None:
        path = str(_paths(self.records[i])[0])
        if self.config.on_error == "raise":
            raise error
        log.warning("skipping clip %d: %s", i, error)  # a MediaError's message starts with the path
        failures.append(Failure(index=i, path=path, error=str(error)))

    def _stack(self, clips: list[Clip], failures: list[Failure], positions: list[int], found: list) -> Batch:
        cfg = self.config
        if clips:
            frames = torch.stack([c.frames for c in clips]).to(self.device)
            mel = torch.stack([c.mel for c in clips]).to(self.device)
        else:
            frames = torch.empty(0, cfg.num_frames, 3, 224, 224, device=self.device)
            mel = torch.empty(0, cfg.n_mels, 3000, device=self.device)
        infos = [ClipInfo(c.indices, c.num_frames_total, c.audio_seconds, c.audio_fallback) for c in clips]
        return Batch(frames=frames, mel=mel, records=[self.records[i] for i in positions], clips=infos,
                     failures=failures, positions=positions, found=found)


def _fetch(record, lookup: Callable[[Any], Any] | None, cfg: LoaderConfig,
           device: torch.device | None) -> Clip | DecodedClip | _Found:
    """One record in a worker: the lookup's value where it has one, else the clip decoded (see _load)."""
    if lookup is not None:
        value = lookup(record)
        if value is not None:
            return _Found(value)
    video, audio = _paths(record)
    return _load(video, audio, cfg, device)


def _load(video: Path, audio: Path | None, cfg: LoaderConfig, device: torch.device | None) -> Clip | DecodedClip:
    """load_clip's steps, with the audio read from `audio` when the record names a file; preprocessed on
    `device` when one is given, else returned decoded for the consumer to preprocess on its device."""
    raw = decode_clip(video, cfg.num_frames, cfg.audio, audio)
    return raw if device is None else preprocess_clip(raw, cfg.aspect, cfg.n_mels, device)
