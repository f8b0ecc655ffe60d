"""Decode clips with PyAV (FFmpeg) on the CPU: the reference semantics of process_video / process_audio.

Video: the frame count N is the container's (decord's len(): stream.frames, else the number of video packets),
the 8 reference indices are taken over 0..N-1, frames are decoded in order and only the sampled ones converted
to RGB; if the decoder delivers fewer frames than N promised, the missing ones become black frames.
RGB conversion: "reference" is swscale's default, which is what decord's filter graph produces (measured
bit-equal on 640x360, 480x270, 320x240, 128x96 and 360x640 clips); for widths swscale's SIMD fast path takes,
that path samples chroma nearest-neighbour and truncates. "accurate" (bilinear, accurate rounding, full chroma
interpolation) is the conversion DALI's CPU video decoder uses (measured bit-equal), kept for comparing the two.
Audio: every channel decoded as float, mixed to mono by the channel mean (not swresample's (L+R)/sqrt(2)
downmix), resampled to 16 kHz; a clip with no audio stream, or audio that fails to decode, gets 10 s of zeros
with a warning that names the file (the reference falls back silently).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omni_fast.media.audio import SAMPLE_RATE, log_mel, silence, to_mono, warn_silence
from omni_fast.media.frames import frame_indices, pad_missing, preprocess_frames


class MediaError(ValueError):
    """A clip that cannot be used; the message names the file."""


# swscale flags for frame.to_ndarray(format="rgb24"): None = PyAV's default (SWS_BILINEAR alone).
RGB_CONVERSIONS = {"reference": None, "accurate": 0x2 | 0x40000 | 0x2000}  # BILINEAR|ACCURATE_RND|FULL_CHR_H_INT


@dataclass(slots=True)
class Clip:
    frames: torch.Tensor  # (8, 3, 224, 224) float32, SigLIP-normalised
    mel: torch.Tensor  # (128, 3000) float32 Whisper log-mel
    indices: list[int]  # the sampled frame indices
    num_frames_total: int  # N the indices were taken over
    audio_seconds: float  # decoded audio length (0 when the fallback silence was used)
    audio_fallback: bool  # True when the clip had no usable audio


def _open(path: Path):
    import av

    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: cannot be opened as a media file ({e})") from None


def _count_frames(container, path: Path) -> int:
    """N of an open container's first video stream: the header's count, else the packets (decord's len())."""
    if not container.streams.video:
        raise MediaError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    total = stream.frames
    if total <= 0:  # no frame count in the header (webm, some mkv): count the packets as decord does
        import av

        try:
            total = sum(1 for p in container.demux(stream) if p.size)
            container.seek(0)
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: cannot be demuxed ({e})") from None
    if total <= 0:
        raise MediaError(f"{path}: the video stream has no frames")
    return total


def frame_count(path: str | Path) -> int:
    """N for a clip without decoding a frame (header, else a demux pass); MediaError naming a bad file."""
    path = Path(path)
    with _open(path) as container:
        return _count_frames(container, path)


def sample_video(path: str | Path, num_frames: int = 8,
                 conversion: str = "reference") -> tuple[list[np.ndarray], list[int], int]:
    """-> (the sampled RGB frames (H, W, 3) uint8, their indices, N). conversion: a key of RGB_CONVERSIONS."""
    import av

    path = Path(path)
    flags = RGB_CONVERSIONS[conversion]
    with _open(path) as container:
        total = _count_frames(container, path)
        stream = container.streams.video[0]
        indices = frame_indices(total, num_frames)
        wanted = set(indices)
        stream.thread_type = "AUTO"
        picked: dict[int, np.ndarray] = {}
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    picked[i] = (frame.to_ndarray(format="rgb24") if flags is None else
                                 frame.to_ndarray(format="rgb24", interpolation=flags))
                if i >= indices[-1]:
                    break
        except av.error.FFmpegError as e:
            if not picked:
                raise MediaError(f"{path}: video stream cannot be decoded ({e})") from None
    if not picked:
        raise MediaError(f"{path}: the video stream decoded to no frames")
    frames = [picked[i] for i in indices if i in picked]
    return pad_missing(frames, num_frames), indices, total


def decode_audio(path: str | Path) -> np.ndarray | None:
    """Mono 16 kHz float32 samples, or None when the file has no audio stream or it cannot be decoded."""
    import av

    path = Path(path)
    try:
        with _open(path) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            blocks, rate = [], stream.rate
            for frame in container.decode(stream):
                rate = frame.sample_rate
                data = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels)
                if not frame.format.is_planar:
                    data = data.reshape(-1, len(frame.layout.channels)).T
                blocks.append(data.astype(np.float32) / (32768.0 if data.dtype == np.int16 else
                                                         2147483648.0 if data.dtype == np.int32 else 1.0))
    except (av.error.FFmpegError, MediaError):
        return None
    if not blocks:
        return None
    return resample(to_mono(np.concatenate(blocks, axis=1)), rate)


def resample(mono: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at `rate` -> `target` Hz with FFmpeg's swresample (what decord's AudioReader uses)."""
    import av

    if rate == target:
        return mono
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono[None]), format="flt", layout="mono")
    frame.sample_rate, frame.pts = rate, 0
    out = [f.to_ndarray().reshape(-1) for f in (*resampler.resample(frame), *resampler.resample(None))]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def load_audio(path: str | Path) -> tuple[np.ndarray, bool]:
    """-> (16 kHz mono samples, fallback_used). The fallback is the reference's 10 s of zeros."""
    samples = decode_audio(path)
    if samples is None or samples.size == 0:
        warn_silence(path, stacklevel=2)
        return silence(), True
    return samples, False


@dataclass(slots=True)
class DecodedClip:
    """A clip decoded but not yet preprocessed (what a decoding worker hands to the device that preprocesses)."""
    frames: list[np.ndarray]  # the sampled RGB frames (H, W, 3) uint8, padded as the reference pads
    indices: list[int]  # the sampled frame indices
    total: int  # N the indices were taken over
    samples: np.ndarray  # 16 kHz mono float32
    fallback: bool  # True when the clip had no usable audio


def decode_clip(path: str | Path, num_frames: int = 8, audio: bool = True,
                audio_path: str | Path | None = None) -> DecodedClip:
    """Sample the frames and decode the audio (from `audio_path` when the clip's audio is a separate file;
    silence without a warning when audio=False)."""
    frames, indices, total = sample_video(path, num_frames)
    samples, fallback = load_audio(audio_path if audio_path is not None else path) if audio else (silence(), True)
    return DecodedClip(frames=frames, indices=indices, total=total, samples=samples, fallback=fallback)


def preprocess_clip(raw: DecodedClip, aspect: str = "stretch", n_mels: int = 128,
                    device: torch.device | str = "cpu") -> Clip:
    """Frames resized and normalised, audio turned into log-mel, on `device`."""
    return Clip(frames=preprocess_frames(raw.frames, aspect, device=device),
                mel=log_mel(torch.from_numpy(raw.samples).to(device), n_mels), indices=raw.indices,
                num_frames_total=raw.total, audio_seconds=0.0 if raw.fallback else raw.samples.size / SAMPLE_RATE,
                audio_fallback=raw.fallback)


def load_clip(path: str | Path, aspect: str = "stretch", num_frames: int = 8, audio: bool = True,
              n_mels: int = 128) -> Clip:
    """A clip as the model takes it: 8 preprocessed frames and the log-mel of its audio (silence if audio=False
    is asked for, without a warning)."""
    return preprocess_clip(decode_clip(path, num_frames, audio), aspect, n_mels)
