"""Audio preprocessing as the reference: a 16 kHz mono waveform (omni_fast.media.pyav.decode_audio, decord's
semantics) -> Whisper's 128-bin log-mel over 30 s (WhisperFeatureExtractor: n_fft 400, hop 160, periodic Hann
window, slaney mel filters 0-8 kHz from transformers' mel_filter_bank, log10 clamped at 1e-10, floor at max - 8,
then (x + 4) / 4), computed in torch so it runs on either device. A clip whose audio cannot be read gets 10 s
of silence (humanomni.mm_utils.process_audio's fallback), with a log line naming it.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from omni_fast.config import N_MELS

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
CHUNK_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS  # 480000
N_FRAMES = N_SAMPLES // HOP  # 3000
FALLBACK_SECONDS = 10

log = logging.getLogger(__name__)


@functools.cache
def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """(1 + N_FFT // 2, n_mels) float64 slaney filters, 0 Hz to SAMPLE_RATE / 2: the bank
    WhisperFeatureExtractor builds, from the same transformers function."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=n_mels, min_frequency=0.0,
                           max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                           mel_scale="slaney")


def silence(seconds: float = FALLBACK_SECONDS) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def log_silence(source) -> None:
    """Say, in one log line, that `source` gets `silence()` for its audio: the reference falls back without a
    word, so a wrong path or a broken file would pass unnoticed."""
    log.warning("%s: no decodable audio stream; using %d s of silence as the reference does", source,
                FALLBACK_SECONDS)


def log_mel(audio: torch.Tensor | np.ndarray, n_mels: int = N_MELS) -> torch.Tensor:
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

