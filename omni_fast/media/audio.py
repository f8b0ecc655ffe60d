"""Audio preprocessing exactly as the reference: mono by channel mean, 16 kHz, Whisper's 128-bin log-mel over
30 s (WhisperFeatureExtractor: n_fft 400, hop 160, periodic Hann window, slaney mel filters 0-8 kHz,
log10 clamped at 1e-10, floor at max - 8, then (x + 4) / 4), computed in torch so it runs on either device.
A clip whose audio cannot be read gets 10 s of silence (humanomni.mm_utils.process_audio's fallback).
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
CHUNK_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS  # 480000
N_FRAMES = N_SAMPLES // HOP  # 3000
FALLBACK_SECONDS = 10


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), 200.0 * m / 3.0)


@functools.cache
def mel_filters(n_mels: int = 128, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(1 + n_fft // 2, n_mels) triangular slaney-normalised filters from 0 Hz to sample_rate / 2, float64."""
    fft_freqs = np.linspace(0, sample_rate // 2, 1 + n_fft // 2)
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    spacing = np.diff(hz_points)
    slopes = hz_points[None, :] - fft_freqs[:, None]  # (F, n_mels + 2)
    down = -slopes[:, :-2] / spacing[:-1]
    up = slopes[:, 2:] / spacing[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (hz_points[2:n_mels + 2] - hz_points[:n_mels]))


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(channels, n) or (n,) float -> (n,) float32, the mean of the channels; NaN -> -1.5 as the reference."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=0)
    return np.nan_to_num(samples, nan=-1.5)


def silence(seconds: float = FALLBACK_SECONDS) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def warn_silence(source, stacklevel: int = 1) -> None:
    """Warn that `source` gets `silence()` for its audio; the reference falls back without a word, so a wrong
    path or a broken file would pass unnoticed. stacklevel counts from the caller, as warnings.warn's does."""
    warnings.warn(f"{source}: no decodable audio stream; using {FALLBACK_SECONDS} s of silence as the reference does",
                  stacklevel=stacklevel + 1)


def log_mel(audio: torch.Tensor | np.ndarray, n_mels: int = 128) -> torch.Tensor:
    """16 kHz mono waveform (n,) or batch (B, n) -> log-mel (n_mels, 3000) or (B, n_mels, 3000), float32.

    The waveform is zero-padded or truncated to 30 s first, as WhisperFeatureExtractor does by default."""
    wave = torch.as_tensor(audio, dtype=torch.float32)
    batched = wave.dim() == 2
    wave = wave if batched else wave[None]
    n = wave.shape[-1]
    wave = wave[:, :N_SAMPLES] if n >= N_SAMPLES else torch.nn.functional.pad(wave, (0, N_SAMPLES - n))
    window = torch.hann_window(N_FFT, device=wave.device)
    stft = torch.stft(wave, N_FFT, HOP, window=window, return_complex=True)  # (B, 201, 3001)
    power = stft[..., :-1].abs() ** 2  # (B, 201, 3000)
    filters = torch.from_numpy(mel_filters(n_mels)).to(wave.device, torch.float32)  # (201, n_mels)
    mel = filters.T @ power  # (B, n_mels, 3000)
    logs = torch.clamp(mel, min=1e-10).log10()
    floor = logs.amax(dim=(1, 2), keepdim=True) - 8.0
    out = (torch.maximum(logs, floor) + 4.0) / 4.0
    out = torch.nan_to_num(out, nan=-1.5)
    return out if batched else out[0]

