"""The one dispatch point per op: CUDA extension -> Triton -> torch reference.

Every op the package runs through a fast kernel is a function here, and one record in `OPS` says everything
about it: where each implementation lives ("module:function" strings, imported on first use, so
`import omni_fast.ops` stays cheap), what the native ones need, and whether the fast ones have a backward.
The records are named after the kernels, and so are the functions, but for "group_advantage": its function is
`advantages_from_rewards`, which grpo.advantage.group_advantages checks the arguments of and calls.
The backend is picked by `_pick` from the device of the op's first tensor argument:

    CUDA tensor: "cuda" (omni_fast._C built with CUDA, or an optional package such as flash-attn) > "triton" > "torch"
    CPU tensor:  "cpu"  (omni_fast._C's C++ op, or a vectorised torch path in kernels/) > "torch"

Triton on CPU tensors (TRITON_INTERPRET=1) is only ever chosen through `force_backend`, which is how the
tests run the kernels without a GPU. Ops whose fast kernels are forward-only fall back to the torch reference
when autograd needs their gradient. Nothing else in the package picks a backend, and nothing else imports
omni_fast.kernels: the engine's helpers for kernel arguments (`sample_filters`, `cascade_splits`) are here too.
Triton is optional: without it the kernel modules still import (kernels/_triton.py) and "triton" is never picked.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass(frozen=True, slots=True)
class Op:
    """One op: its implementations as "module:function" (None: the op has no such path) and what they need."""
    torch: str  # the reference in plain torch: always there, the definition of correct
    triton: str | None = None  # the Triton kernel (CUDA tensors; CPU tensors only through force_backend)
    cuda: str | None = None  # a CUDA path that is not Triton: omni_fast._C's op, or `cuda_package`'s kernel
    cpu: str | None = None  # a CPU path faster than the reference: omni_fast._C's C++ op, or vectorised torch
    native: bool = False  # "cuda" / "cpu" are omni_fast._C's: there when it was built with <op>_cuda / <op>_cpu
    cuda_package: str | None = None  # the optional package the "cuda" path imports (flash-attn)
    forward_only: bool = False  # the fast paths have no backward: under autograd the reference runs


OPS: dict[str, Op] = {
    "causal_attention": Op(torch="omni_fast.kernels.causal_attention:causal_attention_ref",
                           cuda="omni_fast.kernels.causal_attention:causal_attention_flash",
                           cuda_package="flash_attn"),  # flash-attn has its backward
    "add_rms_norm": Op(torch="omni_fast.kernels.rms_norm:add_rms_norm_ref",
                       triton="omni_fast.kernels.rms_norm:add_rms_norm", forward_only=True),
    "rope": Op(torch="omni_fast.kernels.rope:rope_ref", triton="omni_fast.kernels.rope:rope", forward_only=True),
    "silu_mul": Op(torch="omni_fast.kernels.silu_mul:silu_mul_ref", triton="omni_fast.kernels.silu_mul:silu_mul",
                   forward_only=True),
    "cascade_attention": Op(torch="omni_fast.kernels.cascade_attention:cascade_attention_ref",
                            triton="omni_fast.kernels.cascade_attention:cascade_attention",
                            cpu="omni_fast.kernels.cascade_attention:cascade_attention_cpu", forward_only=True),
    "sample": Op(torch="omni_fast.kernels.sampling:sample_ref", triton="omni_fast.kernels.sampling:sample",
                 cpu="omni_fast.kernels.sampling:sample_cpu"),
    "selective_logprob": Op(torch="omni_fast.kernels.selective_logprob:selective_logprob_torch",
                            triton="omni_fast.kernels.selective_logprob:selective_logprob",
                            cpu="omni_fast.kernels.selective_logprob:selective_logprob_cpu"),
    "group_advantage": Op(torch="omni_fast.kernels.group_advantage:group_advantage_ref",
                          triton="omni_fast.kernels.group_advantage:group_advantage",
                          cuda="omni_fast.kernels.native:group_advantage",
                          cpu="omni_fast.kernels.native:group_advantage", native=True),
}
BACKENDS = ("cuda", "triton", "cpu", "torch")  # the implementation fields of an Op
_FORCED: dict[str, str] = {}
_PICKED: dict[tuple[str, str, str | None, bool], Callable] = {}  # (op, device type, forced, needs_grad) -> impl
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


@functools.cache
def _has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - a package that fails to import (e.g. a CUDA mismatch) is absent
        return False


def _available(name: str, backend: str, device: torch.device) -> bool:
    op = OPS[name]
    if getattr(op, backend) is None:
        return False
    if backend in ("cuda", "cpu"):
        if device.type != backend:
            return False
        if op.native:
            return _has_native(f"{name}_{backend}")
        return _has_module(op.cuda_package) if backend == "cuda" and op.cuda_package else True
    if backend == "triton":
        return device.type == "cuda" and _has_module("triton")  # triton is an optional dependency
    return True


def backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run `op` on `device`, fastest first."""
    device = torch.device(device)
    order = _ORDER["cuda" if device.type == "cuda" else "cpu"]
    return [b for b in order if _available(op, b, device)]


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _choose(op: str, device: torch.device, forced: str | None, needs_grad: bool) -> Callable:
    record = OPS[op]
    backend = forced if forced in BACKENDS and getattr(record, forced) is not None else backends(op, device)[0]
    if record.forward_only and needs_grad:
        backend = "torch"
    return _resolve(getattr(record, backend))


def _pick(op: str, device: torch.device, *tensors: torch.Tensor | None) -> Callable:
    """The implementation of `op` for these arguments. An eager decode step makes ~120 calls, so the choice is
    cached under everything it depends on (availability is fixed per process); keying by the forced backend
    rather than invalidating lets `force_backend` take effect at once."""
    forced = _FORCED.get(op) or _FORCED.get("*")
    needs_grad = OPS[op].forward_only and _needs_grad(tensors)
    key = (op, device.type, forced, needs_grad)
    impl = _PICKED.get(key)
    if impl is None:
        impl = _PICKED[key] = _choose(op, device, forced, needs_grad)
    return impl


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


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual) (kernels/rms_norm.py)."""
    return _pick("add_rms_norm", x.device, x, residual, weight)(x, residual, weight, eps)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [*, Hq, D] and k [*, Hkv, D] with cos/sin [*, D] (kernels/rope.py)."""
    return _pick("rope", q.device, q, k)(q, k, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a packed [*, 2I] projection (kernels/silu_mul.py)."""
    return _pick("silu_mul", gate_up.device, gate_up)(gate_up)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention, q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] -> [B, Tq, Hq, D], the queries being the last
    Tq of the Tk positions (flash-attn where installed)."""
    return _pick("causal_attention", q.device, q, k, v)(q, k, v)


def cascade_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_tables: torch.Tensor,
                      prefix_lens: torch.Tensor, groups: torch.Tensor, gen_tables: torch.Tensor,
                      gen_lens: torch.Tensor, group_offsets: torch.Tensor | None = None,
                      splits: int | None = None) -> torch.Tensor:
    """Shared-prefix decode attention over one layer of a paged KV pool, q [B, Hq, D] -> [B, Hq, D]
    (kernels/cascade_attention.py)."""
    return _pick("cascade_attention", q.device, q)(q, k_cache, v_cache, prefix_tables, prefix_lens, groups,
                                                gen_tables, gen_lens, group_offsets, splits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, step: torch.Tensor | int, filters: tuple[int, bool, bool] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy / temperature / top-k / top-p sampling with per-row seeds and per-row token indices `step` (an
    int for all rows or an int64 [B]) -> (tokens, logprobs) (kernels/sampling.py). filters (`sample_filters`)
    describes the batch so a step needs no host sync."""
    return _pick("sample", logits.device)(logits, temperature, top_k, top_p, seeds, step, filters)


def sample_filters(top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[int, bool, bool]:
    """(largest top_k, any row with top_p < 1, any such row without top_k), the `filters` of `sample`: the
    engine computes it once per batch (one host sync) and every backend of `sample` takes it."""
    return _resolve("omni_fast.kernels.sampling:batch_filters")(top_k, top_p)


def cascade_splits(prefix_capacity: int) -> int:
    """The `splits` of `cascade_attention` for a prefix cache of this capacity (programs per group and KV head)."""
    return _resolve("omni_fast.kernels.cascade_attention:num_splits")(prefix_capacity)


def advantage_scales() -> tuple[str, ...]:
    """The `scale`s group_advantage takes ("group", "batch", "none"), as kernels/group_advantage.py defines them
    for every backend."""
    return tuple(_resolve("omni_fast.kernels.group_advantage:SCALES"))


def selective_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(hidden @ weight.T / temperature)[targets] as float32, never forming the [N, V] logits.

    hidden [..., H], weight [V, H] (the LM head), targets [...] in [0, V) -> [...]; differentiable with respect
    to hidden and weight (no weight gradient is formed when weight.requires_grad is False).
    """
    return _pick("selective_logprob", hidden.device)(hidden, weight, targets, temperature)


def advantages_from_rewards(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                            scale: str = "group") -> torch.Tensor:
    """The op "group_advantage" (kernels/group_advantage.py, csrc/): rewards [K, B*G] (unit stride along B*G),
    no checks -> advantages float32 [B*G]. omni_fast.grpo.advantage.group_advantages checks its arguments and
    calls it."""
    return _pick("group_advantage", rewards.device)(rewards, group_size, eps, scale)
