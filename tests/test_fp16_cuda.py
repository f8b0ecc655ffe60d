"""omni-fast infer's GPU default, float16 weights with the towers included (the reference's model_init), on a
CUDA device: the logits stay within twice plain torch's own float16 error, and `omni-fast infer` prints what
OmniModel.recognize returns on the card."""
import subprocess
import sys

import pytest
import torch

from omni_fast import ops
from omni_fast.api import OmniModel
from omni_fast.media.pyav import load_clip
from omni_fast.task import DEFAULT_INSTRUCT
from numerics import assert_within_torch_error

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def fp16(tiny_ckpt):
    model = OmniModel.from_pretrained(tiny_ckpt, device="cuda")
    return model


def test_the_default_is_float16_everywhere(fp16):
    dtypes = {p.dtype for p in fp16.model.parameters()}
    assert dtypes == {torch.float16}, dtypes  # towers, BERT and projectors too


def test_logits_within_plain_torchs_float16_error(fp16, omni, clips):
    clip = load_clip(clips["mp4"], aspect="stretch")
    ids = torch.tensor([omni.prompt_ids(DEFAULT_INSTRUCT)])
    ref = omni.forward_logits(ids, clip.frames, clip.mel, DEFAULT_INSTRUCT).double()  # float32 on the CPU
    ours = fp16.forward_logits(ids, clip.frames, clip.mel, DEFAULT_INSTRUCT).cpu()
    with ops.force_backend("torch"):  # every op through its plain-torch reference, same float16 weights
        plain = fp16.forward_logits(ids, clip.frames, clip.mel, DEFAULT_INSTRUCT).cpu()
    assert torch.isfinite(ours).all()
    assert_within_torch_error(ours, plain, ref)


def test_cli_infer_on_the_card_prints_recognize(fp16, tiny_ckpt, clips):
    expected = fp16.recognize([clips["mp4"]], max_new_tokens=24)[0]
    assert expected.finish_reason in ("stop", "length")
    proc = subprocess.run([sys.executable, "-m", "omni_fast.cli", "infer", "--model_path", str(tiny_ckpt),
                           "--video_path", str(clips["mp4"]), "--max_new_tokens", "24", "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip("\n") == expected.text
