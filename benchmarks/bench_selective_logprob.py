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

    python benchmarks/bench_selective_logprob.py                  # CUDA: the R1-Omni shape
    python benchmarks/bench_selective_logprob.py --device cpu     # small shape, Triton interpreter (smoke)
    python benchmarks/bench_selective_logprob.py --sweep           # also time `ours` under other tile configs
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    p.add_argument("--batch", type=int, default=None, help="sequences (default 8; 2 on cpu)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (default 1280; 19 on cpu)")
    p.add_argument("--hidden", type=int, default=None, help="H (default 896; 64 on cpu)")
    p.add_argument("--vocab", type=int, default=None, help="V (default 151936; 1000 on cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    p.add_argument("--sweep", action="store_true", help="also time ours (fwd+bwd) under SWEEP's tile configs")
    return p.parse_args()


# (block_n, block_v, block_h, num_warps, num_stages) tried by --sweep, besides the default config
SWEEP = [(128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 2), (128, 64, 64, 4, 4)]


def _sweep_rows(torch, slp, hidden, weight, targets, grad, device, flops):
    rows = []
    base = slp.default_config(*hidden.shape[:1], weight.shape[0], hidden.shape[1], device, hidden.dtype)
    for block_n, block_v, block_h, warps, stages in SWEEP:
        cfg = base._replace(block_n=block_n, block_v=block_v, block_h=block_h, num_warps=warps, num_stages=stages,
                            chunk_v=slp._round_up(base.chunk_v, block_v))
        name = f"ours[{block_n}x{block_v}x{block_h} w{warps} s{stages}]"

        def run():
            slp.selective_logprob(hidden, weight, targets, config=cfg).backward(grad)

        try:
            ms = common.median_ms(run, device, grad_to_none=[hidden, weight])
        except Exception as exc:                                         # noqa: BLE001 (e.g. out of resources)
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        rows.append({"name": name, "pass": "fwd+bwd", "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12,
                     "roofline": flops / common.H100_BF16_FLOPS / (ms * 1e-3)})
    return rows


def _inputs(torch, batch, length, hidden_size, vocab, dtype, device):
    n = batch * length
    hidden = torch.randn(n, hidden_size, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) * (2 / hidden_size**0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=device)
    grad = torch.randn(n, device=device)
    return hidden, weight, targets, grad


def _chunked_fwd_grad(torch, hidden, weight, targets, grad, rows=1024):
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


def _rows(torch, ops, grpo_loss, hidden, weight, targets, grad, batch, length, skip):
    """name -> (callable running one forward (+ backward), is_backward)."""
    vocab = weight.shape[0]
    mask = torch.ones(batch, length, device=hidden.device)
    advantages = torch.randn(batch, device=hidden.device)
    ref_logp = -torch.rand(batch, length, device=hidden.device) * 5

    def ours():
        ops.selective_logprob(hidden, weight, targets).backward(grad)

    def naive():
        logits = (hidden @ weight.t()).float()
        torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1).backward(grad)

    def per_row_logp():
        logits = (hidden @ weight.t()).view(batch, length, vocab)                        # (B, L, V) bf16
        rows = [row.log_softmax(-1).gather(1, ids[:, None]).squeeze(1)
                for row, ids in zip(logits, targets.view(batch, length))]
        return torch.stack(rows).float()

    def per_row():
        per_row_logp().backward(grad.view(batch, length))

    def chunked():
        _chunked_fwd_grad(torch, hidden.detach(), weight.detach(), targets, grad)

    def ours_loss():
        logp = ops.selective_logprob(hidden, weight, targets).view(batch, length)
        grpo_loss(logp, advantages, mask, ref_logp=ref_logp).loss.backward()

    def ours_fwd():
        with torch.no_grad():
            ops.selective_logprob(hidden, weight, targets)

    def naive_fwd():
        with torch.no_grad():
            torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, targets[:, None])

    def per_row_fwd():
        with torch.no_grad():
            per_row_logp()

    rows = {"ours": (ours, True), "naive_full_log_softmax": (naive, True),
            "reference_per_row_loop": (per_row, True), "torch_chunked_fwd_grad": (chunked, True),
            "ours_plus_grpo_loss": (ours_loss, True)}
    liger = _liger(torch, hidden, weight, targets, mask, advantages, ref_logp, batch, length)
    if liger is not None:
        rows["liger_grpo_loss"] = (liger, True)
    rows.update({"ours_fwd": (ours_fwd, False), "naive_fwd": (naive_fwd, False),
                 "reference_per_row_loop_fwd": (per_row_fwd, False)})
    return {k: v for k, v in rows.items() if k not in skip}


def _liger(torch, hidden, weight, targets, mask, advantages, ref_logp, batch, length):
    if hidden.device.type != "cuda":
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        print("liger_grpo_loss: skipped, liger_kernel is not installed")
        return None
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.04, use_ref_model=True, loss_type="grpo", compiled=True)

    def run():
        out = loss_fn(hidden.view(batch, length, -1), weight, targets.view(batch, length), mask, advantages,
                      ref_per_token_logps=ref_logp)
        (out[0] if isinstance(out, (tuple, list)) else out).backward()

    return run


def _max_err_vs_fp64(torch, ops, selective_logprob_ref, hidden, weight, targets, rows=256):
    h, t = hidden.detach()[:rows], targets[:rows]
    ours = ops.selective_logprob(h, weight.detach(), t)
    ref = selective_logprob_ref(h.double(), weight.detach().double(), t)
    return (ours.double() - ref).abs().max().item()


def main():
    args = _args()
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    common.setup_device(device)
    from omni_fast import ops
    from omni_fast.grpo.loss import grpo_loss
    from omni_fast.kernels import selective_logprob as slp
    from omni_fast.kernels.selective_logprob import selective_logprob_ref

    small = device == "cpu"
    batch = args.batch or (2 if small else 8)
    length = args.length or (19 if small else 1280)
    hidden_size = args.hidden or (64 if small else 896)
    vocab = args.vocab or (1000 if small else 151936)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    n = batch * length
    torch.manual_seed(0)
    hidden, weight, targets, grad = _inputs(torch, batch, length, hidden_size, vocab, dtype, device)
    flops_fwd = 2 * n * hidden_size * vocab
    forced = ops.force_backend("triton", "selective_logprob")          # CPU: run the kernels, not the fallback
    with forced:
        rows = []
        for name, (fn, backward) in _rows(torch, ops, grpo_loss, hidden, weight, targets, grad, batch, length,
                                          args.skip).items():
            hidden.grad = weight.grad = None
            try:
                extra = common.extra_peak_gb(fn, device)
                ms = common.median_ms(fn, device, grad_to_none=[hidden, weight])
            except Exception as exc:                                     # noqa: BLE001 (a row, not the run)
                print(f"{name}: failed: {type(exc).__name__}: {exc}")
                rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            finally:
                hidden.grad = weight.grad = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            flops = 3 * flops_fwd if backward else flops_fwd
            rows.append({"name": name, "pass": "fwd+bwd" if backward else "fwd", "ms": ms, "extra_gb": extra,
                         "tflops": flops / (ms * 1e-3) / 1e12,
                         "roofline": flops / common.H100_BF16_FLOPS / (ms * 1e-3)})
        if args.sweep:
            rows += _sweep_rows(torch, slp, hidden, weight, targets, grad, device, 3 * flops_fwd)
        max_err = _max_err_vs_fp64(torch, ops, selective_logprob_ref, hidden, weight, targets)
    print(f"selective_logprob  N={n} (B={batch} x L={length})  H={hidden_size}  V={vocab}  {args.dtype}  "
          f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter, not timed)'}")
    print(f"compute floor at 774 TFLOP/s: 3 GEMMs {3 * flops_fwd / common.H100_BF16_FLOPS * 1e3:.2f} ms, "
          f"4 GEMMs (recompute) {4 * flops_fwd / common.H100_BF16_FLOPS * 1e3:.2f} ms; "
          f"ours max |logp - fp64| over 256 rows: {max_err:.3g}")
    common.print_table(rows, ["name", "pass", "ms", "extra_gb", "tflops", "roofline", "error"])
    common.emit_json({"bench": "selective_logprob", "device": device, "timed": device == "cuda",
                      "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                      "shape": {"N": n, "batch": batch, "length": length, "H": hidden_size, "V": vocab},
                      "dtype": args.dtype, "rows": rows, "ours_max_abs_err_logp_vs_fp64": max_err,
                      "targets": {"ours_ms": 18.0, "ours_extra_gb": 1.2}})


if __name__ == "__main__":
    main()
