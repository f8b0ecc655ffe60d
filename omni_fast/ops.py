"""The one dispatch point per op: CUDA extension -> Triton -> torch reference.

Every op the package runs through a fast kernel is a function here. Each names its implementations in
`_IMPLS` as "module:function" strings (imported on first use, so `import omni_fast.ops` stays cheap) and
the backend is picked by `_pick` from the device of the op's first tensor argument:

    CUDA tensor: "cuda" (omni_fast._C built with CUDA) > "triton" > "torch"
    CPU tensor:  "cpu"  (omni_fast._C C++ CPU op)      > "torch"

Triton on CPU tensors (TRITON_INTERPRET=1) is only ever chosen through `force_backend`, which is how the
tests run the kernels without a GPU. Nothing else in the package picks a backend.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Callable, Iterator

import torch

_IMPLS: dict[str, dict[str, str]] = {
    "selective_logprob": {
        "triton": "omni_fast.kernels.selective_logprob:selective_logprob",
        "torch": "omni_fast.kernels.selective_logprob:selective_logprob_torch",
    },
    "group_advantage": {
        "cuda": "omni_fast.native:group_advantage",
        "cpu": "omni_fast.native:group_advantage",
        "triton": "omni_fast.kernels.group_advantage:group_advantage",
        "torch": "omni_fast.kernels.group_advantage:group_advantage_ref",
    },
}
_FORCED: dict[str, str] = {}
_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


@functools.cache
def _native():
    try:
        return importlib.import_module("omni_fast._C")
    except ImportError:
        return None


@functools.cache
def _resolve(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _has_native(symbol: str) -> bool:
    native = _native()
    return native is not None and hasattr(native, symbol)


def _available(op: str, backend: str, device: torch.device) -> bool:
    if backend not in _IMPLS[op]:
        return False
    if backend in ("cuda", "cpu"):
        return device.type == backend and _has_native(f"{op}_{backend}")
    if backend == "triton":
        return device.type == "cuda"
    return True


def backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run `op` on `device`, fastest first."""
    device = torch.device(device)
    order = _ORDER["cuda" if device.type == "cuda" else "cpu"]
    return [b for b in order if _available(op, b, device)]


def _pick(op: str, device: torch.device) -> Callable:
    backend = _FORCED.get(op) or _FORCED.get("*")
    if backend is None or backend not in _IMPLS[op]:
        backend = backends(op, device)[0]
    return _resolve(_IMPLS[op][backend])


@contextlib.contextmanager
def force_backend(backend: str, *ops: str) -> Iterator[None]:
    """Run `ops` (all ops if none named) on `backend` inside the block; ops without it keep the default."""
    keys = ops or ("*",)
    saved = {k: _FORCED.get(k) for k in keys}
    _FORCED.update({k: backend for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                _FORCED.pop(k, None)
            else:
                _FORCED[k] = v


# ---------------------------------------------------------------------------------------------------------
# ops


def selective_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(hidden @ weight.T / temperature)[targets] as float32, never forming the [N, V] logits.

    hidden [..., H], weight [V, H] (the LM head), targets [...] in [0, V) -> [...]; differentiable with respect
    to hidden and weight (no weight gradient is formed when weight.requires_grad is False).
    """
    return _pick("selective_logprob", hidden.device)(hidden, weight, targets, temperature)


def selective_logprob_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, lse, entropy), each float32 [...], from the same pass as `selective_logprob`.

    lse = logsumexp(z), entropy = -sum softmax(z) * log_softmax(z), z = hidden @ weight.T / temperature.
    Only logp is differentiable; lse and entropy are detached (metrics). Costs two multiply-adds per logit
    more than `selective_logprob`.
    """
    return _pick("selective_logprob", hidden.device)(hidden, weight, targets, temperature, with_stats=True)


def group_advantage(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """rewards [K, B*G] (unit stride along B*G) -> advantages float32 [B*G]; see
    omni_fast.grpo.advantage.group_advantages, the public entry point."""
    return _pick("group_advantage", rewards.device)(rewards, group_size, eps, scale)
