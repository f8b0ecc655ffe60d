"""The HumanOmni-0.5B visual projector `all_in_one_small` (humanomni/model/projector.py: AllInOneSmall).

timm's RegStage is rebuilt here with timm 1.0.3's parameter names (timm needs torchvision, which does not
import beside a CPU torch); tests/test_projector.py checks it against timm's own RegStage where timm imports.
What timm builds for RegStage(depth, in, out, stride=1, dilation=1, act_layer=SiLU, norm_layer=LayerNorm2d):
blocks b1..b{depth}, each a Bottleneck with bottle_ratio 1 and group_size 1 (so conv2 is depthwise),
SE on the block's INPUT width x 0.25, LayerNormAct2d with eps 1e-5 (timm's norm-act conversion drops
LayerNorm2d's 1e-6), and a conv1x1+LN shortcut only where the width changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormAct2d(nn.LayerNorm):
    """Channel LayerNorm per pixel of an NCHW map, then an optional SiLU (timm LayerNormAct2d)."""

    def __init__(self, channels: int, apply_act: bool = True, eps: float = 1e-5):
        super().__init__(channels, eps=eps)
        self.apply_act = apply_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return F.silu(x) if self.apply_act else x


class ConvNormAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, groups: int = 1, apply_act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = LayerNormAct2d(out_chs, apply_act=apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1, bias=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class Bottleneck(nn.Module):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, out_chs, 1)
        self.conv2 = ConvNormAct(out_chs, out_chs, 3, groups=out_chs)
        self.se = SqueezeExcite(out_chs, int(round(in_chs * 0.25)))
        self.conv3 = ConvNormAct(out_chs, out_chs, 1, apply_act=False)
        self.downsample = ConvNormAct(in_chs, out_chs, 1, apply_act=False) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(y + self.downsample(x))


class RegStage(nn.Sequential):
    def __init__(self, depth: int, in_chs: int, out_chs: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(in_chs if i == 0 else out_chs, out_chs))


def mlp2x_gelu(in_features: int, hidden: int) -> nn.Sequential:
    """Linear-GELU-Linear, named .0 and .2 as in the checkpoints."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class AllInOneSmall(nn.Module):
    """SigLIP features (B, T, 196, mm_hidden) -> three (B, T*49, hidden) branches: video, body, face.

    The face branch is a per-token MLP on the full 14x14 grid followed by a 2x bilinear downscale (get_2dPool
    in the reference), done in `face_pool`.
    """

    def __init__(self, mm_hidden: int, hidden: int, depth: int = 2):
        super().__init__()
        for name in ("video", "body"):
            setattr(self, f"s1_{name}", RegStage(depth, mm_hidden, hidden))
            setattr(self, f"sampler_{name}", nn.Sequential(
                nn.Conv3d(hidden, hidden, kernel_size=(2, 2, 2), stride=(1, 2, 2), padding=(1, 0, 0)), nn.SiLU()))
            setattr(self, f"s2_{name}", RegStage(depth, hidden, hidden))
            setattr(self, f"readout_{name}", mlp2x_gelu(hidden, hidden))
        self.mlp_2xgelu_face = mlp2x_gelu(mm_hidden, hidden)

    def branch(self, name: str, feats: torch.Tensor) -> torch.Tensor:
        """RegStage -> causal temporal Conv3d -> RegStage -> MLP: (B, T, h*w, D) -> (B, T*h/2*w/2, hidden)."""
        b, t, n, d = feats.shape
        hw = int(round(n ** 0.5))
        x = feats.reshape(b * t, hw, hw, d).permute(0, 3, 1, 2)  # (B*T, D, h, w)
        x = getattr(self, f"s1_{name}")(x)
        x = x.reshape(b, t, *x.shape[1:]).transpose(1, 2)  # (B, D', T, h, w)
        # Conv3d pads one frame on each side of T and the last output is dropped: a causal 2-tap
        # temporal conv over (t-1, t), with spatial stride 2.
        x = getattr(self, f"sampler_{name}")(x)[:, :, :-1]  # (B, D', T, h/2, w/2)
        dim, h2, w2 = x.shape[1], x.shape[3], x.shape[4]
        x = x.transpose(1, 2).reshape(b * t, dim, h2, w2)
        x = getattr(self, f"s2_{name}")(x)
        x = x.reshape(b, t, dim, h2, w2).permute(0, 1, 3, 4, 2).reshape(b, t * h2 * w2, dim)  # (B, T*h2*w2, D')
        return getattr(self, f"readout_{name}")(x)

    @staticmethod
    def face_pool(x: torch.Tensor) -> torch.Tensor:
        """(B, T, h*w, D) -> (B, T*ceil(h/2)*ceil(w/2), D), bilinear as the reference's get_2dPool."""
        b, t, n, d = x.shape
        hw = int(round(n ** 0.5))
        x = x.reshape(b * t, hw, hw, d).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=[(hw + 1) // 2, (hw + 1) // 2], mode="bilinear")
        return x.permute(0, 2, 3, 1).reshape(b, -1, d)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """feats (B, T, 196, mm_hidden) -> (video, body, face), each (B, 392, hidden)."""
        return self.branch("video", feats), self.branch("body", feats), self.face_pool(self.mlp_2xgelu_face(feats))
