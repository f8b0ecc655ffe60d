"""omni_fast.ops, the dispatch layer: the cached backend choice and running without Triton installed."""
import subprocess
import sys
import textwrap

import torch

from omni_fast import ops
from omni_fast.kernels import silu_mul as silu_mul_kernels


def _picked(x: torch.Tensor):
    return ops._pick("silu_mul", x.device, x)


def test_force_backend_takes_effect_after_cached_calls():
    x = torch.randn(5, 2 * 123)
    assert _picked(x) is _picked(x) is silu_mul_kernels.silu_mul_ref
    with ops.force_backend("triton", "silu_mul"):
        assert _picked(x) is silu_mul_kernels.silu_mul
        with ops.force_backend("torch"):  # an all-ops override under a named one: the named one wins
            assert _picked(x) is silu_mul_kernels.silu_mul
    with ops.force_backend("triton"):
        assert _picked(x) is silu_mul_kernels.silu_mul
    assert _picked(x) is silu_mul_kernels.silu_mul_ref


def test_forward_only_kernels_fall_back_to_torch_under_autograd_after_a_cached_call():
    x = torch.randn(19, 2 * 5)
    with ops.force_backend("triton", "silu_mul"):
        assert _picked(x) is silu_mul_kernels.silu_mul  # cached for a no-grad call
        x.requires_grad_(True)
        assert _picked(x) is silu_mul_kernels.silu_mul_ref
        with torch.no_grad():
            assert _picked(x) is silu_mul_kernels.silu_mul
        assert ops.silu_mul(x).grad_fn is not None  # the torch reference ran, so the gradient can flow


def test_cpu_greedy_generation_without_triton():
    """triton is an optional dependency: with it unimportable, the package and the CPU engine (torch backends)
    still work and nothing tries to import it."""
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        import omni_fast.api
        from omni_fast.config import SamplingParams
        from omni_fast.engine.engine import Engine
        from omni_fast.testing import TINY_DECODER, random_decoder

        model = random_decoder(TINY_DECODER).eval()
        prompt = torch.randn(7, TINY_DECODER["hidden_size"], generator=torch.Generator().manual_seed(0)) * 0.1
        out = Engine(model).generate([prompt], SamplingParams.greedy_params(max_tokens=4))[0][0]
        assert len(out.token_ids) >= 1, out
        assert sys.modules["triton"] is None
        print("ok", out.token_ids)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.startswith("ok")


def test_torch_cpu_paths_need_no_extension(monkeypatch):
    """Without omni_fast._C the vectorised torch CPU paths are still "cpu" backends and the C++ ones are gone:
    `backends` lists what can really run."""
    monkeypatch.setattr(ops, "_native", lambda: None)
    for op in ("cascade_attention", "sample", "selective_logprob"):
        assert ops.backends(op, "cpu") == ["cpu", "torch"], op
    assert ops.backends("group_advantage", "cpu") == ["torch"]
    assert "cpu" not in ops.backends("cascade_attention", "cuda")


def test_every_op_record_names_importable_functions():
    """Each implementation an Op record names imports and is callable (native ones where omni_fast._C is built),
    and every backend of `backends` is one the record has."""
    for name, op in ops.OPS.items():
        for backend in ops.BACKENDS:
            path = getattr(op, backend)
            if path is None or (op.native and backend in ("cuda", "cpu") and ops._native() is None):
                continue
            assert callable(ops._resolve(path)), (name, backend, path)
        for device in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
            found = ops.backends(name, device)
            assert found[-1] == "torch" and all(getattr(op, b) is not None for b in found), (name, found)
