"""The PyAV media path against decord itself, the reference's decoder (decord 0.6.0, FFmpeg 4.1 inside).

decord runs in a child process: importing it loads its bundled FFmpeg 4.1 libraries into the global symbol
scope, after which PyAV's own FFmpeg calls can bind to them (PyAV's libvpx-vp9 encoder then fails to open), so
it never shares a process with PyAV here. That is also why the module skips on find_spec rather than
pytest.importorskip. The child does what humanomni.mm_utils does: VideoReader(path, num_threads=1), len(),
the uniform indices, get_batch(...).asnumpy(); AudioReader(path, sample_rate=16000)._array.mean(dim=0).

Measured (this file's clips, decord 0.6.0 vs PyAV 18.1 / FFmpeg 8.0):
  N, indices                                      equal (every clip decord reads here, a truncated avi included)
  sampled RGB frames                              equal (landscape, square, portrait 360x640, odd widths
                                                  301x216 and 123x78, 5-frame clip, mjpeg avi, the cut avi);
                                                  odd heights differ (see the test below)
  16 kHz waveform (AAC, FLAC, PCM in avi and wav) same length, max |diff| 1.2e-7 (float32 rounding)
  waveform RMS ratio                              1.0 (stereo: both (L + R) / sqrt(2))
  log-mel (WhisperFeatureExtractor on decord's)   max |diff| 6.6e-5
  a zeroed-packet mp4, an mp4 cut short           decord raises; the PyAV path raises a MediaError naming it
  frames after preprocessing (decord + Pillow 11) max 2 grey levels on < 2e-5 of pixels, 1 on < 0.6%
"""
import importlib.util
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

if importlib.util.find_spec("decord") is None:
    pytest.skip("decord is not installed (pip install decord)", allow_module_level=True)

from omni_fast.media import audio as maudio  # noqa: E402
from omni_fast.media import swr  # noqa: E402
from omni_fast.media.frames import normalize, resize_two_pass  # noqa: E402
from omni_fast.media.pyav import MediaError, decode_audio, frame_count, load_clip, sample_video  # noqa: E402
from omni_fast.testing import make_clip, make_wav  # noqa: E402

LEVEL = 2 / 255  # one grey level after SigLIP normalisation

# humanomni.mm_utils.process_video / process_audio's decord calls, and frame_sample's formula, written out.
CHILD = r"""
import json, sys
import numpy as np, decord
for path, out in json.loads(sys.argv[1]):
    res = {}
    for attempt in range(3):  # decord's reader of a truncated file has failed once under heavy load: try again
        try:
            vr = decord.VideoReader(path, num_threads=1)
            n = len(vr)
            seg = float(n - 1) / 8
            ix = np.round(np.array([(seg * i + seg * (i + 1)) / 2 for i in range(8)]) + 1e-6).astype(int)
            res.update(n=np.array(n), indices=ix)
            res["frames"] = vr.get_batch(list(ix)).asnumpy()
            res.pop("video_error", None)
            break
        except Exception as e:
            res["video_error"] = np.array(f"{type(e).__name__}: {e} (attempt {attempt + 1})")
    try:
        res["audio"] = decord.AudioReader(path, sample_rate=16000)._array
    except Exception as e:
        res["audio_error"] = np.array(f"{type(e).__name__}: {e}")
    np.savez(out, **res)
"""

# name: (suffix, make_clip arguments)
CLIPS = {
    "landscape": (".mp4", dict(seconds=2.0, size=(640, 360), sample_rate=44100, channels=2)),
    "square": (".mp4", dict(seconds=1.0, size=(480, 480), sample_rate=48000, channels=1, seed=1)),
    "portrait": (".mp4", dict(seconds=1.3, size=(360, 640), sample_rate=44100, channels=1, seed=2)),
    "odd": (".mkv", dict(seconds=1.0, size=(301, 216), codec="vp9", sample_rate=44100, channels=2, seed=3)),
    "odd_small": (".mkv", dict(seconds=0.5, fps=30, size=(123, 78), codec="vp9", sample_rate=22050, seed=4)),
    "odd_height": (".mkv", dict(seconds=0.5, fps=30, size=(123, 77), codec="vp9", seed=10)),
    "short": (".mp4", dict(seconds=0.2, size=(96, 64), sample_rate=16000, channels=2, seed=5)),
    "long": (".mp4", dict(seconds=31.5, fps=10, size=(96, 64), sample_rate=22050, channels=2, seed=6)),
    "avi": (".avi", dict(seconds=1.0, fps=20, size=(160, 120), codec="mjpeg", sample_rate=32000, seed=7)),
}
STEREO_AAC = ["landscape", "short", "long"]
MONO_AAC = ["square", "portrait"]


def _cut(src, dst, fraction=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _zero_second_half_of_mdat(src, dst):
    """An mp4 whose header and packets are all there but whose later packets hold zeros (undecodable)."""
    data = bytearray(src.read_bytes())
    at = data.find(b"mdat")
    end = at - 4 + int.from_bytes(data[at - 4:at], "big")
    mid = at + 4 + (end - at - 4) // 2
    data[mid:end] = bytes(end - mid)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """{name: (clip path, decord's results)} for CLIPS plus an avi and an mp4 cut in half, an mp4 with half its
    packets zeroed, and two wav files."""
    d = tmp_path_factory.mktemp("decord")
    paths = {name: make_clip(d / f"{name}{suffix}", **kw) for name, (suffix, kw) in CLIPS.items()}
    paths["cut_avi"] = _cut(make_clip(d / "whole.avi", seconds=2.0, codec="mjpeg", seed=8), d / "cut.avi")
    paths["zeroed"] = _zero_second_half_of_mdat(make_clip(d / "whole.mp4", seconds=2.0, size=(96, 64), seed=9),
                                                d / "zeroed.mp4")
    fast = make_clip(d / "fast.mp4", seconds=2.0, size=(160, 120), seed=13, muxer_options={"movflags": "+faststart"})
    paths["cut_mp4"] = _cut(fast, d / "cut.mp4")
    paths["wav_stereo"] = make_wav(d / "stereo.wav", seconds=1.5, sample_rate=44100, channels=2, seed=11)
    paths["wav_mono"] = make_wav(d / "mono.wav", seconds=1.1, sample_rate=48000, channels=1, seed=12)
    jobs = [(str(p), str(d / f"{name}.npz")) for name, p in paths.items()]
    subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], check=True, capture_output=True, timeout=600)
    return {name: (p, dict(np.load(d / f"{name}.npz"))) for name, p in paths.items()}


def _decord_wave(res):
    return res["audio"].mean(axis=0)  # process_audio's .mean(dim=0), on decord's (1, n) mono array


def _pil11_resize(frame: np.ndarray, size: int = 224) -> np.ndarray:
    """SiglipImageProcessor's PIL bicubic resize as Pillow 11 runs it (width pass, then height pass), built
    from two one-axis resizes so that any Pillow gives it (bit-equal to Pillow 11.1's own resize)."""
    from PIL import Image

    img = Image.fromarray(frame)
    return np.array(img.resize((size, img.height), resample=3).resize((size, size), resample=3))


@pytest.mark.parametrize("name", [n for n in CLIPS if n != "odd_height"] + ["cut_avi"])
def test_frame_count_indices_and_frames_equal_decord(ref, name):
    path, res = ref[name]
    frames, indices, total = sample_video(path)
    assert total == frame_count(path) == int(res["n"])
    assert indices == res["indices"].tolist()
    assert "frames" in res, f"decord failed on {name}: {res.get('video_error')}"
    assert np.array_equal(np.stack(frames), res["frames"])


def test_odd_height_frames_differ_from_decord_by_its_chroma_rows(ref):
    """The one RGB difference found: frames of odd height (4:2:0 with a half chroma row; H.264 cannot encode
    them, VP9 can) are converted differently by decord's swscale 5 and PyAV's swscale 9, mostly where chroma
    changes. Measured on 123x77, 124x77, 302x215, 160x121 VP9 clips: 0.7-1.8 grey levels mean, up to 95 at
    chroma edges; the frame count and indices are still decord's."""
    path, res = ref["odd_height"]
    frames, indices, total = sample_video(path)
    assert (total, indices) == (int(res["n"]), res["indices"].tolist())
    diff = np.abs(np.stack(frames).astype(int) - res["frames"].astype(int))
    assert 0 < diff.mean() < 2.5


@pytest.mark.parametrize("name", ["landscape", "square", "portrait", "odd", "odd_small"])
@pytest.mark.parametrize("path", ["cpu", "two_pass"])
def test_preprocessed_frames_match_decord_and_pillow_11(ref, name, path):
    """What the model sees: decord's frames through the reference's PIL bicubic resize and SigLIP
    normalisation. The CPU path (torch's uint8 kernel) and the off-CPU one (resize_two_pass, run here on CPU
    tensors) against it, measured: at most 2 grey levels, on under 2e-5 of the pixels; 1 level on under 0.6%."""
    clip, res = ref[name]
    theirs = normalize(torch.from_numpy(np.stack([_pil11_resize(f) for f in res["frames"]])).permute(0, 3, 1, 2))
    if path == "cpu":
        ours = load_clip(clip, aspect="stretch", audio=False).frames
    else:
        ours = normalize(resize_two_pass(torch.from_numpy(np.stack(sample_video(clip)[0])).permute(0, 3, 1, 2)))
    levels = ((ours - theirs).abs() / LEVEL).round()
    assert levels.max() <= 2 and (levels > 1).float().mean() < 1e-4 and (levels > 0).float().mean() < 0.01


def test_truncated_file_is_sampled_over_what_is_there_as_decord(ref, caplog):
    """A cut avi keeps its header (50 frames) but holds 25: decord's len() counts the packets, and so does the
    PyAV path (with a log line naming the file), instead of padding black frames."""
    path, res = ref["cut_avi"]
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        frames, indices, total = sample_video(path)
    assert total == int(res["n"]) < 50 and all(f.any() for f in frames)
    (line,) = [r.getMessage() for r in caplog.records if "header promises" in r.getMessage()]
    assert "cut.avi" in line and "50" in line and str(total) in line


def test_undecodable_frames_raise_naming_the_file_as_decord_does(ref):
    path, res = ref["zeroed"]
    assert "video_error" in res and "frames" not in res  # decord's get_batch raises on these packets
    with pytest.raises(MediaError, match=r"zeroed\.mp4: the decoder delivered \d+ of the 50 frames"):
        sample_video(path)


def test_mp4_cut_short_raises_naming_the_file_as_decord_does(ref):
    """An mp4 with its index first (faststart) cut in half opens, but decord's packet pass fails on it
    (av_read_frame: invalid data); the PyAV path says which file, what its header promises and what it holds."""
    path, res = ref["cut_mp4"]
    assert "av_read_frame failed" in str(res["video_error"])
    with pytest.raises(MediaError, match=r"cut\.mp4: truncated: the header promises 50 frames but the file holds "
                                         r"\d+"):
        sample_video(path)


@pytest.mark.parametrize("name", [*STEREO_AAC, *MONO_AAC, "odd", "odd_small", "avi", "wav_stereo", "wav_mono"])
def test_waveform_equals_decord(ref, name):
    """Level, alignment and length: stereo mixed as (L + R) / sqrt(2), decord's first-frame flush reproduced
    (on wav files at FFmpeg 4.1's first packet). Measured max |diff| 1.2e-7 (float32 ulps of the downmix)."""
    path, res = ref[name]
    theirs = _decord_wave(res)
    ours = decode_audio(path)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 3e-7
    assert abs(np.sqrt((ours ** 2).mean() / (theirs ** 2).mean()) - 1) < 1e-5


@pytest.mark.parametrize("name", [*STEREO_AAC, *MONO_AAC])
def test_log_mel_equals_whisper_features_of_decords_waveform(ref, name):
    """process_audio end to end: WhisperFeatureExtractor on decord's waveform (the long clip is cut at 30 s).
    Measured max |diff| 3.2e-5 to 6.6e-5, float32 STFT rounding near the log floor."""
    from transformers import WhisperFeatureExtractor

    path, res = ref[name]
    theirs = WhisperFeatureExtractor(feature_size=128)(_decord_wave(res), sampling_rate=16000,
                                                       return_tensors="pt")["input_features"][0]
    assert (load_clip(path).mel - theirs).abs().max() < 1e-4


def test_stereo_level_is_swresamples_downmix(ref):
    """The 0.7071 x (L + R) of decord's mono=True, checked on the 16 kHz clip (nothing resampled): decord's
    mono row is 1/sqrt(2) times the sum of PyAV's decoded channels, i.e. sqrt(2) times their mean."""
    import av

    path, res = ref["short"]
    with av.open(str(path)) as container:
        channels = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    assert channels.shape[0] == 2
    mixed = (channels[0] + channels[1]) * np.float32(np.sqrt(0.5))
    assert np.abs(_decord_wave(res) - mixed).max() < 3e-7
    assert np.abs(_decord_wave(res) - channels.mean(axis=0)).max() > 0.05


@pytest.mark.parametrize("name", ["landscape", "square", "long"])
def test_without_libswresample_the_approximation_is_bounded(ref, name, monkeypatch):
    """PyAV's AudioResampler alone (where omni_fast.media.swr cannot reach libswresample): the same level, the
    first-frame flush missing. Measured log-mel mean |diff| up to 0.0054 (44.1 kHz stereo), 0.0044 (48 kHz)."""
    path, res = ref[name]
    monkeypatch.setattr(swr, "_libs", lambda: None)
    ours, theirs = decode_audio(path), _decord_wave(res)
    assert abs(np.sqrt((ours ** 2).mean() / (theirs ** 2).mean()) - 1) < 2e-3
    assert abs(ours.size - theirs.size) <= 1
    assert (maudio.log_mel(ours) - maudio.log_mel(theirs)).abs().mean() < 0.01
