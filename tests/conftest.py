import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be set before any @triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from omni_fast.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-r1-omni", seed=0)


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """Synthetic clips: h264+aac mp4 (two sizes), no-audio mp4, vp9 webm, mjpeg avi."""
    from omni_fast.testing import make_clip

    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": make_clip(d / "a.mp4", seconds=2.0, fps=25, size=(160, 120)),
        "mp4_wide": make_clip(d / "b.mp4", seconds=3.0, fps=30, size=(256, 144), seed=1),
        "mp4_silent": make_clip(d / "silent.mp4", seconds=1.0, fps=25, size=(96, 128), audio=False, seed=2),
        "webm": make_clip(d / "c.webm", seconds=1.2, fps=25, size=(128, 96), codec="vp9", seed=3),
        "avi": make_clip(d / "d.avi", seconds=1.0, fps=20, size=(128, 96), codec="mjpeg", seed=4),
    }


@pytest.fixture(scope="session")
def omni(tiny_ckpt):
    from omni_fast.api import OmniModel

    return OmniModel.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def reference(tiny_ckpt):
    from reference import ReferenceOmni

    return ReferenceOmni(tiny_ckpt, tiny_ckpt / "bert-base-uncased")


@pytest.fixture(scope="session")
def awkward_clips(tmp_path_factory):
    """Clips for the loader and DALI tests (DALI's CPU decoder reads VP8, VP9 and MJPEG): short (5 frames), odd
    size, portrait, wide, no audio, an H.264 one, corrupt, missing, audio-only, an mp4 cut in half, and a wav
    sidecar for "vp9"."""
    from omni_fast.testing import make_clip, make_wav

    d = tmp_path_factory.mktemp("awkward")
    corrupt = d / "corrupt.webm"
    corrupt.write_bytes(b"\x1aE\xdf\xa3" + b"\x42" * 300)
    whole = make_clip(d / "whole.mp4", seconds=1.0, size=(96, 64), seed=8, muxer_options={"movflags": "+faststart"})
    truncated = d / "truncated.mp4"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
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
        "audio_only": make_wav(d / "audio_only.wav", seconds=0.5),
        "vp9_wav": make_wav(d / "vp9.wav", seconds=1.2, sample_rate=44100, channels=2, seed=1),
        "truncated": truncated,
    }
