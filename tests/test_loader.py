"""MediaLoader: batches equal to load_clip per clip, order kept, bad clips reported (never dropped silently)."""
import logging
import sys
import threading

import pytest
import torch

from omni_fast.config import ConfigError, LoaderConfig
from omni_fast.data import Record
from omni_fast.media import dali as mdali
from omni_fast.media.audio import log_mel
from omni_fast.media.loader import MediaLoader
from omni_fast.media.pyav import MediaError, load_audio, load_clip


@pytest.fixture(scope="module")
def media(awkward_clips):
    """The shared awkward clips (tests/conftest.py), under the name these tests use."""
    return awkward_clips


@pytest.mark.parametrize("batch_size,workers,prefetch", [(1, 1, 0), (3, 2, 2), (5, 3, 1)])
@pytest.mark.parametrize("aspect", ["pad", "stretch"])
def test_batches_equal_load_clip_in_order(clips, media, batch_size, workers, prefetch, aspect):
    paths = [clips["mp4"], media["short"], clips["webm"], media["odd"], media["portrait"], clips["avi"]]
    loader = MediaLoader(paths, LoaderConfig(batch_size=batch_size, workers=workers, prefetch=prefetch,
                                             aspect=aspect, backend="pyav"), device="cpu")
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(paths) // batch_size)
    assert [p for b in batches for p in b.positions] == list(range(len(paths)))
    assert [r for b in batches for r in b.records] == paths
    frames = torch.cat([b.frames for b in batches])
    mel = torch.cat([b.mel for b in batches])
    assert frames.shape == (len(paths), 8, 3, 224, 224) and mel.shape == (len(paths), 128, 3000)
    for i, p in enumerate(paths):
        ref = load_clip(p, aspect=aspect)
        assert torch.equal(frames[i], ref.frames) and torch.equal(mel[i], ref.mel)
    info = [c for b in batches for c in b.clips]
    assert info[1].num_frames_total == 5 and info[1].indices == [0, 1, 1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("bad", ["corrupt", "missing", "audio_only", "truncated"])
def test_bad_clip_is_skipped_with_a_log_line_and_recorded(clips, media, bad, caplog):
    paths = [clips["mp4"], media[bad], clips["avi"]]
    loader = MediaLoader(paths, LoaderConfig(batch_size=2, workers=2, backend="pyav"), device="cpu")
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        batches = list(loader)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "omni_fast.media.loader"]
    assert line.startswith(f"skipping clip 1: {media[bad]}") and "\n" not in line
    assert [b.positions for b in batches] == [[0], [2]] and batches[0].frames.shape[0] == 1
    (failure,) = batches[0].failures
    assert failure.index == 1 and failure.path == str(media[bad]) and media[bad].name in failure.error
    assert batches[1].failures == []


def test_bad_clip_raises_when_asked(clips, media):
    loader = MediaLoader([clips["mp4"], media["corrupt"]], LoaderConfig(batch_size=1, on_error="raise",
                                                                       backend="pyav"), device="cpu")
    it = iter(loader)
    assert len(next(it)) == 1
    with pytest.raises(MediaError, match="corrupt.webm"):
        next(it)


def test_all_clips_bad_gives_an_empty_batch(media):
    loader = MediaLoader([media["missing"], media["corrupt"]], LoaderConfig(batch_size=4, backend="pyav"),
                         device="cpu")
    (batch,) = list(loader)
    assert batch.frames.shape == (0, 8, 3, 224, 224) and batch.mel.shape == (0, 128, 3000)
    assert [f.index for f in batch.failures] == [0, 1]


def test_missing_audio_is_logged_naming_the_clip(media, caplog):
    loader = MediaLoader([media["silent"]], LoaderConfig(backend="pyav"), device="cpu")
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        (batch,) = list(loader)
    assert [r.getMessage() for r in caplog.records if "silent.webm: no decodable audio" in r.getMessage()]
    assert batch.clips[0].audio_fallback and batch.clips[0].audio_seconds == 0.0
    caplog.clear()
    quiet = MediaLoader([media["silent"]], LoaderConfig(backend="pyav", audio=False), device="cpu")
    with caplog.at_level(logging.WARNING, logger="omni_fast.media"):
        (batch2,) = list(quiet)
    assert not caplog.records
    assert torch.equal(batch.mel, batch2.mel)


def test_record_audio_file_is_used(media):
    rec = Record(video=media["short"], label="sad", index=0, source="dfew", audio=media["vp9_wav"])
    (batch,) = list(MediaLoader([rec], LoaderConfig(backend="pyav"), device="cpu"))
    samples, fallback = load_audio(media["vp9_wav"])
    assert torch.equal(batch.mel[0], log_mel(samples)) and not fallback
    assert batch.records == [rec] and abs(batch.clips[0].audio_seconds - 1.2) < 1e-3


def test_stopping_early_releases_the_workers(clips):
    loader = MediaLoader([clips["mp4"]] * 9, LoaderConfig(batch_size=2, prefetch=3, workers=2, backend="pyav"),
                         device="cpu")
    def media_threads():
        return {t for t in threading.enumerate() if t.name.startswith("omni-media") and t.is_alive()}

    before = media_threads()
    it = iter(loader)
    next(it)
    assert media_threads() - before, "the pool's workers should be running while batches are prefetched"
    it.close()  # must not hang or leak the pool
    assert not media_threads() - before, "worker threads still alive after the iterator was closed"


def test_backend_choice(monkeypatch):
    assert MediaLoader([], LoaderConfig(backend="auto"), device="cpu").backend == "pyav"
    monkeypatch.setattr(mdali, "available", lambda: False)
    with pytest.raises(ImportError, match=r"omni-fast\[dali\]"):
        MediaLoader([], LoaderConfig(backend="dali"), device="cpu")


def test_dali_module_imports_without_dali(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(ImportError, match=r"NVIDIA DALI, which is not installed.*omni-fast\[dali\]"):
        mdali.DaliMedia("cpu")


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("backend", "opencv"), ("workers", 0),
                                         ("prefetch", -1), ("on_error", "ignore"), ("aspect", "crop")])
def test_config_validates(field, value):
    with pytest.raises(ConfigError, match=field):
        LoaderConfig(**{field: value})


@pytest.mark.gpu
@pytest.mark.parametrize("aspect", ["pad", "stretch"])
def test_cuda_preprocessing_matches_the_cpu_path(clips, media, aspect):
    """PyAV backend on a GPU: decode in threads, resize/normalise/log-mel on the GPU; within 1 grey level
    (2/255 after normalisation; 2 levels on <1% of pixels when upscaling) and 1e-3 in log-mel."""
    paths = [clips["mp4"], clips["mp4_wide"], media["short"], media["portrait"], media["odd"]]
    (batch,) = list(MediaLoader(paths, LoaderConfig(batch_size=8, aspect=aspect, backend="pyav"), device="cuda"))
    assert batch.frames.is_cuda and batch.mel.is_cuda
    for i, p in enumerate(paths):
        ref = load_clip(p, aspect=aspect)
        diff = (batch.frames[i].cpu() - ref.frames).abs()
        assert diff.max() <= 4 / 255 + 1e-6 and (diff > 2 / 255 + 1e-6).float().mean() < 0.01
        assert (batch.mel[i].cpu() - ref.mel).abs().max() < 1e-3  # cuFFT vs pocketfft rounding near the floor
