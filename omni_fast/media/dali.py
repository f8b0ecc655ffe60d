"""Decode batches of clips with NVIDIA DALI and preprocess them on the device, as the PyAV path defines.

Per batch:
  1. N per clip from omni_fast.media.pyav.frame_count (the video packets, as decord's len(): no frame is
     decoded). DALI does not expose its own count, so PyAV, a dependency of omni_fast, is needed here too.
     Missing, unreadable or video-less files fail here, one by one, with a MediaError naming the file, before
     DALI sees the batch.
  2. fn.decoders.video(encoded bytes, frames=<the 8 reference indices>, pad_mode="none"): "mixed" (NVDEC, any
     codec) on a GPU; "cpu" when the device is the CPU (DALI's CPU backend decodes only VP8, VP9 and MJPEG).
     Repeated indices (clips under 8 frames) are decoded once and copied by DALI.
  3. The uint8 frames reach torch through DALI's torch plugin (feed_ndarray) on the device, where
     omni_fast.media.frames pads to a grey square (or stretches), resizes (antialiased bicubic 224) and
     normalises: the same functions the PyAV path runs. DALI's own fn.resize (INTERP_CUBIC, antialias) was
     measured against PIL at 4 grey levels (18% of pixels) from 640x360 and 10 from 128x96, over the 2/255
     (1 level) bound; the torch resize is within 1 level (frames.resize / resize_two_pass).
  4. Audio: the PyAV path's decode_audio (decord's downmix and resampling, omni_fast.media.swr) in the
     caller's thread pool, for the clip's own track or the record's `audio` file alike: DALI's
     fn.decoders.audio mixes channels by their mean and resamples with its own filter, neither of which is
     the reference's. The Whisper log-mel is computed by omni_fast.media.audio.log_mel on the device for the
     whole batch.
A batch DALI fails on (a stream it cannot decode, a frame count the decoder cannot reach) is decoded again
with the PyAV path, whose result defines the semantics (a clip the PyAV path cannot decode either is that
clip's MediaError), with a log line naming the clips.

Known difference from the PyAV path: the YUV -> RGB conversion. The reference (decord) and the PyAV path use
swscale's default call, whose SIMD fast path samples chroma nearest-neighbour and truncates; DALI's CPU decoder
uses swscale with accurate rounding and full chroma interpolation (bit-equal to PyAV's
sample_video(conversion="accurate")), and its GPU decoder its own kernel (bilinear chroma, float BT.601).
Measured after preprocessing (CPU decoder, 640x360 clips): 0.4-1.1 grey levels mean, up to 14-23 at
sharp chroma edges; everything after the colour conversion is equal to the PyAV path.

Importing this module never imports DALI; building a DaliMedia without it raises ImportError saying how to
install the extra.
"""
from __future__ import annotations

import functools
import logging
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import torch

from omni_fast.config import N_MELS, NUM_FRAMES
from omni_fast.media.audio import N_SAMPLES, SAMPLE_RATE, log_mel, log_silence, silence
from omni_fast.media.frames import ASPECTS, expand_to_square, frame_indices, normalize, preprocess_frames, resize
from omni_fast.media.pyav import Clip, MediaError, decode_audio, frame_count, or_error, sample_video

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'omni-fast[dali]' (nvidia-dali-cuda130)"


@functools.cache
def available() -> bool:
    """True when nvidia.dali imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _require():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as e:
        raise ImportError(f"the DALI media path needs NVIDIA DALI, which is not installed ({e}); {INSTALL_HINT}, "
                          "or use the PyAV backend") from None
    return dali, fn, types, feed_ndarray


class DaliMedia:
    """A DALI video pipeline for batches of up to `batch_size` clips, results on `device`."""

    def __init__(self, device: torch.device | str = "cuda", batch_size: int = 8, threads: int = 4,
                 aspect: str = "pad", num_frames: int = NUM_FRAMES, n_mels: int = N_MELS):
        if aspect not in ASPECTS:
            raise ValueError(f"aspect {aspect!r}: expected one of {ASPECTS}")
        self._dali, self._fn, self._types, self._feed = _require()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"DALI decodes to a CUDA device or the CPU, not {self.device}")
        self.batch_size, self.threads = batch_size, threads
        self.aspect, self.num_frames, self.n_mels = aspect, num_frames, n_mels
        self._video = None

    # --- pipelines ----------------------------------------------------------------------------------------------
    def _pipeline(self):
        gpu = self.device.type == "cuda"
        return self._dali.Pipeline(batch_size=self.batch_size, num_threads=self.threads,
                                   device_id=self.device.index if gpu else None, prefetch_queue_depth=1)

    def _video_pipeline(self):
        if self._video is None:
            fn, types = self._fn, self._types
            pipe = self._pipeline()
            with pipe:
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
                indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
                pipe.set_outputs(fn.decoders.video(encoded, frames=indices, pad_mode="none",
                                                   device="mixed" if self.device.type == "cuda" else "cpu"))
            pipe.build()
            self._video = pipe
        return self._video

    def _to_torch(self, tensor_list, i: int, dtype: torch.dtype) -> torch.Tensor:
        sample = tensor_list[i]
        out = torch.empty(tuple(sample.shape()), dtype=dtype, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._feed(sample, out, cuda_stream=stream)
        return out

    # --- decoding -----------------------------------------------------------------------------------------------
    def decode_frames(self, paths: list[Path], indices: list[list[int]]) -> list[torch.Tensor]:
        """The frames at `indices` of each clip, (T, H, W, 3) uint8 on the device. Raises RuntimeError (DALI's)
        when DALI cannot decode the batch; the pipeline is rebuilt for the next call."""
        if not paths:
            return []
        pipe = self._video_pipeline()
        try:
            pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p in paths])
            pipe.feed_input("indices", [np.asarray(ix, dtype=np.int32) for ix in indices])
            (frames,) = pipe.run()
        except RuntimeError:
            self._video = None
            raise
        return [self._to_torch(frames, i, torch.uint8) for i in range(len(paths))]

    # --- a batch, end to end ------------------------------------------------------------------------------------
    def load(self, videos: list[str | Path], audios: list[str | Path | None] | None = None,
             pool: Executor | None = None, audio: bool = True) -> list[Clip | MediaError]:
        """Clips as load_clip makes them (frames and mel on the device), or the MediaError of each bad clip, in
        order. audios[i]: a separate audio file for clip i (None: the clip's own track). pool: threads for
        the frame-count probe and PyAV audio (serial without one)."""
        videos = [Path(v) for v in videos]
        audios = list(audios) if audios is not None else [None] * len(videos)
        run = pool.map if pool is not None else map
        totals = list(run(functools.partial(or_error, frame_count), videos))
        good = [i for i, t in enumerate(totals) if not isinstance(t, MediaError)]
        out: list = list(totals)
        for i, f in zip(good, self._frames([videos[i] for i in good], [totals[i] for i in good], pool)):
            out[i] = f  # (frames, indices), or the MediaError of a clip PyAV could not decode either
        good = [i for i in good if not isinstance(out[i], MediaError)]
        sources = [Path(a) if a is not None else v for v, a in zip(videos, audios)]
        waves = self._waves([sources[i] for i in good], pool) if audio else [(silence(), True)] * len(good)
        for i, mel, (samples, fallback) in zip(good, self._mels([w for w, _ in waves]), waves):
            pixels, indices = out[i]
            out[i] = Clip(frames=pixels, mel=mel, indices=indices, num_frames_total=totals[i],
                          audio_seconds=0.0 if fallback else len(samples) / SAMPLE_RATE, audio_fallback=fallback)
        return out

    def _frames(self, videos: list[Path], totals: list[int], pool) -> list[tuple[torch.Tensor, list[int]] | MediaError]:
        indices = [frame_indices(n, self.num_frames) for n in totals]
        try:
            decoded = self.decode_frames(videos, indices)
        except RuntimeError as e:
            log.warning("DALI could not decode a batch of %d clips (%s); decoding it with PyAV: %s", len(videos),
                        _dali_reason(e), ", ".join(map(str, videos)))
            return self._pyav_frames(videos, pool)
        return [(self._preprocess(f), ix) for f, ix in zip(decoded, indices)]

    def _pyav_frames(self, videos: list[Path], pool) -> list[tuple[torch.Tensor, list[int]] | MediaError]:
        run = pool.map if pool is not None else map
        out = []
        for sampled in run(functools.partial(or_error, sample_video, num_frames=self.num_frames), videos):
            out.append(sampled if isinstance(sampled, MediaError) else
                       (preprocess_frames(sampled[0], self.aspect, device=self.device), sampled[1]))
        return out

    def _preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, H, W, 3) uint8 on the device -> (T, 3, 224, 224) float32: preprocess_frames' steps, the T frames
        of a clip resized in one call (they share a size)."""
        x = frames.permute(0, 3, 1, 2)  # (T, 3, H, W), channels-last in memory as preprocess_frames feeds it
        if self.aspect == "pad":
            x = torch.stack([expand_to_square(f) for f in x])
        return normalize(resize(x))

    def _waves(self, sources: list[Path], pool) -> list[tuple[np.ndarray, bool]]:
        run = pool.map if pool is not None else map
        out = []
        for source, wave in zip(sources, run(decode_audio, sources)):
            if wave is None:
                log_silence(source)
                out.append((silence(), True))
            else:
                out.append((wave, False))
        return out

    def _mels(self, waves: list) -> list[torch.Tensor]:
        """Batched log-mel on the device: each waveform zero-padded or cut to 30 s, as log_mel does."""
        if not waves:
            return []
        batch = torch.zeros(len(waves), N_SAMPLES, dtype=torch.float32)
        for row, w in zip(batch, waves):
            w = torch.as_tensor(w, dtype=torch.float32)[:N_SAMPLES]
            row[: w.numel()] = w
        return list(log_mel(batch.to(self.device), self.n_mels))


def _dali_reason(error: Exception) -> str:
    """The line of a DALI pipeline error that says what failed (after its 'encountered:' header)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    return after[0] if after else type(error).__name__


