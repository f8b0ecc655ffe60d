"""What the machine running the checks has: versions, the GPU, and which optional packages import."""
from __future__ import annotations

import importlib
import json
import platform
import subprocess
import sys

import torch


def version(name: str) -> str:
    try:
        module = importlib.import_module(name)
        return getattr(module, "__version__", "ok")
    except Exception as e:  # noqa: BLE001 - report any import failure as text
        return f"missing ({type(e).__name__})"


def main(path: str | None = None) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            **{name: version(name) for name in ("triton", "transformers", "av", "nvidia.dali", "liger_kernel",
                                                "timm", "flash_attn", "omni_fast")}}
    try:
        info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except OSError:
        info["nvcc"] = None
    for k, v in info.items():
        print(f"{k:>14}: {v}")
    if path:
        with open(path, "w") as f:
            json.dump(info, f, indent=2)
    return info


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
