"""DALI media path against the PyAV path: the CPU-only DALI video pipeline (VP8/VP9/MJPEG) here, the mixed
(NVDEC) decoder on a GPU; audio is the PyAV path's on both. Skipped where DALI is not installed."""
import logging

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

LEVEL = 2 / 255  # one grey level after SigLIP normalisation


@pytest.fixture(scope="module")
def dclips(awkward_clips):
    """The shared awkward clips (tests/conftest.py), under the name these tests use."""
    return awkward_clips


GOOD = ["vp9", "mjpeg", "vp8_wide", "odd", "portrait", "short"]


def _load(names, dclips, aspect="pad", audios=None):
    return DaliMedia("cpu", batch_size=8, threads=2, aspect=aspect).load([dclips[n] for n in names], audios)


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


def test_audio_from_a_sidecar_and_fallback_silence(dclips, caplog):
    """Audio is the PyAV path's (decord's downmix and resampling), for a sidecar wav and a clip's own track."""
    media = DaliMedia("cpu", batch_size=4, threads=2)
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        with_wav, silent = media.load([dclips["vp9"], dclips["silent"]], [dclips["vp9_wav"], None])
    assert [r.getMessage() for r in caplog.records] == [f"{dclips['silent']}: no decodable audio stream; using 10 s "
                                                       "of silence as the reference does"]
    assert torch.equal(with_wav.mel, log_mel(decode_audio(dclips["vp9_wav"]))) and not with_wav.audio_fallback
    assert abs(with_wav.audio_seconds - 1.2) < 1e-3
    assert silent.audio_fallback and torch.equal(silent.mel, load_clip(dclips["silent"], audio=False).mel)
    (opus,) = _load(["vp9"], dclips)  # no sidecar: the clip's Opus track
    assert torch.equal(opus.mel, load_clip(dclips["vp9"]).mel)


def test_bad_files_are_named_and_the_rest_decoded(dclips):
    out = _load(["vp9", "corrupt", "missing", "mjpeg"], dclips)
    assert isinstance(out[1], MediaError) and "corrupt.webm" in str(out[1])
    assert isinstance(out[2], MediaError) and "missing.webm: no such file" in str(out[2])
    ref = sample_video(dclips["mjpeg"], conversion="accurate")
    assert (out[3].frames - preprocess_frames(ref[0], "pad")).abs().max() <= LEVEL + 1e-6


def test_a_batch_dali_cannot_decode_falls_back_to_pyav(dclips, tmp_path, caplog):
    """H.264 needs the mixed (GPU) decoder: on the CPU the batch fails in DALI and PyAV decodes it; a clip whose
    header is fine but whose frames PyAV cannot decode either (video payload zeroed) is that clip's error."""
    data = bytearray(dclips["h264"].read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at - 4 + size] = bytes(size - 8)
    zeroed = tmp_path / "zeroed.mp4"
    zeroed.write_bytes(bytes(data))
    media = DaliMedia("cpu", batch_size=4, threads=2)
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        out = media.load([dclips["h264"], zeroed, dclips["vp9"]])
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "DALI could not decode a batch of 3 clips" in line and "zeroed.mp4" in line]
    assert not [line for line in lines if "zeroed.mp4: no decodable audio" in line]
    assert isinstance(out[1], MediaError) and "zeroed.mp4" in str(out[1])
    for name, clip in zip(["h264", "vp9"], out[::2]):
        assert torch.equal(clip.frames, load_clip(dclips[name], aspect="pad").frames)
    (again,) = _load(["mjpeg"], dclips)  # the pipeline is rebuilt after the failure
    assert again.frames.shape == (8, 3, 224, 224)


def test_loader_dali_backend_on_the_cpu(dclips, caplog):
    names = ["vp9", "missing", "short", "mjpeg", "corrupt", "odd"]
    loader = MediaLoader([dclips[n] for n in names], LoaderConfig(batch_size=4, backend="dali", workers=2,
                                                                 dali_threads=2), device="cpu")
    assert loader.backend == "dali"
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        batches = list(loader)
    skipped = sorted(r.getMessage() for r in caplog.records if "skipping" in r.getMessage())
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
    out = DaliMedia("cuda", batch_size=4, threads=2, aspect=aspect).load(paths)
    for path, clip in zip(paths, out):
        ref = load_clip(path, aspect=aspect)
        assert clip.frames.is_cuda and clip.indices == ref.indices
        assert (clip.frames.cpu() - ref.frames).abs().mean() <= 2 * LEVEL
        assert (clip.mel.cpu() - ref.mel).abs().max() < 1e-3  # cuFFT vs pocketfft rounding near the floor
    assert np.isfinite(out[0].frames.sum().item())


def test_loader_dali_backend_skips_what_the_lookup_finds(dclips):
    """The tower-feature store's lookup on the DALI path: a found clip is not decoded, the others are as without
    a lookup, in their rows."""
    names = ["vp9", "short", "mjpeg", "odd"]
    records = [dclips[n] for n in names]
    config = LoaderConfig(batch_size=4, backend="dali", workers=2, dali_threads=2)
    whole = next(iter(MediaLoader(records, config, device="cpu")))
    found = {str(dclips["short"]): "S", str(dclips["odd"]): "O"}
    batch = next(iter(MediaLoader(records, config, device="cpu", lookup=lambda r: found.get(str(r)))))
    assert batch.found == [None, "S", None, "O"] and batch.decoded == [0, 2]
    assert torch.equal(batch.frames, whole.frames[[0, 2]]) and torch.equal(batch.mel, whole.mel[[0, 2]])
    assert [c.num_frames_total for c in batch.clips] == [whole.clips[0].num_frames_total,
                                                         whole.clips[2].num_frames_total]
