"""PyAV media path against the reference semantics: frame indices, PIL + SiglipImageProcessor, Whisper features."""
import warnings

import numpy as np
import pytest
import torch

from omni_fast.media import audio as maudio
from omni_fast.media import frames as mframes
from omni_fast.media.pyav import MediaError, decode_audio, load_audio, load_clip, sample_video
from omni_fast.testing import clip_audio, clip_frame, make_clip, make_wav


@pytest.mark.parametrize("n,expected", [(50, [3, 9, 15, 21, 28, 34, 40, 46]), (8, [0, 1, 2, 3, 4, 5, 6, 7]),
                                        (3, [0, 0, 1, 1, 1, 1, 2, 2]), (1, [0] * 8), (9, [1, 2, 3, 4, 5, 6, 7, 8])])
def test_frame_indices(n, expected):
    seg = (n - 1) / 8  # the reference formula, written out
    assert [int(np.round(seg * (i + 0.5) + 1e-6)) for i in range(8)] == expected
    assert mframes.frame_indices(n) == expected


def test_pad_missing_appends_transposed_black_frames():
    frames = [np.full((90, 160, 3), 7, np.uint8)] * 5
    out = mframes.pad_missing(frames, 8)
    assert len(out) == 8 and out[-1].shape == (160, 90, 3) and out[-1].max() == 0


def _pil_expand2square(img, fill):
    """humanomni.mm_utils.expand2square, on PIL images."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


@pytest.mark.parametrize("size", [(160, 120), (120, 160), (640, 360), (224, 224), (301, 215)])
def test_pad_square_matches_pil(size):
    from PIL import Image

    img = clip_frame(3, size)
    ours = mframes.expand_to_square(torch.from_numpy(img).permute(2, 0, 1))
    theirs = np.array(_pil_expand2square(Image.fromarray(img), (127, 127, 127)))
    assert torch.equal(ours.permute(1, 2, 0), torch.from_numpy(theirs))


@pytest.mark.parametrize("aspect", ["stretch", "pad"])
@pytest.mark.parametrize("size", [(640, 360), (320, 240), (480, 480)])
def test_frames_match_siglip_image_processor(aspect, size):
    """PIL (expand2square) + SiglipImageProcessor (PIL bicubic resize, rescale, normalise), as the reference."""
    from PIL import Image
    from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor(size={"height": 224, "width": 224}, resample=3, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3)
    rng = np.random.default_rng(0)
    raw = [np.clip(clip_frame(i, size).astype(int) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
           .astype(np.uint8) for i in range(3)]
    pil = [Image.fromarray(f) for f in raw]
    if aspect == "pad":
        pil = [_pil_expand2square(p, (127, 127, 127)) for p in pil]
    ref = proc(images=pil, return_tensors="pt")["pixel_values"]
    ours = mframes.preprocess_frames(raw, aspect)
    assert ours.shape == ref.shape == (3, 3, 224, 224)
    # torch's uint8 antialiased bicubic is PIL's kernel up to rounding: at most one grey level (2/255 after
    # normalisation), on a small fraction of pixels
    diff = (ours - ref).abs()
    assert diff.max() <= 2 / 255 + 1e-6
    assert (diff > 1e-6).float().mean() < 0.05


@pytest.mark.parametrize("seconds", [0.0625, 5.0, 31.5])
def test_log_mel_matches_whisper_feature_extractor(seconds):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128)
    rng = np.random.default_rng(1)
    wave = (0.05 * rng.standard_normal(int(seconds * 16000)) + clip_audio(seconds, 16000, 1)[0]).astype(np.float32)
    ref = fe(wave, sampling_rate=16000, return_tensors="pt")["input_features"][0]
    ours = maudio.log_mel(wave)
    assert ours.shape == (128, 3000)
    assert (ours - ref).abs().max() < 1e-4
    batch = maudio.log_mel(np.stack([wave, wave[::-1].copy()]))
    assert (batch[0] - ref).abs().max() < 1e-4


def test_silence_features_match_the_reference_fallback():
    from transformers import WhisperFeatureExtractor

    ref = WhisperFeatureExtractor(feature_size=128)(np.zeros(160000, np.float32), sampling_rate=16000,
                                                   return_tensors="pt")["input_features"][0]
    assert torch.equal(maudio.log_mel(maudio.silence()), ref)


@pytest.mark.parametrize("name", ["mp4", "mp4_wide", "webm", "avi"])
def test_sampled_frames_are_the_reference_indices(clips, name):
    frames, indices, total = sample_video(clips[name])
    fps, seconds = {"mp4": (25, 2.0), "mp4_wide": (30, 3.0), "webm": (25, 1.2), "avi": (20, 1.0)}[name]
    assert total == round(fps * seconds)
    assert indices == mframes.frame_indices(total)
    band = [int(round(f[:8].mean() / 8)) for f in frames]  # clip_frame writes 8 * index into the top band
    assert band == [(8 * i % 256) // 8 for i in indices]


def test_audio_is_channel_mean_at_16k(clips, tmp_path):
    """Stereo tones mixed by the mean (rms of the mean signal), not FFmpeg's +3 dB (L+R)/sqrt(2) downmix."""
    expected = clip_audio(2.0, 16000, 2).mean(axis=0)
    wav = decode_audio(make_wav(tmp_path / "t.wav", seconds=2.0, sample_rate=44100))
    assert abs(wav.size - 32000) <= 2
    assert abs(np.sqrt((wav ** 2).mean()) - np.sqrt((expected ** 2).mean())) < 2e-3
    n = min(wav.size, expected.size) - 200
    assert np.abs(wav[100:n] - expected[100:n]).max() < 0.02
    aac = decode_audio(clips["mp4"])
    assert abs(np.sqrt((aac ** 2).mean()) - np.sqrt((expected ** 2).mean())) < 5e-3


def test_clip_without_audio_falls_back_with_a_warning_naming_it(clips):
    with pytest.warns(UserWarning, match="silent.mp4"):
        samples, fallback = load_audio(clips["mp4_silent"])
    assert fallback and samples.size == 160000 and not samples.any()
    with pytest.warns(UserWarning, match="silent.mp4"):
        clip = load_clip(clips["mp4_silent"])
    assert clip.audio_fallback and torch.equal(clip.mel, maudio.log_mel(maudio.silence()))


def test_load_clip_shapes(clips):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip = load_clip(clips["mp4_wide"], aspect="pad")
    assert clip.frames.shape == (8, 3, 224, 224) and clip.frames.dtype == torch.float32
    assert clip.mel.shape == (128, 3000)
    assert -1.0 <= clip.frames.min() and clip.frames.max() <= 1.0
    assert abs(clip.audio_seconds - 3.0) < 0.1
    # pad: the 256x144 frame sits in a grey (127) square: the top rows are the fill colour
    assert torch.allclose(clip.frames[0, :, 0, :], torch.tensor(127 / 255 * 2 - 1), atol=1e-6)


def test_bad_files_are_named(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
    with pytest.raises(MediaError, match="corrupt.mp4"):
        sample_video(corrupt)
    with pytest.raises(MediaError, match="absent.mp4: no such file"):
        sample_video(tmp_path / "absent.mp4")
    audio_only = make_wav(tmp_path / "only_audio.wav")
    with pytest.raises(MediaError, match="only_audio.wav: has no video stream"):
        sample_video(audio_only)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all")
    with pytest.raises(MediaError, match="notes.mp4"):
        load_clip(text)


def test_truncated_file_without_its_index_names_the_file(tmp_path):
    """An mp4 cut in half loses its moov atom (written at the end): it cannot be opened, and the error says
    which file."""
    src = make_clip(tmp_path / "full.mp4", seconds=2.0)
    data = src.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"cut\.mp4: cannot be opened"):
        sample_video(cut)


def test_truncated_file_decodes_what_it_can(tmp_path):
    """An avi cut in half keeps its header (frame count) but loses its later frames: the frames that are there
    are decoded as in the whole file, the missing ones padded black, and the header's indices / N kept."""
    src = make_clip(tmp_path / "full.avi", seconds=2.0, codec="mjpeg")
    data = src.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    full_frames, full_indices, full_total = sample_video(src)
    frames, indices, total = sample_video(cut)
    assert (indices, total) == (full_indices, full_total)
    assert len(frames) == 8
    decoded = [f.any() for f in frames]
    n = decoded.index(False)
    assert 0 < n < 8 and not any(decoded[n:]), decoded                       # a prefix decoded, the rest black
    for ours, whole in zip(frames[:n], full_frames):
        assert np.array_equal(ours, whole)


@pytest.mark.parametrize("size", [(640, 360), (360, 640), (128, 96), (301, 215), (7, 5)])
def test_two_pass_float_resize_matches_the_uint8_kernel(size):
    """The float resize used off the CPU (CUDA has no uint8 antialiased bicubic) against the CPU uint8 kernel."""
    rng = np.random.default_rng(size[0])
    raw = np.clip(clip_frame(3, size).astype(int) + rng.integers(-60, 60, (size[1], size[0], 3)), 0, 255)
    x = torch.from_numpy(raw.astype(np.uint8)).permute(2, 0, 1)[None].contiguous()
    diff = (mframes.resize_two_pass(x).int() - mframes.resize(x).int()).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.02
