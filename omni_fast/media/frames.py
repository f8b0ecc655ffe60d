"""Video frame preprocessing exactly as the reference (humanomni.mm_utils.process_video + SiglipImageProcessor).

Pure functions on uint8 frames (T, H, W, 3):
  frame_indices     8 indices round((N-1)/8 * (i + 0.5) + 1e-6) over all N frames (numpy rounding, as there)
  expand_to_square  pad to a centred square with grey (127,127,127) = int(0.5 * 255) (training: aspect "pad")
  resize            bicubic to 224x224 with antialiasing, as the reference's Pillow does (inference: stretch)
  normalize         x / 255, then (x - 0.5) / 0.5 (SigLIP mean/std)

Which Pillow: the reference ran Pillow 11 (early 2025), whose resize always runs the width pass first, rounds
to uint8, then the height pass. Pillow 12+ runs the height pass first when that is cheaper (portrait frames
shrinking more in height: 360x640, 215x301), and differs from Pillow 11 there by up to 8 grey levels on 21%
of the pixels (noisy 360x640 frames, Pillow 13.0 vs 11.1). resize pins Pillow 11's order on every device
(width, round, height, round) and stays within 1 grey level of Pillow 11 (2 on 128x96 and 90x160 upscales,
under 0.6% of pixels); tests compare with Pillow 11's order built from two one-axis Pillow resizes, which
equals Pillow 11.1's resize bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from omni_fast.config import NUM_FRAMES

SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5
PAD_FILL = int(SIGLIP_MEAN * 255)  # 127
ASPECTS = ("stretch", "pad")


def frame_indices(num_frames_total: int, num_frames: int = NUM_FRAMES) -> list[int]:
    """The reference's uniform sampling (frame_sample, mode 'uniform'); indices repeat for short clips."""
    if num_frames_total < 1:
        raise ValueError("a clip needs at least one frame to sample from")
    seg = float(num_frames_total - 1) / num_frames
    mids = np.array([(seg * i + seg * (i + 1)) / 2 for i in range(num_frames)])
    return np.round(mids + 1e-6).astype(int).tolist()


def expand_to_square(frame: torch.Tensor, fill: int = PAD_FILL) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, S, S), S = max(H, W), the frame centred as PIL's paste at ((S-W)//2, (S-H)//2)."""
    _, h, w = frame.shape
    if h == w:
        return frame
    s = max(h, w)
    out = torch.full((3, s, s), fill, dtype=frame.dtype, device=frame.device)
    top, left = (s - h) // 2, (s - w) // 2
    out[:, top:top + h, left:left + w] = frame
    return out


def resize(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, size, size) uint8, antialiased bicubic (PIL BICUBIC's kernel, a = -0.5), in
    Pillow 11's order: the width pass, rounded to uint8, then the height pass.

    On the CPU each pass is torch's uint8 kernel (PIL's fixed-point arithmetic, within 1 grey level of it);
    elsewhere (CUDA has no uint8 antialiased kernel) resize_two_pass does the same passes in fp32."""
    if frames.shape[-2:] == (size, size):
        return frames
    if frames.device.type != "cpu":
        return resize_two_pass(frames, size)
    h, w = frames.shape[-2:]
    out = frames
    if w != size:
        out = F.interpolate(out, size=(h, size), mode="bicubic", antialias=True, align_corners=False)
    if h != size:
        out = F.interpolate(out, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out


def resize_two_pass(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """resize's passes in fp32: width pass, round and clamp to 0..255, height pass, round and clamp.

    Rounding once after both passes instead (no clamp in between) differs from the uint8 kernel by up to
    6 grey levels on 640x360 frames and 17 on 128x96 ones (noisy frames, 15-25% of pixels), because the
    intermediate overshoot of the cubic kernel is not clipped; the two passes stay within 1 level of the CPU
    path (2 when upscaling, on under 1% of pixels)."""
    out = frames.float()
    h, w = out.shape[-2:]
    if w != size:
        out = F.interpolate(out, size=(h, size), mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255)
    if h != size:
        out = F.interpolate(out, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255)
    return out.to(torch.uint8)


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]: (x / 255 - mean) / std."""
    return (frames.float() * (1.0 / 255.0) - SIGLIP_MEAN) / SIGLIP_STD


def preprocess_frames(frames: list[np.ndarray] | np.ndarray, aspect: str = "stretch", size: int = 224,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Sampled RGB frames (each (H, W, 3) uint8) -> SigLIP input (T, 3, size, size) float32."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect {aspect!r}: expected one of {ASPECTS}")
    out = []
    for frame in frames:
        t = torch.as_tensor(np.ascontiguousarray(frame), device=device).permute(2, 0, 1)  # (3, H, W)
        if aspect == "pad":
            t = expand_to_square(t)
        out.append(resize(t[None], size)[0])
    return normalize(torch.stack(out))
