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
