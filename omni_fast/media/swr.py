"""decord's AudioReader resampling, call for call, on the libswresample that PyAV loaded.

The reference reads audio with decord's AudioReader(path, sample_rate=16000) (mono=True): one SwrContext from
the decoder's layout, format and rate to mono float at 16 kHz, then for every decoded frame
swr_convert(frame) followed by swr_convert(NULL) until it returns 0. The NULL call is swresample's flush: the
first one mirrors the first frame's last ~half filter length of samples (46 at 44.1 kHz, 49 at 48 kHz) into
the resampler's buffer, where they stay as if they were input, so everything after the first frame (23 ms of
AAC) is delayed by them (16.7 output samples at 44.1 kHz), and the stream ends without a final flush. A plain
resampler (PyAV's AudioResampler) has neither effect: that is the 17-sample offset and the different first
and last mel frames seen against decord. The downmix is swresample's matrix, (L + R) / sqrt(2) for stereo, so
the reference's later .mean(dim=0) runs on one row and changes nothing.

Making the same calls through ctypes gives decord's waveform from PyAV's FFmpeg (8.x) although decord
bundles FFmpeg 4.1: measured against decord 0.6.0 on AAC (8-96 kHz, mono and stereo), FLAC, PCM in avi and
wav (with omni_fast.media.pyav's first-frame cut), same length and at most 1.2e-7 apart (float32 rounding of
the downmix, a few ulps). Where the library cannot be found (a PyAV built some other way), resample() returns
None and the caller uses PyAV's AudioResampler.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
from typing import Iterable

import numpy as np


def _loaded_paths(name: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose name contains lib`name` (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if f"lib{name}" in line and "/" in line}
    except OSError:
        return []
    return sorted(paths)


def _candidates(name: str) -> list[str]:
    import av

    here = os.path.dirname(av.__file__)
    bundled = [p for d in (os.path.join(here, "..", "av.libs"), os.path.join(here, ".dylibs"))
               for p in sorted(glob.glob(os.path.join(d, f"*{name}*")))]
    system = ctypes.util.find_library(name)
    return bundled + _loaded_paths(name) + ([system] if system else [])


def _open(name: str) -> ctypes.CDLL | None:
    for path in _candidates(name):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@functools.cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """(libswresample, libavutil) as PyAV ships them, with the signatures used here; None if not found."""
    import av.audio.resampler  # noqa: F401  (maps PyAV's FFmpeg libraries into the process)

    swr, avutil = _open("swresample"), _open("avutil")
    if swr is None or avutil is None:
        return None
    p = ctypes.c_void_p
    swr.swr_alloc.restype = p
    swr.swr_init.argtypes = [p]
    swr.swr_convert.argtypes = [p, ctypes.POINTER(p), ctypes.c_int, ctypes.POINTER(p), ctypes.c_int]
    swr.swr_free.argtypes = [ctypes.POINTER(p)]
    avutil.av_opt_set.argtypes = [p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    avutil.av_opt_set_int.argtypes = [p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_int]
    return swr, avutil


class _Context:
    """One SwrContext set up as decord's InitSWR: the first frame's layout, format and rate -> mono fltp."""

    def __init__(self, frame, rate: int):
        self.swr, avutil = _libs()
        self.ctx = ctypes.c_void_p(self.swr.swr_alloc())
        if not self.ctx:
            raise MemoryError("swr_alloc failed")
        # a stream without a layout ("2 channels") gets the default one for its count in swr_init, as decord's
        # av_get_default_channel_layout gives it
        options = {b"in_chlayout": frame.layout.name, b"out_chlayout": "mono",
                   b"in_sample_fmt": frame.format.name, b"out_sample_fmt": "fltp"}
        for key, value in options.items():
            if avutil.av_opt_set(self.ctx, key, value.encode(), 0) < 0:
                self.close()
                raise ValueError(f"swresample rejects {key.decode()}={value}")
        avutil.av_opt_set_int(self.ctx, b"in_sample_rate", frame.sample_rate, 0)
        avutil.av_opt_set_int(self.ctx, b"out_sample_rate", rate, 0)
        if self.swr.swr_init(self.ctx) < 0:
            self.close()
            raise ValueError("swr_init failed")
        self.rate = rate

    def convert(self, frame) -> list[np.ndarray]:
        """decord's HandleFrame: convert the frame, then flush until nothing more comes out."""
        data = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels)
        planes = [np.ascontiguousarray(row) for row in data]
        src = (ctypes.c_void_p * len(planes))(*[row.ctypes.data for row in planes])
        capacity = -(-frame.samples * self.rate // frame.sample_rate)  # av_rescale_rnd(..., AV_ROUND_UP)
        out = np.empty(capacity, dtype=np.float32)
        dst = (ctypes.c_void_p * 1)(out.ctypes.data)
        blocks = []
        got = self.swr.swr_convert(self.ctx, dst, capacity, src, frame.samples)
        while got > 0:
            blocks.append(out[:got].copy())
            got = self.swr.swr_convert(self.ctx, dst, capacity, None, 0)
        if got < 0:
            raise ValueError("swr_convert failed")
        return blocks

    def close(self) -> None:
        if self.ctx:
            self.swr.swr_free(ctypes.byref(self.ctx))


def available() -> bool:
    """True when libswresample can be called (resample() then gives decord's waveform)."""
    return _libs() is not None


def resample(frames: Iterable, rate: int = 16000) -> np.ndarray | None:
    """Decoded PyAV AudioFrames -> mono float32 at `rate`, as decord's AudioReader(mono=True) returns it;
    None when libswresample cannot be called (the caller approximates). Raises ValueError if swresample
    rejects the input."""
    if _libs() is None:
        return None
    context, blocks = None, []
    try:
        for frame in frames:
            if context is None:
                context = _Context(frame, rate)
            blocks += context.convert(frame)
    finally:
        if context is not None:
            context.close()
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
