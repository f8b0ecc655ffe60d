"""Log-probs of the sampled tokens through the LM head, forward + backward (and forward alone, as the reference-
model pass), at the R1-Omni shape: N = 8 x 1280 tokens, H = 896, V = 151,936, bf16.

Rows, all measured in the same run:
  ours                     ops.selective_logprob (Triton; nothing [N, V] formed), logp.backward(g)
  naive_full_log_softmax   logits = h @ W.T, .float().log_softmax(-1).gather, backward through autograd
  reference_per_row_loop   the R1-Omni trainer: bf16 logits [B, L, V], per-row log_softmax + gather, stacked
  torch_chunked_fwd_grad   the alternative design, gradients formed in the forward (g known), 1024-row chunks,
                           3 cuBLAS GEMMs + torch elementwise passes: what recompute is weighed against
  ours_plus_grpo_loss      ours + omni_fast.grpo.loss.grpo_loss (beta 0.04, ref log-probs), to set beside
  liger_grpo_loss          Liger-Kernel's LigerFusedLinearGRPOLoss (when installed; torch.compile'd)
and the forward alone (no grad) for ours, naive and the per-row loop.

Useful work is 6NHV FLOP forward + backward (three GEMMs: logits, dH, dW) and 2NHV forward; TFLOP/s and the
fraction of the roofline (774 TFLOP/s bf16, shared/GPU.md) use those counts for every row, so they compare
time. Extra memory is the peak above the inputs during one call, gradients included.

    python benchmarks/bench_selective_logprob.py            # CUDA, the R1-Omni shape
    python benchmarks/bench_selective_logprob.py --sweep    # also time `ours` under four other tile configs
    python benchmarks/bench_selective_logprob.py --quick    # CPU smoke run: tiny shape, interpreter, not timed
    python benchmarks/bench_selective_logprob.py --device cpu   # CPU measurement: N = 2 x 128, fp32, 2 threads

On the CPU, `ours` is the dispatch's CPU path (kernels/selective_logprob.py `selective_logprob_cpu`) and the
portable fallback `selective_logprob_torch` gets a row of its own; Liger and the roofline are GPU-only.
Last stdout line: one JSON object (also written to --out).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os

import torch

from common import BF16_FLOPS, emit, finish_args, time_ms


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run with tiny shapes (not a measurement)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: N = 2 x 128 tokens, H = 896, V = 151,936, fp32 (a measurement, unlike --quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for --device cpu")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--sweep", action="store_true", help="also time ours (fwd+bwd) under SWEEP's tile configs")
    ap.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    return finish_args(ap.parse_args(argv))


# (block_n, block_v, block_h, num_warps, num_stages) tried by --sweep, besides the default config
SWEEP = [(128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 2), (128, 64, 64, 4, 4)]


def _sweep_rows(slp, hidden, weight, targets, grad, device, flops, reps):
    rows = []
    base = slp.default_config(hidden.shape[0], weight.shape[0], hidden.shape[1], device, hidden.dtype)
    for block_n, block_v, block_h, warps, stages in SWEEP:
        cfg = base._replace(block_n=block_n, block_v=block_v, block_h=block_h, num_warps=warps, num_stages=stages,
                            chunk_v=slp._round_up(base.chunk_v, block_v))
        name = f"ours[{block_n}x{block_v}x{block_h} w{warps} s{stages}]"

        def run(cfg=cfg):
            hidden.grad = weight.grad = None
            slp.selective_logprob(hidden, weight, targets, config=cfg).backward(grad)

        try:
            ms = time_ms(run, device, **reps)
        except Exception as exc:                                         # noqa: BLE001 (e.g. out of resources)
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        rows.append({"name": name, "pass": "fwd+bwd", "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12,
                     "roofline": flops / BF16_FLOPS / (ms * 1e-3)})
    return rows


def _inputs(batch, length, hidden_size, vocab, dtype, device):
    n = batch * length
    hidden = torch.randn(n, hidden_size, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) * (2 / hidden_size**0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=device)
    grad = torch.randn(n, device=device)
    return hidden, weight, targets, grad


def _chunked_fwd_grad(hidden, weight, targets, grad, rows=1024):
    """Gradients formed in the forward, as a fused-loss op would (g known): 3 GEMMs per row chunk."""
    n = hidden.shape[0]
    logp = torch.empty(n, device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    for i in range(0, n, rows):
        h, t, g = hidden[i:i + rows], targets[i:i + rows], grad[i:i + rows]
        logits = (h @ weight.t()).float()                                                # (rows, V)
        lse = torch.logsumexp(logits, dim=-1)
        logp[i:i + rows] = logits.gather(1, t[:, None]).squeeze(1) - lse
        d = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])                           # -g softmax
        d.scatter_add_(1, t[:, None], g[:, None])                                        # + g onehot
        d = d.to(hidden.dtype)
        grad_hidden[i:i + rows] = d @ weight
        grad_weight += (d.t() @ h).float()
    return logp, grad_hidden, grad_weight.to(weight.dtype)


def _rows(ops, grpo_loss, hidden, weight, targets, grad, batch, length, slp_torch=None):
    """name -> (callable running one forward (+ backward), whether it includes the backward)."""
    vocab = weight.shape[0]
    mask = torch.ones(batch, length, device=hidden.device)
    advantages = torch.randn(batch, device=hidden.device)
    ref_logp = -torch.rand(batch, length, device=hidden.device) * 5

    def backward(logp, upstream=grad):
        hidden.grad = weight.grad = None
        logp.backward(upstream)

    def per_row_logp():
        logits = (hidden @ weight.t()).view(batch, length, vocab)                        # (B, L, V) bf16
        rows = [row.log_softmax(-1).gather(1, ids[:, None]).squeeze(1)
                for row, ids in zip(logits, targets.view(batch, length))]
        return torch.stack(rows).float()

    def naive_logp():
        return torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, targets[:, None]).squeeze(1)

    def ours_loss():
        logp = ops.selective_logprob(hidden, weight, targets).view(batch, length)
        backward(grpo_loss(logp, advantages, mask, ref_logp=ref_logp).loss, None)

    rows = {
        "ours": (lambda: backward(ops.selective_logprob(hidden, weight, targets)), True),
        **({"torch_fallback": (lambda: backward(slp_torch(hidden, weight, targets)), True)}
           if hidden.device.type == "cpu" else {}),
        "naive_full_log_softmax": (lambda: backward(naive_logp()), True),
        "reference_per_row_loop": (lambda: backward(per_row_logp(), grad.view(batch, length)), True),
        "torch_chunked_fwd_grad": (lambda: _chunked_fwd_grad(hidden.detach(), weight.detach(), targets, grad), True),
        "ours_plus_grpo_loss": (ours_loss, True),
    }
    liger = _liger(hidden, weight, targets, mask, advantages, ref_logp, batch, length)
    if liger is not None:
        rows["liger_grpo_loss"] = (liger, True)
    with_no_grad = torch.no_grad()
    rows["ours_fwd"] = (with_no_grad(lambda: ops.selective_logprob(hidden, weight, targets)), False)
    rows["naive_fwd"] = (with_no_grad(naive_logp), False)
    rows["reference_per_row_loop_fwd"] = (with_no_grad(per_row_logp), False)
    return rows


def _liger(hidden, weight, targets, mask, advantages, ref_logp, batch, length):
    if hidden.device.type != "cuda":
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        print("liger_grpo_loss: skipped, liger_kernel is not installed (bring its wheel in .whl/)")
        return None
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.04, use_ref_model=True, loss_type="grpo", compiled=True)

    def run():
        hidden.grad = weight.grad = None
        out = loss_fn(hidden.view(batch, length, -1), weight, targets.view(batch, length), mask, advantages,
                      ref_per_token_logps=ref_logp)
        (out[0] if isinstance(out, (tuple, list)) else out).backward()

    return run


def _extra_peak_gb(fn, device) -> float | None:
    """Peak memory above what was allocated before one call of fn, gradients included (None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def _max_err_vs_fp64(ops, selective_logprob_ref, hidden, weight, targets, rows=256):
    h, t = hidden.detach()[:rows], targets[:rows]
    ours = ops.selective_logprob(h, weight.detach(), t)
    ref = selective_logprob_ref(h.double(), weight.detach().double(), t)
    return (ours.double() - ref).abs().max().item()


def main(argv=None):
    args = _args(argv)
    device = torch.device(args.device)
    smoke = args.quick
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")                  # before the kernels are defined
    from omni_fast import ops
    from omni_fast.grpo.loss import grpo_loss
    from omni_fast.kernels import selective_logprob as slp
    from omni_fast.kernels.selective_logprob import selective_logprob_ref

    cpu = device.type == "cpu" and not smoke
    batch, length, hidden_size, vocab = ((2, 19, 64, 1000) if smoke else (2, 128, 896, 151936) if cpu
                                         else (8, 1280, 896, 151936))
    dtype = torch.float32 if cpu else torch.bfloat16
    n = batch * length
    torch.manual_seed(0)
    hidden, weight, targets, grad = _inputs(batch, length, hidden_size, vocab, dtype, device)
    flops_fwd = 2 * n * hidden_size * vocab
    reps = {"warmup": 1, "reps": 1} if smoke else {"warmup": 1, "reps": 3} if cpu else {}
    roofline = BF16_FLOPS if device.type == "cuda" else None
    records = []
    # --quick runs the Triton kernels under the interpreter; a CPU measurement runs the dispatch's CPU path
    backend = ops.force_backend("triton", "selective_logprob") if not cpu else contextlib.nullcontext()
    with backend:
        rows = _rows(ops, grpo_loss, hidden, weight, targets, grad, batch, length,
                     slp.selective_logprob_torch if cpu else None)
        for name, (fn, with_backward) in rows.items():
            if name in args.skip:
                continue
            try:
                extra = _extra_peak_gb(fn, device)
                ms = time_ms(fn, device, **reps)
            except Exception as exc:                                     # noqa: BLE001 (a row, not the run)
                print(f"{name}: failed: {type(exc).__name__}: {exc}")
                records.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            finally:
                hidden.grad = weight.grad = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            flops = 3 * flops_fwd if with_backward else flops_fwd
            records.append({"name": name, "pass": "fwd+bwd" if with_backward else "fwd", "ms": ms,
                            "extra_gb": extra, "tflops": flops / (ms * 1e-3) / 1e12,
                            "roofline": flops / roofline / (ms * 1e-3) if roofline else None})
        if args.sweep and device.type == "cuda":
            records += _sweep_rows(slp, hidden, weight, targets, grad, device, 3 * flops_fwd, reps)
        max_err = _max_err_vs_fp64(ops, selective_logprob_ref, hidden, weight, targets)
    floor = f"{torch.get_num_threads()} threads; "
    if roofline:
        floor = (f"compute floor at 774 TFLOP/s: 3 GEMMs {3 * flops_fwd / BF16_FLOPS * 1e3:.2f} ms, "
                 f"4 GEMMs {4 * flops_fwd / BF16_FLOPS * 1e3:.2f} ms; ")
    print(f"N={n} (B={batch} x L={length}), H={hidden_size}, V={vocab}, {str(dtype).removeprefix('torch.')}; "
          f"{floor}ours max |logp - fp64| over 256 rows {max_err:.3g}")
    table = [[r["name"], r.get("pass", "-"), r.get("ms", "-"), r.get("extra_gb") or "-", r.get("tflops", "-"),
              r.get("roofline") or "-", r.get("error", "")] for r in records]
    emit("selective_logprob", ["name", "pass", "ms", "extra GB", "TFLOP/s", "roofline", "error"], table,
         {"device": str(device), "quick": args.quick, "shape": {"N": n, "H": hidden_size, "V": vocab},
          "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
          "ours_max_abs_err_logp_vs_fp64": max_err, "rows": records,
          "targets": {"ours_ms": 18.0, "ours_extra_gb": 1.2}}, args.out)


if __name__ == "__main__":
    main()
