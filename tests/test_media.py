"""PyAV media path against the reference semantics: frame indices, PIL + SiglipImageProcessor, Whisper features
(tests/test_decord.py compares it with decord itself)."""
import logging

import numpy as np
import pytest
import torch

from omni_fast.media import audio as maudio
from omni_fast.media import frames as mframes
from omni_fast.media.pyav import MediaError, decode_audio, load_audio, load_clip, sample_video
from omni_fast.testing import clip_audio, clip_frame, make_clip, make_wav


def _noisy_frame(size, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(clip_frame(3, size).astype(int) + rng.integers(-30, 30, (size[1], size[0], 3)), 0,
                   255).astype(np.uint8)


@pytest.mark.parametrize("n,expected", [(50, [3, 9, 15, 21, 28, 34, 40, 46]), (8, [0, 1, 2, 3, 4, 5, 6, 7]),
                                        (3, [0, 0, 1, 1, 1, 1, 2, 2]), (1, [0] * 8), (9, [1, 2, 3, 4, 5, 6, 7, 8])])
def test_frame_indices(n, expected):
    seg = (n - 1) / 8  # the reference formula, written out
    assert [int(np.round(seg * (i + 0.5) + 1e-6)) for i in range(8)] == expected
    assert mframes.frame_indices(n) == expected


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


def test_mel_filters_are_whisper_feature_extractors():
    from transformers import WhisperFeatureExtractor

    assert np.array_equal(maudio.mel_filters(128), WhisperFeatureExtractor(feature_size=128).mel_filters)


@pytest.mark.parametrize("size", [(360, 640), (215, 301)])
def test_resize_runs_pillow_11s_order_on_portrait_frames(size):
    """Pillow 11 (the reference's) resizes width first; Pillow 12+ runs the height pass first on these
    portrait frames and lands up to 8 grey levels away. Both of our paths follow Pillow 11's order: within 1
    level of it (measured: 0.4% of pixels for the CPU kernel, 0.01% for the two fp32 passes), while the
    height-first order is over 4 levels away (measured 7-8)."""
    from PIL import Image

    raw = _noisy_frame(size, seed=size[0])
    img = Image.fromarray(raw)
    width_first = np.array(img.resize((224, img.height), resample=3).resize((224, 224), resample=3)).astype(int)
    height_first = np.array(img.resize((img.width, 224), resample=3).resize((224, 224), resample=3)).astype(int)
    x = torch.from_numpy(raw).permute(2, 0, 1)[None].contiguous()
    for ours in (mframes.resize(x), mframes.resize_two_pass(x)):
        ours = ours[0].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(ours - width_first).max() <= 1 and (ours != width_first).mean() < 0.01
        assert np.abs(ours - height_first).max() > 4


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


def test_stereo_is_mixed_as_decords_mono_downmix(clips, tmp_path):
    """Stereo tones mixed as swresample's (L + R) / sqrt(2), decord's mono=True level (the reference's
    .mean(dim=0) then sees one row), not the channel mean, which is 3 dB quieter."""
    tones = clip_audio(2.0, 16000, 2)
    level = np.sqrt((((tones[0] + tones[1]) / np.sqrt(2)) ** 2).mean())
    wav = make_wav(tmp_path / "t.wav", seconds=2.0, sample_rate=44100)
    for wave in (decode_audio(wav), decode_audio(clips["mp4"])):
        assert abs(wave.size - 32000) <= 400  # AAC rounds up to whole 1024-sample frames (+0.05 s here)
        assert abs(np.sqrt((wave ** 2).mean()) / level - 1) < 0.01


def test_clip_without_audio_falls_back_with_a_log_line_naming_it(clips, caplog):
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        samples, fallback = load_audio(clips["mp4_silent"])
    assert fallback and samples.size == 160000 and not samples.any()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "silent.mp4: no decodable audio" in line and "\n" not in line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        clip = load_clip(clips["mp4_silent"])
    assert clip.audio_fallback and torch.equal(clip.mel, maudio.log_mel(maudio.silence()))
    assert ["silent.mp4" in r.getMessage() for r in caplog.records] == [True]


def test_load_clip_shapes(clips, caplog):
    with caplog.at_level(logging.DEBUG, logger="omni_fast.media"):
        clip = load_clip(clips["mp4_wide"], aspect="pad")
    assert not caplog.records
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


def test_truncated_file_is_sampled_over_the_frames_it_holds(tmp_path, caplog):
    """An avi cut in half keeps its header (50 frames) but holds 25: N is the packets that are there, as
    decord's len(), so the 8 indices spread over them and every sampled frame is the whole file's frame at that
    index; a log line names the file and both counts. No black frames."""
    src = make_clip(tmp_path / "full.avi", seconds=2.0, codec="mjpeg")
    data = src.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        frames, indices, total = sample_video(cut)
    assert 0 < total < 50 and indices == mframes.frame_indices(total)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "cut.avi" in line and "promises 50 frames" in line and f"{total} are in the file" in line
    import av

    with av.open(str(src)) as container:
        whole = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for i, frame in zip(indices, frames):
        assert np.array_equal(frame, whole[i])


def test_half_truncated_mp4_is_an_error_naming_the_file(tmp_path):
    """An mp4 with its index first (faststart) cut in half still opens; its header promises 50 frames and the
    file holds about half: a MediaError with both numbers (decord fails on it too), never black frames."""
    src = make_clip(tmp_path / "full.mp4", seconds=2.0, muxer_options={"movflags": "+faststart"})
    data = src.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    cut = tmp_path / "half.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=r"half\.mp4: truncated: the header promises 50 frames but the file "
                                         r"holds (1\d|2\d|3\d) "):
        load_clip(cut)


def test_frames_the_decoder_cannot_deliver_are_an_error_naming_the_file(tmp_path):
    """Every packet there but the later ones zeroed: the decoder stops early, and a clip missing sampled frames
    is a MediaError saying how many frames came out of how many (decord's get_batch raises here too)."""
    data = bytearray(make_clip(tmp_path / "whole.mp4", seconds=2.0, size=(96, 64)).read_bytes())
    at = data.find(b"mdat")
    end = at - 4 + int.from_bytes(data[at - 4:at], "big")
    mid = at + 4 + (end - at - 4) // 2
    data[mid:end] = bytes(end - mid)
    zeroed = tmp_path / "zeroed.mp4"
    zeroed.write_bytes(bytes(data))
    with pytest.raises(MediaError, match=r"zeroed\.mp4: the decoder delivered (\d+) of the 50 frames in the file, "
                                         r"so frame 46 .* is missing"):
        sample_video(zeroed)


@pytest.mark.parametrize("size", [(640, 360), (360, 640), (128, 96), (301, 215), (7, 5)])
def test_two_pass_float_resize_matches_the_uint8_kernel(size):
    """The float resize used off the CPU (CUDA has no uint8 antialiased bicubic) against the CPU uint8 kernel."""
    rng = np.random.default_rng(size[0])
    raw = np.clip(clip_frame(3, size).astype(int) + rng.integers(-60, 60, (size[1], size[0], 3)), 0, 255)
    x = torch.from_numpy(raw.astype(np.uint8)).permute(2, 0, 1)[None].contiguous()
    diff = (mframes.resize_two_pass(x).int() - mframes.resize(x).int()).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.02
