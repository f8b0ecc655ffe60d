"""Where and in what precision omni_fast runs: the one place a device or dtype is resolved.

    resolve_device(None)                    -> cuda where torch sees a GPU, else cpu
    resolve_dtype(None, device, "float16")  -> float16 on a GPU, float32 on the CPU

Loading a checkpoint (its config's torch_dtype on a GPU), inference (float16 on a GPU, as the reference loads
it), training (bfloat16 on a GPU), torchrun's ranks and the media loader all ask these two functions.
"""
from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """"cpu", "cuda" or "cuda:N" (None: CUDA where present) -> the device, or a ValueError saying what is wrong
    (an unknown name, or CUDA asked for where torch sees no GPU)."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(spec)!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(spec)!r} is not supported: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(spec)!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                             "False); use --device cpu, or a CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(spec)!r}: only {count} CUDA GPU(s) are visible")
    return device


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, on_gpu: str) -> torch.dtype:
    """The dtype to run in: `spec` (a torch dtype or a DTYPES name), else `on_gpu` (a DTYPES name) on a GPU and
    float32 on the CPU, where half precision is slow and inexact."""
    if spec is None:
        spec = on_gpu if device.type == "cuda" else "float32"
    if isinstance(spec, torch.dtype):
        return spec
    if spec not in DTYPES:
        raise ValueError(f"dtype {spec!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[spec]
