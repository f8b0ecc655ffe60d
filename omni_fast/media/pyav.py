"""Decode clips with PyAV (FFmpeg) on the CPU: what the reference's decord calls return (process_video /
process_audio), measured against decord 0.6.0 itself in tests/test_decord.py.

Video: N is decord's len(), the number of video packets the demuxer finds, not the header's count. A file cut
short keeps its header: decord samples an avi (or any container whose demuxer just ends) over the packets
that are there, and so does this path, with a log line naming the file; an mp4 cut short fails decord's
packet pass (FFmpeg 4.1's mov demuxer reports invalid data where FFmpeg 8's reports the end), so here it is a
MediaError naming the file, the frames its header promises and those it holds. The 8 reference indices are taken over 0..N-1, frames decoded in order and only the
sampled ones converted to RGB. A decoder that delivers fewer frames than the packets promised (a corrupt
stream) is a MediaError naming the file and both counts: decord's get_batch raises there too, and black
frames would pass for a normal result. RGB conversion: "reference" is swscale's default, which is what
decord's filter graph produces (bit-equal on 640x360, 480x480, 360x640, 301x216, 123x78, 160x120 clips,
h264 / vp9 / mjpeg; frames of odd height, which VP9 allows and H.264 does not, differ from decord's swscale 5
by 0.7-1.8 grey levels mean, up to 95 at chroma edges); for widths swscale's SIMD fast path takes, that path
samples chroma nearest-neighbour and truncates. "accurate" (bilinear, accurate rounding, full chroma
interpolation) is the conversion DALI's CPU video decoder uses (measured bit-equal), kept for comparing the two.
Audio: decoded until the end or the first decode error (decord stops there and keeps what it has), then
downmixed and resampled to 16 kHz by omni_fast.media.swr, which makes decord's swresample calls: stereo
becomes (L + R) / sqrt(2), as decord's mono=True gives it, and the waveform equals decord's within 1.2e-7
(AAC in mp4, FLAC in mkv, PCM in avi and wav; a wav file's first frame is cut to FFmpeg 4.1's packet size).
Where swr cannot reach libswresample, PyAV's AudioResampler does the same downmix but resamples without
decord's first-frame flush: the waveform is then offset by ~17 samples after the first 23 ms (44.1 kHz
input; up to 0.73 apart sample by sample) and its log-mel differs by up to 0.006 mean, 1.4 max at single
bins (measured on 1-3 s AAC clips, 22.05-48 kHz; equal at 16 kHz, where nothing is resampled). A clip with no
audio stream, or no decodable audio, gets 10 s of zeros, logged naming the file (the reference falls back
silently).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omni_fast.config import N_MELS, NUM_FRAMES
from omni_fast.media import swr
from omni_fast.media.audio import SAMPLE_RATE, log_mel, log_silence, silence
from omni_fast.media.frames import frame_indices, preprocess_frames

log = logging.getLogger(__name__)
# FFmpeg 4.1's wav demuxer (decord's) reads 4096-byte packets, FFmpeg 8's reads 4096 samples; decord's resampler
# flush depends on the first decoded frame's length, so a wav file's first frame is cut back to 4.1's packet.
WAV_PACKET_BYTES = 4096


class MediaError(ValueError):
    """A clip that cannot be used; the message names the file."""


def or_error(fn, *args, **kwargs):
    """fn(*args, **kwargs), or the MediaError it raised (worker pools hand clip failures back as values)."""
    try:
        return fn(*args, **kwargs)
    except MediaError as e:
        return e


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
    """N of an open container's first video stream as decord's len(): its packets, counted by demuxing."""
    import av

    if not container.streams.video:
        raise MediaError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    try:
        total = sum(1 for p in container.demux(stream) if p.size)  # the last, empty packet is PyAV's flush
        container.seek(0)
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot be demuxed ({e})") from None
    if total <= 0:
        raise MediaError(f"{path}: the video stream has no frames")
    if total < stream.frames and container.format.name.startswith("mov,mp4"):
        raise MediaError(f"{path}: truncated: the header promises {stream.frames} frames but the file holds "
                         f"{total} (the reference's decord cannot read it either)")
    if 0 < stream.frames != total:
        log.warning("%s: the header promises %d frames but %d are in the file; sampling over the %d, as the "
                    "reference (decord) does", path, stream.frames, total, total)
    return total


def frame_count(path: str | Path) -> int:
    """N for a clip without decoding a frame (a demux pass); MediaError naming a bad file."""
    path = Path(path)
    with _open(path) as container:
        return _count_frames(container, path)


def sample_video(path: str | Path, num_frames: int = NUM_FRAMES,
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
        delivered, reason = 0, "the stream ended"
        try:
            for delivered, frame in enumerate(container.decode(stream), start=1):
                if delivered - 1 in wanted:
                    picked[delivered - 1] = (frame.to_ndarray(format="rgb24") if flags is None else
                                             frame.to_ndarray(format="rgb24", interpolation=flags))
                if delivered > indices[-1]:
                    break
        except av.error.FFmpegError as e:
            reason = str(e)
    if len(picked) < len(wanted):
        raise MediaError(f"{path}: the decoder delivered {delivered} of the {total} frames in the file, so frame "
                         f"{indices[-1]} (of the sampled {sorted(wanted)}) is missing ({reason})")
    return [picked[i] for i in indices], indices, total


def _audio_frames(container, stream):
    """The stream's decoded frames up to its end or the first decode error (decord's AudioReader stops there
    too, keeping what it decoded)."""
    import av

    try:
        yield from container.decode(stream)
    except av.error.FFmpegError:
        return


def _first_frame_as_ffmpeg41(frames, container, stream):
    """`frames`, the first one split at FFmpeg 4.1's wav packet size when the file is PCM in wav (measured:
    then equal to decord bit for bit at 22.05, 44.1 and 48 kHz; 0.29-0.47 apart sample by sample without)."""
    import av

    first = next(frames, None)
    if first is None:
        return
    pcm = re.fullmatch(r"pcm_[suf](\d+)[lb]e|pcm_u8", stream.codec_context.name)
    channels = len(first.layout.channels)
    per_packet = WAV_PACKET_BYTES // ((int(pcm[1] or 8) // 8) * channels) if pcm else first.samples
    if container.format.name != "wav" or first.format.is_planar or first.samples <= per_packet:
        yield first
    else:
        data = first.to_ndarray()  # packed: (1, n * channels)
        for part in (data[:, :per_packet * channels], data[:, per_packet * channels:]):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(part), format=first.format.name,
                                               layout=first.layout.name)
            frame.sample_rate = first.sample_rate
            yield frame
    yield from frames


def decode_audio(path: str | Path) -> np.ndarray | None:
    """Mono 16 kHz float32 samples as decord's AudioReader(path, sample_rate=16000) gives them (NaN -> -1.5
    as the reference), or None when the file has no audio stream or none of it decodes."""
    import av

    path = Path(path)
    try:
        with _open(path) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            frames = _first_frame_as_ffmpeg41(_audio_frames(container, stream), container, stream)
            samples = swr.resample(frames, SAMPLE_RATE)
            if samples is None:
                samples = resample_approx(frames, SAMPLE_RATE)
    except (av.error.FFmpegError, ValueError, MediaError):
        return None
    return np.nan_to_num(samples, nan=-1.5) if samples.size else None


def resample_approx(frames, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decoded frames -> mono float32 at `rate` with PyAV's AudioResampler: swresample's downmix, as decord,
    but no flush after the first frame (see the module docstring for how far this is from decord)."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    out = [f.to_ndarray().reshape(-1) for frame in (*frames, None) for f in resampler.resample(frame)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def load_audio(path: str | Path) -> tuple[np.ndarray, bool]:
    """-> (16 kHz mono samples, fallback_used). The fallback is the reference's 10 s of zeros."""
    samples = decode_audio(path)
    if samples is None:
        log_silence(path)
        return silence(), True
    return samples, False


@dataclass(slots=True)
class DecodedClip:
    """A clip decoded but not yet preprocessed (what a decoding worker hands to the device that preprocesses)."""
    frames: list[np.ndarray]  # the sampled RGB frames (H, W, 3) uint8
    indices: list[int]  # the sampled frame indices
    total: int  # N the indices were taken over
    samples: np.ndarray  # 16 kHz mono float32
    fallback: bool  # True when the clip had no usable audio


def decode_clip(path: str | Path, num_frames: int = NUM_FRAMES, audio: bool = True,
                audio_path: str | Path | None = None) -> DecodedClip:
    """Sample the frames and decode the audio (from `audio_path` when the clip's audio is a separate file;
    silence without a log line when audio=False)."""
    frames, indices, total = sample_video(path, num_frames)
    samples, fallback = load_audio(audio_path if audio_path is not None else path) if audio else (silence(), True)
    return DecodedClip(frames=frames, indices=indices, total=total, samples=samples, fallback=fallback)


def preprocess_clip(raw: DecodedClip, aspect: str = "stretch", n_mels: int = N_MELS,
                    device: torch.device | str = "cpu") -> Clip:
    """Frames resized and normalised, audio turned into log-mel, on `device`."""
    return Clip(frames=preprocess_frames(raw.frames, aspect, device=device),
                mel=log_mel(torch.from_numpy(raw.samples).to(device), n_mels), indices=raw.indices,
                num_frames_total=raw.total, audio_seconds=0.0 if raw.fallback else raw.samples.size / SAMPLE_RATE,
                audio_fallback=raw.fallback)


def load_clip(path: str | Path, aspect: str = "stretch", num_frames: int = NUM_FRAMES, audio: bool = True,
              n_mels: int = N_MELS) -> Clip:
    """A clip as the model takes it: 8 preprocessed frames and the log-mel of its audio (silence if audio=False
    is asked for, without a log line)."""
    return preprocess_clip(decode_clip(path, num_frames, audio), aspect, n_mels)
