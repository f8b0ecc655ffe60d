"""Selective log-prob fused with the LM head: log_softmax(hidden @ weight.T / T)[targets], never forming [N, V].

Forward: one tiled GEMM (tl.dot, bf16 in / fp32 accumulate) whose epilogue keeps a running max and sum of
exponentials per row (online log-sum-exp), split over the vocabulary into SPLITS programs per row block so an
H100 has enough programs (N = 10240 rows in blocks of 128 give only 80); a second small kernel merges the
partial sums, gathers the target logit (a dot of the hidden row with its target's weight row) and writes
logp, lse and (optionally) the entropy, all fp32 [N].

Backward: recompute. The logits of one vocabulary chunk are recomputed tile by tile, turned into
d_logits = g / T * (onehot - softmax) with the saved lse and stored in a bounded workspace [N, chunk_v]; then
dH += d_logits @ W_chunk (a Triton GEMM into an fp32 [N, H] accumulator) and dW_chunk = d_logits.T @ H
(torch.mm, i.e. cuBLAS, written once in the weight dtype). dW is skipped when the weight is frozen.

Why recompute rather than form the gradients in the forward (the `torch_chunked_fwd_grad` row of
benchmarks/bench_selective_logprob.py measures the alternative in the same run, so a GPU measurement can
overturn the choice; see benchmarks/RESULTS.md):
  * dW = d_logits.T @ H needs the upstream gradient g, which an autograd op does not know in its forward;
    forming it there means fusing the loss into the op (one op per loss) and materialising logit chunks;
  * the forward stays one GEMM with nothing written to HBM, which is all the reference-model and old-policy
    passes (two of the three log-prob passes of a GRPO step, no grad) ever pay;
  * chunking the vocabulary (not the tokens) reduces dW over all N rows inside one GEMM, so dW is rounded
    once and needs no fp32 [V, H] accumulator (545 MB at V=151,936, H=896): extra memory stays near 0.6 GB;
  * the price is one more GEMM (4 x 2NHV instead of 3 x 2NHV: 14.4 ms instead of 10.8 ms of compute floor at
    the R1-Omni shape), against ~6 GB less HBM traffic than materialising the logits and d_logits.

On the CPU (`selective_logprob_cpu`, the "cpu" backend of ops.selective_logprob) the same vocabulary chunking
runs in torch: the logits of each chunk are kept for the backward while they fit, so forward + backward is
the three GEMMs of autograd through log_softmax(h @ W.T).gather, with fewer passes over [N, V].

Numerics: bf16 inputs are loaded and multiplied as bf16 with fp32 accumulation on the GPU; every softmax
quantity is fp32. Under TRITON_INTERPRET=1 (CPU tensors) the operands are cast to fp32 before tl.dot (the
interpreter's bf16 arithmetic is wrong) and bf16 stores are rounded to nearest-even by hand (its cast
truncates). fp32 inputs use input_precision="ieee" (no TF32).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ._triton import tl, triton  # a sibling: the kernels import nothing else of omni_fast

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr, so that compiled kernels may read it


@triton.jit
def _round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still stored as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mm_acc(acc, a_ptrs, b_ptrs, K, b_step, BLOCK_K: tl.constexpr, DOT_IEEE: tl.constexpr, EVEN_K: tl.constexpr):
    """acc (M, N) += A @ B over the reduction index [0, K), both GEMMs of this file (logits = H @ W.T and
    dH += d_logits @ W). a_ptrs: the (M, BLOCK_K) tile, contiguous along K (advanced by BLOCK_K); b_ptrs: the
    (BLOCK_K, N) tile, advanced by b_step. EVEN_K (K % BLOCK_K == 0) drops the tail mask. DOT_IEEE multiplies
    in fp32 (fp32 inputs, or the interpreter, whose bf16 arithmetic is wrong)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k + offs_k)[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=(k + offs_k)[:, None] < K, other=0.0)
        if DOT_IEEE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += b_step
    return acc


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, rows, cols, H, stride_hn, stride_wv,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_IEEE: tl.constexpr, EVEN_H: tl.constexpr):
    """acc[BLOCK_N, BLOCK_V] = hidden[rows, :] @ weight[cols, :].T in fp32. rows and cols must be in range
    (callers clamp them and mask the result), so only the H tail needs a mask (none when EVEN_H)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    h_ptrs = hidden_ptr + rows[:, None] * stride_hn + offs_h[None, :]                # (BLOCK_N, BLOCK_H)
    w_ptrs = weight_ptr + cols[None, :] * stride_wv + offs_h[:, None]                # (BLOCK_H, BLOCK_V)
    return _mm_acc(acc, h_ptrs, w_ptrs, H, BLOCK_H, BLOCK_H, DOT_IEEE, EVEN_H)


@triton.jit
def _selective_logprob_fwd_kernel(
    hidden_ptr, weight_ptr, part_ptr,
    N, V, H, stride_hn, stride_wv, tiles_per_split, scale2,
    WITH_ENTROPY: tl.constexpr, DOT_IEEE: tl.constexpr, EVEN_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Partial log-sum-exp of one (row block, vocabulary split) of the raw logits a = hidden @ weight.T.

    For the split's columns v and each row n, with scale2 = log2(e) / T (so 2^((a - m) * scale2) = e^((a - m) / T)):
        part[0, s, n] = m = max_v a[n, v]                                  (raw units: no rounding)
        part[1, s, n] = sum_v 2^((a[n, v] - m) * scale2)
        part[2, s, n] = sum_v 2^((a[n, v] - m) * scale2) * (a[n, v] - m)   (WITH_ENTROPY only)
    Only differences to the running max are scaled, so large logits lose no precision.
    hidden [N, H], weight [V, H] (unit stride along H), part [2 or 3, SPLITS, N] fp32.
    Grid (cdiv(N, BLOCK_N), SPLITS); split s owns vocabulary tiles [s * tiles_per_split, (s + 1) * tiles_per_split).
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_in = rows % N                                                                 # in range: unmasked loads
    offs_v = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    zs = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t_begin, t_end):
        cols = t * BLOCK_V + offs_v
        col_ok = cols < V
        acc = _logits_tile(hidden_ptr, weight_ptr, rows_in, cols % V, H, stride_hn, stride_wv,
                           BLOCK_N, BLOCK_V, BLOCK_H, DOT_IEEE, EVEN_H)
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(acc, axis=1))
        alpha = tl.exp2((m - m_new) * scale2)
        diff = acc - m_new[:, None]
        e = tl.exp2(diff * scale2)
        if WITH_ENTROPY:
            # sum e * (a - m_new) = alpha * (old sum + (m - m_new) * old s) + this tile's terms
            carried = zs + tl.where(s > 0, m - m_new, 0.0) * s
            zs = alpha * carried + tl.sum(e * tl.where(col_ok[None, :], diff, 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + n_splits * N, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(out + 2 * n_splits * N, zs, mask=row_ok)


@triton.jit
def _selective_logprob_merge_kernel(
    part_ptr, hidden_ptr, weight_ptr, targets_ptr, logp_ptr, lse_ptr, entropy_ptr,
    N, H, stride_hn, stride_wv, n_splits, inv_temp,
    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Merge the SPLITS partial sums of each row and finish (z = a / T, M = max_s m_s, w_s = e^((m_s - M) / T)):
        S = sum_s S_s w_s,  lse = M / T + ln S
        logp = min(a[target] / T - lse, 0),  a[target] = hidden[n] . weight[target[n]]
        entropy = lse - sum_v softmax_v z_v = ln S - (sum_s w_s (Z_s + (m_s - M) S_s)) / (T S)
    part [2 or 3, n_splits, N] fp32 -> logp, lse, entropy fp32 [N]. Grid (cdiv(N, BLOCK_N),).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    splits = tl.arange(0, BLOCK_S)
    idx = splits[None, :] * N + rows[:, None]                                        # (BLOCK_N, BLOCK_S)
    ok = row_ok[:, None] & (splits < n_splits)[None, :]
    m_s = tl.load(part_ptr + idx, mask=ok, other=float("-inf"))
    s_s = tl.load(part_ptr + n_splits * N + idx, mask=ok, other=0.0)
    m = tl.where(row_ok, tl.max(m_s, axis=1), 0.0)
    w = tl.where(ok, tl.exp((m_s - m[:, None]) * inv_temp), 0.0)
    s = tl.where(row_ok, tl.sum(s_s * w, axis=1), 1.0)
    log_s = tl.log(s)
    lse = m * inv_temp + log_s

    target = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    offs_h = tl.arange(0, BLOCK_H)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        kk = k + offs_h
        ok_h = row_ok[:, None] & (kk < H)[None, :]
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + kk[None, :], mask=ok_h, other=0.0)
        wt = tl.load(weight_ptr + target[:, None] * stride_wv + kk[None, :], mask=ok_h, other=0.0)
        dot += tl.sum(h.to(tl.float32) * wt.to(tl.float32), axis=1)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, tl.minimum((dot - m) * inv_temp - log_s, 0.0), mask=row_ok)
    if WITH_ENTROPY:
        z_s = tl.load(part_ptr + 2 * n_splits * N + idx, mask=ok, other=0.0)
        carried = z_s + tl.where(ok & (s_s > 0), m_s - m[:, None], 0.0) * s_s
        tl.store(entropy_ptr + rows, log_s - tl.sum(w * carried, axis=1) * inv_temp / s, mask=row_ok)


@triton.jit
def _selective_logprob_bwd_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, grad_ptr, d_ptr,
    N, V, H, v_begin, chunk_cols, stride_hn, stride_wv, stride_dn, inv_temp,
    DOT_IEEE: tl.constexpr, EXP_FP64: tl.constexpr, RNE_BF16: tl.constexpr, EVEN_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """d_logits of one vocabulary chunk, logits recomputed:
        d[n, j] = g[n] / T * (1[v == target[n]] - e^(a[n, v] / T - lse[n])),  v = v_begin + j
    for j < chunk_cols and v < V. hidden [N, H], weight [V, H], lse and g fp32 [N], d [N, >= chunk_cols]
    (row stride stride_dn, dtype of the inputs). EXP_FP64 evaluates the exponential in fp64 (fp32 inputs).
    Grid (cdiv(N, BLOCK_N), cdiv(chunk_cols, BLOCK_V)).
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_begin + local
    col_ok = (local < chunk_cols) & (cols < V)
    acc = _logits_tile(hidden_ptr, weight_ptr, rows % N, cols % V, H, stride_hn, stride_wv,
                       BLOCK_N, BLOCK_V, BLOCK_H, DOT_IEEE, EVEN_H)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0) * inv_temp
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    if EXP_FP64:
        # fp32 inputs: one rounding in p, as torch's exp(logp) (base 2 in fp32 adds one; fine for bf16)
        p = tl.exp(acc.to(tl.float64) * inv_temp - lse.to(tl.float64)[:, None]).to(tl.float32)
    else:
        p = tl.exp2((acc * inv_temp - lse[:, None]) * LOG2E)
    d = g[:, None] * (tl.where(cols[None, :] == target[:, None], 1.0, 0.0) - p)
    if RNE_BF16:
        d = _round_to_bf16(d)
    tl.store(d_ptr + rows[:, None] * stride_dn + local[None, :], d.to(d_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _selective_logprob_dh_kernel(
    d_ptr, weight_ptr, dh_ptr,
    N, H, K, v_begin, stride_dn, stride_wv, stride_dhn,
    DOT_IEEE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dh[n, h] += sum_{j < K} d[n, j] * weight[v_begin + j, h]: one vocabulary chunk of dH = d_logits @ W.
    d [N, >= K] (row stride stride_dn), weight [V, H], dh [N, H] fp32 accumulator. EVEN_K: K % BLOCK_K == 0.
    Grid (cdiv(N, BLOCK_M), cdiv(H, BLOCK_H)).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    out_ok = (rows < N)[:, None] & (cols < H)[None, :]
    out = dh_ptr + rows[:, None] * stride_dhn + cols[None, :]
    acc = tl.load(out, mask=out_ok, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = d_ptr + (rows % N)[:, None] * stride_dn + offs_k[None, :]                # (BLOCK_M, BLOCK_K)
    b_ptrs = weight_ptr + (v_begin + offs_k)[:, None] * stride_wv + (cols % H)[None, :]  # (BLOCK_K, BLOCK_H)
    acc = _mm_acc(acc, a_ptrs, b_ptrs, K, BLOCK_K * stride_wv, BLOCK_K, DOT_IEEE, EVEN_K)
    tl.store(out, acc, mask=out_ok)


# ----------------------------------------------------------------------------------------------------------
# host side


class SelectiveLogprobConfig(NamedTuple):
    block_n: int     # rows per program (forward and logit recompute)
    block_v: int     # vocabulary columns per tile
    block_h: int     # reduction step over H
    splits: int      # forward programs along V per row block (partial sums merged afterwards)
    chunk_v: int     # vocabulary columns per backward chunk: the d_logits workspace is [N, chunk_v]
    dh_block_m: int  # dH GEMM tile
    dh_block_h: int
    dh_block_k: int
    num_warps: int
    num_stages: int


_WORKSPACE_BYTES = 256 * 2**20  # bound on the backward's d_logits chunk


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _round_up(x: int, multiple: int) -> int:
    return triton.cdiv(x, multiple) * multiple


def _chunk_v(n: int, v: int, block_v: int, elem_bytes: int, budget: int) -> int:
    widest = max(block_v, budget // max(1, n * elem_bytes) // block_v * block_v)
    n_chunks = triton.cdiv(v, widest)
    return _round_up(triton.cdiv(v, n_chunks), block_v)


def gpu_config(n: int, v: int, h: int, dtype: torch.dtype = torch.bfloat16, sm_count: int = 132,
               workspace_bytes: int = _WORKSPACE_BYTES) -> SelectiveLogprobConfig:
    """CUDA: 128 x 128 output tiles, 64-wide reduction steps (32 for fp32: 3 stages of operands stay near 96 KB
    of shared memory), 8 warps; enough vocabulary splits for about four programs per SM."""
    elem = torch.empty((), dtype=dtype).element_size()
    block_n, block_v, block_h = 128, 128, 128 // elem
    splits = max(1, min(triton.cdiv(v, block_v), triton.cdiv(4 * sm_count, triton.cdiv(n, block_n))))
    return SelectiveLogprobConfig(block_n, block_v, block_h, splits, _chunk_v(n, v, block_v, elem, workspace_bytes),
                                  dh_block_m=128, dh_block_h=128, dh_block_k=block_h, num_warps=8, num_stages=3)


def interpreter_config(n: int, v: int, h: int, dtype: torch.dtype = torch.bfloat16,
                       workspace_bytes: int = _WORKSPACE_BYTES) -> SelectiveLogprobConfig:
    """CPU (TRITON_INTERPRET=1): few, large blocks (the interpreter's cost is per operation, not per element),
    two vocabulary splits and two backward chunks so the merge and the chunk loop always run."""
    elem = torch.empty((), dtype=dtype).element_size()
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_h = min(128, max(16, triton.next_power_of_2(h)))
    block_v = 256
    chunk_v = min(_chunk_v(n, v, block_v, elem, workspace_bytes), _round_up(triton.cdiv(v, 2), block_v))
    return SelectiveLogprobConfig(block_n, block_v, block_h, min(2, triton.cdiv(v, block_v)), chunk_v,
                                  dh_block_m=block_n, dh_block_h=block_h, dh_block_k=256, num_warps=4, num_stages=1)


def default_config(n: int, v: int, h: int, device: torch.device | str,
                   dtype: torch.dtype = torch.bfloat16) -> SelectiveLogprobConfig:
    """Block sizes for an [n, h] x [v, h] problem on `device` (gpu_config on CUDA, else interpreter_config)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return gpu_config(n, v, h, dtype, _sm_count(index))
    return interpreter_config(n, v, h, dtype)


def _flags(x: torch.Tensor) -> dict[str, bool]:
    interpret = x.device.type == "cpu"
    return {"DOT_IEEE": interpret or x.dtype == torch.float32}


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    assert hidden.ndim == 2 and weight.ndim == 2 and targets.ndim == 1, "hidden [N, H], weight [V, H], targets [N]"
    assert weight.shape[1] == hidden.shape[1], f"hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}"
    assert targets.shape[0] == hidden.shape[0], f"targets {tuple(targets.shape)} vs hidden {tuple(hidden.shape)}"
    assert hidden.dtype == weight.dtype and hidden.dtype in (torch.float32, torch.bfloat16), \
        f"hidden {hidden.dtype} and weight {weight.dtype} must both be float32 or bfloat16"
    assert targets.dtype in (torch.int64, torch.int32), f"targets must be integer, got {targets.dtype}"
    assert hidden.stride(1) == 1 and weight.stride(1) == 1, "hidden and weight need unit stride along H"
    assert targets.is_contiguous(), "targets must be contiguous"
    assert hidden.device == weight.device == targets.device, "hidden, weight and targets on one device"
    assert weight.numel() < 2**31 and hidden.numel() < 2**31, "int32 offsets"


def selective_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, with_entropy: bool = False,
                          config: SelectiveLogprobConfig | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logp, lse (and entropy) fp32 [N] of z = hidden @ weight.T / temperature. Targets must lie in [0, V)."""
    _check(hidden, weight, targets)
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    (n, h), v = hidden.shape, weight.shape[0]
    cfg = config or default_config(n, v, h, hidden.device, hidden.dtype)
    logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    if n == 0:
        return logp, lse, entropy
    n_tiles = triton.cdiv(v, cfg.block_v)
    tiles_per_split = triton.cdiv(n_tiles, cfg.splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    part = torch.empty(3 if with_entropy else 2, splits, n, device=hidden.device, dtype=torch.float32)
    _selective_logprob_fwd_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        hidden, weight, part, n, v, h, hidden.stride(0), weight.stride(0), tiles_per_split,
        LOG2E.value / temperature, WITH_ENTROPY=with_entropy, EVEN_H=h % cfg.block_h == 0, **_flags(hidden),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    block_merge = min(64, max(16, triton.next_power_of_2(n)))
    _selective_logprob_merge_kernel[(triton.cdiv(n, block_merge),)](
        part, hidden, weight, targets, logp, lse, entropy if with_entropy else lse,
        n, h, hidden.stride(0), weight.stride(0), splits, 1.0 / temperature,
        WITH_ENTROPY=with_entropy, BLOCK_N=block_merge, BLOCK_S=max(2, triton.next_power_of_2(splits)),
        BLOCK_H=min(128, max(16, triton.next_power_of_2(h))), num_warps=4)
    return logp, lse, entropy


def selective_logprob_bwd(grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                          targets: torch.Tensor, lse: torch.Tensor, temperature: float = 1.0,
                          hidden_grad: bool = True, weight_grad: bool = True,
                          config: SelectiveLogprobConfig | None = None
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dH [N, H], dW [V, H]) in the input dtype for upstream grad_logp [N]; either is None when not asked for."""
    _check(hidden, weight, targets)
    (n, h), v = hidden.shape, weight.shape[0]
    assert grad_logp.shape == (n,) and lse.shape == (n,) and lse.dtype == torch.float32 and lse.is_contiguous()
    cfg = config or default_config(n, v, h, hidden.device, hidden.dtype)
    grad = grad_logp.to(torch.float32).contiguous()
    dh = torch.zeros(n, h, device=hidden.device, dtype=torch.float32) if hidden_grad else None
    dw = torch.empty_like(weight) if weight_grad else None
    if n == 0 or not (hidden_grad or weight_grad):
        return (dh.to(hidden.dtype) if dh is not None else None), (dw.zero_() if dw is not None else None)
    flags = _flags(hidden)
    rne = hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16
    chunk_v = min(cfg.chunk_v, _round_up(v, cfg.block_v))
    d = torch.empty(n, chunk_v, device=hidden.device, dtype=hidden.dtype)           # (N, chunk_v) workspace
    for v0 in range(0, v, chunk_v):
        cols = min(chunk_v, v - v0)
        _selective_logprob_bwd_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(cols, cfg.block_v))](
            hidden, weight, targets, lse, grad, d, n, v, h, v0, cols,
            hidden.stride(0), weight.stride(0), d.stride(0), 1.0 / temperature,
            **flags, EXP_FP64=hidden.dtype == torch.float32, RNE_BF16=rne, EVEN_H=h % cfg.block_h == 0,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if dh is not None:
            _selective_logprob_dh_kernel[(triton.cdiv(n, cfg.dh_block_m), triton.cdiv(h, cfg.dh_block_h))](
                d, weight, dh, n, h, cols, v0, d.stride(0), weight.stride(0), dh.stride(0), **flags,
                EVEN_K=cols % cfg.dh_block_k == 0,
                BLOCK_M=cfg.dh_block_m, BLOCK_H=cfg.dh_block_h, BLOCK_K=cfg.dh_block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if dw is not None:
            torch.mm(d[:, :cols].t(), hidden, out=dw[v0:v0 + cols])                   # (cols, H)
    return (dh.to(hidden.dtype) if dh is not None else None), dw


def selective_logprob_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, with_stats: bool = False):
    """The definition: log_softmax(hidden @ weight.T / T)[targets] in the dtype of the inputs, [N, V] in full.

    Returns logp [N] or, with_stats, (logp, lse, entropy) with entropy = lse - sum_v softmax_v * z_v.
    """
    logits = (hidden @ weight.t()) / temperature                                        # (N, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not with_stats:
        return logp
    lse = torch.logsumexp(logits, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, lse, entropy


def _chunk_logprob(hidden, weight, targets, temperature, with_stats):
    logits = (hidden.float() @ weight.float().t()) / temperature                       # (rows, V)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    if not with_stats:
        return (logp,)
    with torch.no_grad():
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, lse.detach(), entropy


def selective_logprob_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            temperature: float = 1.0, with_stats: bool = False):
    """Portable fallback (any device, plain torch): row chunks of at most 2^24 logits, each recomputed in
    backward by activation checkpointing, so memory stays bounded. Same contract as `selective_logprob`."""
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    rows = max(1, 2**24 // max(1, weight.shape[0]))
    parts = [torch.utils.checkpoint.checkpoint(_chunk_logprob, hidden2[i:i + rows], weight,
                                               flat_targets[i:i + rows], temperature, with_stats,
                                               use_reentrant=False)
             for i in range(0, hidden2.shape[0], rows)]
    if not parts:
        parts = [tuple(torch.empty(0, device=hidden.device) for _ in range(3 if with_stats else 1))]
    outs = tuple(torch.cat(p).view(targets.shape) for p in zip(*parts))
    return outs if with_stats else outs[0]


_CPU_CHUNK_LOGITS = 2**26  # logits per vocabulary chunk on the CPU (256 MB fp32): long GEMMs, bounded temporaries
_CPU_KEEP_BYTES = 2**31  # logits kept for the backward up to this size; past it they are recomputed


def _cpu_chunks(n: int, v: int) -> list[tuple[int, int]]:
    cols = max(1, min(v, _CPU_CHUNK_LOGITS // max(1, n)))
    return [(v0, min(v, v0 + cols)) for v0 in range(0, v, cols)]


class _CpuSelectiveLogprob(torch.autograd.Function):
    """The CPU path: vocabulary chunks of h @ W_c.T with their log-sum-exps merged; the logits are kept for the
    backward while they fit _CPU_KEEP_BYTES, so it runs the same three GEMMs as autograd through
    log_softmax(h @ W.T).gather (logits, dH, dW), with fewer [N, V] passes. Chunking the vocabulary (not the
    rows) keeps every GEMM's reduction long and writes each row of dW once."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_stats, needs_grad):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        h = hidden.to(acc)
        n, v = h.shape[0], weight.shape[0]
        keep = needs_grad and n * v * h.element_size() <= _CPU_KEEP_BYTES
        chunks, lses, moments = [], [], []
        for v0, v1 in _cpu_chunks(n, v):
            z = torch.mm(h, weight[v0:v1].to(acc).t())                                 # (N, Vc)
            if temperature != 1.0:
                z.div_(temperature)
            lse_c = torch.logsumexp(z, dim=1)
            lses.append(lse_c)
            if with_stats:
                moments.append((torch.exp(z - lse_c[:, None]) * z).sum(dim=1))      # E_c[z] under chunk softmax
            chunks.append(z if keep else None)
        lse_parts = torch.stack(lses, dim=1)                                           # (N, chunks)
        lse = torch.logsumexp(lse_parts, dim=1)
        target_logit = (h * weight[targets].to(acc)).sum(dim=1) / temperature
        logp = (target_logit - lse).float()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunks, ctx.temperature = chunks, temperature
        if not with_stats:
            return logp, None, None
        mean_z = (torch.exp(lse_parts - lse[:, None]) * torch.stack(moments, dim=1)).sum(dim=1)
        lse_out, entropy = lse.float(), (lse - mean_z).float()
        ctx.mark_non_differentiable(lse_out, entropy)
        return logp, lse_out, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        acc = lse.dtype
        h = hidden.to(acc)
        t = ctx.temperature
        g = grad_logp.to(acc) / t                                                      # (N,)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros_like(h) if want_h else None
        dw = torch.empty(weight.shape, dtype=weight.dtype) if want_w else None
        rows = torch.arange(h.shape[0])
        spans = _cpu_chunks(h.shape[0], weight.shape[0])
        chunks, ctx.chunks = ctx.chunks, None  # kept logits become d_logits in place; a second backward recomputes
        for (v0, v1), z in zip(spans, chunks or [None] * len(spans)):
            w_c = weight[v0:v1].to(acc)
            if z is None:
                z = torch.mm(h, w_c.t()).div_(t)
            d = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])                          # (N, Vc): -g/T p
            inside = (targets >= v0) & (targets < v1)
            d[rows[inside], targets[inside] - v0] += g[inside]                        # + g/T at the target
            if dh is not None:
                dh.addmm_(d, w_c)
            if dw is not None and dw.dtype == acc:
                torch.mm(d.t(), h, out=dw[v0:v1])                                      # (Vc, H), no copy
            elif dw is not None:
                dw[v0:v1] = torch.mm(d.t(), h)
        return (dh.to(hidden.dtype) if dh is not None else None), dw, None, None, None, None


def selective_logprob_cpu(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, with_stats: bool = False):
    """The CPU path (_CpuSelectiveLogprob); same contract as `selective_logprob`."""
    lead = targets.shape
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logp, lse, entropy = _CpuSelectiveLogprob.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                    targets.reshape(-1).long(), float(temperature), with_stats,
                                                    needs_grad)
    if not with_stats:
        return logp.view(lead)
    return logp.view(lead), lse.view(lead), entropy.view(lead)


class SelectiveLogprobFunction(torch.autograd.Function):
    """logp = log_softmax(hidden @ weight.T / T)[targets] with a recomputing backward; lse and entropy are
    returned alongside, detached (metrics)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, config):
        logp, lse, entropy = selective_logprob_fwd(hidden, weight, targets, temperature, with_entropy, config)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.config = temperature, config
        ctx.mark_non_differentiable(lse, *([entropy] if entropy is not None else []))
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        dh, dw = selective_logprob_bwd(grad_logp, hidden, weight, targets, lse, ctx.temperature,
                                       ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.config)
        return dh, dw, None, None, None, None


def selective_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, with_stats: bool = False,
                      config: SelectiveLogprobConfig | None = None):
    """Triton path. hidden [..., H], weight [V, H], targets [...] -> logp fp32 [...]; with_stats also returns
    lse and entropy (fp32 [...], detached). Differentiable w.r.t. hidden and weight."""
    lead = targets.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])                                      # (N, H)
    if hidden2.stride(-1) != 1:
        hidden2 = hidden2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    logp, lse, entropy = SelectiveLogprobFunction.apply(
        hidden2, weight, targets.reshape(-1).contiguous(), float(temperature), with_stats, config)
    if not with_stats:
        return logp.view(lead)
    return logp.view(lead), lse.view(lead), entropy.view(lead)
