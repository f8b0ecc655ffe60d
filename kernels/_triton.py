"""`triton` and `triton.language`, or a stand-in where Triton is not installed (it is an optional dependency).

Every kernels/<op>.py imports them from here, so that the module imports without Triton: its `<op>_ref` is
what the "torch" backend of omni_fast.ops runs, and the CPU inference path must not need Triton for it. Under
the stand-in `@triton.jit` (bare or with options) gives a kernel that raises when launched; ops.py never picks
the "triton" backend when Triton is absent, so only `force_backend("triton")` reaches one. Kernel signatures
may name `tl.constexpr` because every kernel file has `from __future__ import annotations`.
"""
from __future__ import annotations

from typing import Callable

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


class _MissingKernel:
    """What `@triton.jit` gives without Triton: raises on launch (`kernel[grid](...)`) rather than on import."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __getitem__(self, grid):
        raise ImportError(f"{self.fn.__module__}.{self.fn.__name__} is a Triton kernel: install triton "
                          "(pip install omni_fast[triton]) or run the torch backend")


class _NoTriton:
    """The stand-in for the `triton` module: only `jit`, which is all a kernel file uses at import time."""

    @staticmethod
    def jit(fn: Callable | None = None, **options):
        return _MissingKernel if fn is None else _MissingKernel(fn)


if triton is None:
    triton = _NoTriton()

__all__ = ["triton", "tl"]
