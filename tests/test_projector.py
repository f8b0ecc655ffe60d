"""all_in_one_small against the documented tensor layout, a frame-by-frame functional reference, and timm."""
import pytest
import torch
import torch.nn.functional as F

import reference
from omni_fast.model.projector import AllInOneSmall, RegStage
from omni_fast.testing import projector_tensor_shapes


def _randomized(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("bn.weight") else 0.2 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("mm,hidden", [(32, 64), (24, 40)])
def test_names_and_shapes_are_the_checkpoint_layout(mm, hidden):
    ours = {k: tuple(v.shape) for k, v in AllInOneSmall(mm, hidden).state_dict().items()}
    assert ours == projector_tensor_shapes(mm, hidden)


@pytest.mark.parametrize("batch,frames,mm,hidden", [(1, 8, 32, 64), (2, 4, 24, 40), (1, 3, 16, 16)])
def test_matches_functional_reference(batch, frames, mm, hidden):
    proj = _randomized(AllInOneSmall(mm, hidden)).eval()
    sd = proj.state_dict()
    feats = torch.randn(batch, frames, 196, mm)
    with torch.no_grad():
        video, body, face = proj(feats)
    for b in range(batch):
        assert (video[b] - reference.branch(feats[b], sd, "video")).abs().max() < 1e-4
        assert (body[b] - reference.branch(feats[b], sd, "body")).abs().max() < 1e-4
        assert (face[b] - reference.face(feats[b], sd)).abs().max() < 1e-5
    assert video.shape == (batch, frames * 49, hidden)


def test_temporal_conv_is_causal():
    """Changing the last frame must not move any earlier frame's tokens."""
    proj = _randomized(AllInOneSmall(16, 32)).eval()
    feats = torch.randn(1, 8, 196, 16)
    changed = feats.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        a, b = proj.branch("video", feats), proj.branch("video", changed)
    assert torch.allclose(a[:, : 7 * 49], b[:, : 7 * 49], atol=1e-6)
    assert not torch.allclose(a[:, 7 * 49:], b[:, 7 * 49:], atol=1e-3)


def test_face_bilinear_halving_is_2x2_average():
    x = torch.randn(1, 8, 196, 12)
    pooled = AllInOneSmall.face_pool(x)
    grid = x.reshape(8, 14, 14, 12).permute(0, 3, 1, 2)
    avg = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(1, -1, 12)
    assert (pooled - avg).abs().max() < 1e-5


def test_against_timm_regstage():
    """Where timm imports (it needs torchvision, absent beside the CPU torch here), its own RegStage with the
    reference's arguments must have our names and give our outputs."""
    timm_regnet = pytest.importorskip("timm.models.regnet")
    from timm.layers import LayerNorm2d

    for in_c, out_c in ((32, 48), (48, 48)):
        theirs = timm_regnet.RegStage(depth=2, in_chs=in_c, out_chs=out_c, stride=1, dilation=1, act_layer=torch.nn.SiLU,
                                      norm_layer=LayerNorm2d).eval()
        ours = _randomized(RegStage(2, in_c, out_c)).eval()
        assert set(theirs.state_dict()) == set(ours.state_dict())
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(3, in_c, 14, 14)
        with torch.no_grad():
            assert (theirs(x) - ours(x)).abs().max() < 1e-5
