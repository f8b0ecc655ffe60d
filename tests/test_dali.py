"""DALI media path against the PyAV path: CPU-only DALI pipelines (VP8/VP9/MJPEG video, wav audio) here, the
mixed (NVDEC) decoder on a GPU. Skipped where DALI is not installed."""
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from omni_fast.config import LoaderConfig  # noqa: E402
from omni_fast.media.audio import log_mel  # noqa: E402
from omni_fast.media.dali import DaliMedia  # noqa: E402
from omni_fast.media.frames import preprocess_frames  # noqa: E402
from omni_fast.media.loader import MediaLoader  # noqa: E402
from omni_fast.media.pyav import MediaError, decode_audio, load_clip, sample_video  # noqa: E402
from omni_fast.testing import clip_audio, make_clip, make_wav  # noqa: E402

LEVEL = 2 / 255  # one grey level after SigLIP normalisation


@pytest.fixture(scope="module")
def dclips(tmp_path_factory):
    """Clips DALI's CPU decoder reads, the awkward ones included; wav sidecars for the audio."""
    d = tmp_path_factory.mktemp("dali")
    corrupt = d / "corrupt.webm"
    corrupt.write_bytes(b"\x1aE\xdf\xa3" + b"\x42" * 300)
    return {
        "vp9": make_clip(d / "vp9.webm", seconds=1.2, fps=25, size=(160, 120), codec="vp9", seed=1),
        "mjpeg": make_clip(d / "mjpeg.avi", seconds=1.0, fps=20, size=(128, 96), codec="mjpeg", seed=2),
        "vp8_wide": make_clip(d / "vp8.webm", seconds=0.6, fps=30, size=(320, 180), codec="vp8", seed=3),
        "odd": make_clip(d / "odd.mkv", seconds=0.5, fps=30, size=(123, 77), codec="vp9", seed=4),
        "portrait": make_clip(d / "portrait.webm", seconds=0.5, fps=25, size=(72, 128), codec="vp9", seed=5),
        "short": make_clip(d / "short.webm", seconds=0.2, fps=25, size=(96, 64), codec="vp9", seed=6),
        "silent": make_clip(d / "silent.webm", seconds=0.4, fps=25, size=(64, 48), codec="vp9", audio=False),
        "h264": make_clip(d / "h264.mp4", seconds=0.6, fps=25, size=(96, 64), seed=7),
        "corrupt": corrupt,
        "missing": d / "missing.webm",
        "vp9_wav": make_wav(d / "vp9.wav", seconds=1.2, sample_rate=44100, channels=2, seed=1),
    }


GOOD = ["vp9", "mjpeg", "vp8_wide", "odd", "portrait", "short"]


def _load(names, dclips, aspect="pad", audios=None):
    media = DaliMedia("cpu", batch_size=8, threads=2, aspect=aspect)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return media.load([dclips[n] for n in names], audios)


@pytest.mark.parametrize("aspect", ["pad", "stretch"])
def test_frames_and_indices_equal_pyav_with_the_same_colour_conversion(dclips, aspect):
    """Everything after the YUV->RGB conversion (indices over N, pad/stretch, bicubic 224, normalisation) is
    the PyAV path's: against PyAV decoding with DALI's CPU conversion (swscale accurate), within 1 grey level."""
    for name, clip in zip(GOOD, _load(GOOD, dclips, aspect)):
        frames, indices, total = sample_video(dclips[name], conversion="accurate")
        assert (clip.indices, clip.num_frames_total) == (indices, total), name
        assert clip.frames.shape == (8, 3, 224, 224)
        assert (clip.frames - preprocess_frames(frames, aspect)).abs().max() <= LEVEL + 1e-6, name


def test_short_clip_repeats_indices_as_the_reference(dclips):
    (clip,) = _load(["short"], dclips)
    assert clip.num_frames_total == 5 and clip.indices == [0, 1, 1, 2, 2, 3, 3, 4]


def test_colour_conversion_difference_to_the_reference_path(dclips):
    """Against the default PyAV path (= decord): swscale's fast path truncates and samples chroma
    nearest-neighbour, DALI rounds and interpolates chroma, so the clips differ by under a grey level on
    average (up to ~100 levels at the synthetic clips' sharp chroma edges, at these small sizes)."""
    for name, clip in zip(GOOD, _load(GOOD, dclips, "stretch")):
        ref = load_clip(dclips[name], aspect="stretch", audio=False)
        assert (clip.frames - ref.frames).abs().mean() <= 2 * LEVEL, name


@pytest.mark.parametrize("rate,channels,seconds", [(16000, 1, 1.5), (16000, 2, 2.0), (44100, 2, 1.3),
                                                    (48000, 1, 2.2), (22050, 2, 0.7), (8000, 1, 1.0)])
def test_log_mel_against_pyav_and_the_exact_signal(tmp_path, rate, channels, seconds):
    """At 16 kHz DALI decodes and downmixes (channel mean) exactly as PyAV. Resampled, both are compared with
    the log-mel of the tones computed at 16 kHz directly: DALI's error is at most 2x PyAV's (measured: DALI
    0.02-0.15, swresample 0.19-0.34 in the first frame, its start transient; both ~0.04 inside)."""
    wav = make_wav(tmp_path / f"t{rate}.wav", seconds=seconds, sample_rate=rate, channels=channels, seed=3)
    (ours,) = DaliMedia("cpu", batch_size=1, threads=1).decode_audio([wav])
    theirs = decode_audio(wav)
    assert abs(ours.numel() - theirs.size) <= 1
    if rate == 16000:
        assert torch.equal(ours, torch.from_numpy(theirs))
        return
    exact = log_mel(clip_audio(seconds, 16000, channels, seed=3).mean(axis=0))
    err_dali = (log_mel(ours) - exact).abs().max()
    err_pyav = (log_mel(theirs) - exact).abs().max()
    assert err_dali <= 2 * err_pyav, (err_dali, err_pyav)


def test_audio_from_a_sidecar_and_fallback_silence(dclips):
    media = DaliMedia("cpu", batch_size=4, threads=2)
    with pytest.warns(UserWarning, match="silent.webm: no decodable audio"):
        with_wav, silent = media.load([dclips["vp9"], dclips["silent"]], [dclips["vp9_wav"], None])
    (dali_wave,) = media.decode_audio([dclips["vp9_wav"]])
    assert torch.equal(with_wav.mel, log_mel(dali_wave)) and not with_wav.audio_fallback
    assert abs(with_wav.audio_seconds - 1.2) < 1e-3
    assert silent.audio_fallback and torch.equal(silent.mel, load_clip(dclips["silent"], audio=False).mel)
    (opus,) = _load(["vp9"], dclips)  # no sidecar: the clip's Opus track, decoded by PyAV
    assert torch.equal(opus.mel, load_clip(dclips["vp9"]).mel)


def test_bad_files_are_named_and_the_rest_decoded(dclips):
    out = _load(["vp9", "corrupt", "missing", "mjpeg"], dclips)
    assert isinstance(out[1], MediaError) and "corrupt.webm" in str(out[1])
    assert isinstance(out[2], MediaError) and "missing.webm: no such file" in str(out[2])
    ref = sample_video(dclips["mjpeg"], conversion="accurate")
    assert (out[3].frames - preprocess_frames(ref[0], "pad")).abs().max() <= LEVEL + 1e-6


def test_a_batch_dali_cannot_decode_falls_back_to_pyav(dclips, tmp_path):
    """H.264 needs the mixed (GPU) decoder: on the CPU the batch fails in DALI and PyAV decodes it; a clip whose
    header is fine but whose frames PyAV cannot decode either (video payload zeroed) is that clip's error."""
    data = bytearray(dclips["h264"].read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at - 4 + size] = bytes(size - 8)
    zeroed = tmp_path / "zeroed.mp4"
    zeroed.write_bytes(bytes(data))
    media = DaliMedia("cpu", batch_size=4, threads=2)
    with pytest.warns(UserWarning) as caught:
        out = media.load([dclips["h264"], zeroed, dclips["vp9"]])
    assert [str(w.message) for w in caught if "DALI could not decode a batch of 3 clips" in str(w.message)]
    assert not [w for w in caught if "zeroed.mp4: no decodable audio" in str(w.message)]
    assert isinstance(out[1], MediaError) and "zeroed.mp4" in str(out[1])
    for name, clip in zip(["h264", "vp9"], out[::2]):
        assert torch.equal(clip.frames, load_clip(dclips[name], aspect="pad").frames)
    (again,) = _load(["mjpeg"], dclips)  # the pipeline is rebuilt after the failure
    assert again.frames.shape == (8, 3, 224, 224)


def test_loader_dali_backend_on_the_cpu(dclips):
    names = ["vp9", "missing", "short", "mjpeg", "corrupt", "odd"]
    loader = MediaLoader([dclips[n] for n in names], LoaderConfig(batch_size=4, backend="dali", workers=2,
                                                                 dali_threads=2), device="cpu")
    assert loader.backend == "dali"
    with pytest.warns(UserWarning) as caught:
        batches = list(loader)
    skipped = sorted(str(w.message) for w in caught if "skipping" in str(w.message))
    assert "missing.webm" in skipped[0] and "corrupt.webm" in skipped[1] and len(skipped) == 2
    assert [b.positions for b in batches] == [[0, 2, 3], [5]]
    assert [f.index for b in batches for f in b.failures] == [1, 4]
    direct = _load(["vp9", "short", "mjpeg", "odd"], dclips)
    frames = torch.cat([b.frames for b in batches])
    assert torch.equal(frames, torch.stack([c.frames for c in direct]))


@pytest.mark.gpu
@pytest.mark.parametrize("aspect", ["pad", "stretch"])
def test_mixed_decoder_on_gpu(clips, aspect):
    """NVDEC (h264 + AAC): same indices as the PyAV path; frames differ by the GPU's own YUV->RGB conversion
    (bilinear chroma, float BT.601), bounded like the CPU decoder's on average; log-mel as the PyAV path's
    (AAC is decoded by PyAV, the log-mel computed on the GPU)."""
    paths = [clips["mp4"], clips["mp4_wide"], clips["mp4_silent"]]
    media = DaliMedia("cuda", batch_size=4, threads=2, aspect=aspect)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = media.load(paths)
    for path, clip in zip(paths, out):
        ref = load_clip(path, aspect=aspect)
        assert clip.frames.is_cuda and clip.indices == ref.indices
        assert (clip.frames.cpu() - ref.frames).abs().mean() <= 2 * LEVEL
        assert (clip.mel.cpu() - ref.mel).abs().max() < 1e-3  # cuFFT vs pocketfft rounding near the floor
    assert np.isfinite(out[0].frames.sum().item())
