"""Cascade (shared-prefix) decode attention.

One decode step for B rows (samples). Row b belongs to prompt group g = groups[b]; its keys are the group's
prefix (prefix_k[g, :prefix_lens[g]], written once at prefill and shared by all the group's samples) followed
by its own generated keys (gen_k[slots[b], :gen_lens[b]]). Output:

    out[b, h] = softmax(q[b, h] . [K_prefix(g); K_gen(b)]^T * scale) @ [V_prefix(g); V_gen(b)]

GQA: query head h reads KV head h // (Hq / Hkv).

The Triton path runs in two launches:
  1. _prefix_kernel, grid (P, Hkv, splits): the prefix is read ONCE per (group, KV head) for all of the group's
     rows and query heads together (n samples x Hq/Hkv heads = the M dimension of one tl.dot), split along the
     prefix for parallelism (flash-decoding); each split writes an unnormalised partial (o, lse) per row/head.
  2. _gen_merge_kernel, grid (B, Hkv): each row's own generated keys, then the merge of its partials with the
     prefix splits by log-sum-exp.
Rows must be sorted by group (the engine keeps them so); `group_offsets` [P + 1] delimits each group's rows.

The CPU path (`cascade_attention_cpu`, plain torch) has the same structure: per group one batched matmul of all
its (row, head) queries against the prefix, then each row's generated keys, merged by log-sum-exp.
"""
from __future__ import annotations

import math

import torch

from ._triton import tl, triton  # a sibling: the kernels import nothing else of omni_fast


@triton.jit
def _attend(q, K, V, sk_t, sv_t, start, end, m_i, l_i, acc, scale,
            D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax attention of q (M, D) over keys/values [start, end) at K / V (one sequence, one KV head;
    token stride sk_t / sv_t): returns the running (max, sum, unnormalised output) updated."""
    offs_d = tl.arange(0, D)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        k = tl.load(K + offs_n[None, :] * sk_t + offs_d[:, None], mask=n_valid[None, :], other=0.0)  # (D, BLOCK_N)
        v = tl.load(V + offs_n[:, None] * sv_t + offs_d[None, :], mask=n_valid[:, None], other=0.0)  # (BLOCK_N, D)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * scale
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefix_kernel(Q, K, V, PrefixLens, GroupOffsets, Opart, Lpart,
                   sq_b, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, so_b, so_h, so_s, sl_b, sl_h,
                   scale, split_len,
                   REP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Partial attention of all of group g's (row, head) queries for KV head kvh over prefix keys
    [split * split_len, (split + 1) * split_len) ∩ [0, prefix_len): Opart = softmax-weighted sum of the split's
    values (normalised over the split), Lpart = log-sum-exp of the split's scores (-inf, Opart 0 when empty)."""
    g, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0 = tl.load(GroupOffsets + g)
    n_rows = tl.load(GroupOffsets + g + 1) - row0
    prefix_len = tl.load(PrefixLens + g)
    start = split * split_len
    end = tl.minimum(start + split_len, prefix_len)
    offs_d = tl.arange(0, D)
    for m0 in range(0, n_rows * REP, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)  # flat (row, head-in-group) index
        m_valid = offs_m < n_rows * REP
        rows = row0 + offs_m // REP
        heads = kvh * REP + offs_m % REP
        q = tl.load(Q + rows[:, None] * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        m_i, l_i, acc = _attend(q, K + g * sk_p + kvh * sk_h, V + g * sv_p + kvh * sv_h, sk_t, sv_t, start, end,
                                m_i, l_i, acc, scale, D, BLOCK_N, UPCAST, PRECISION)
        nonempty = l_i > 0
        lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        o_ptr = Opart + rows[:, None] * so_b + heads[:, None] * so_h + split * so_s + offs_d[None, :]
        tl.store(o_ptr, o, mask=m_valid[:, None])
        tl.store(Lpart + rows * sl_b + heads * sl_h + split, lse, mask=m_valid)


@triton.jit
def _gen_merge_kernel(Q, K, V, Slots, GenLens, Opart, Lpart, Out,
                      sq_b, sq_h, sk_s, sk_t, sk_h, sv_s, sv_t, sv_h, so_b, so_h, so_s, sl_b, sl_h, sout_b, sout_h,
                      scale, n_splits,
                      REP: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Row b, KV head kvh: attention over the row's generated keys [0, gen_len), merged with the prefix
    partials: out = sum_i exp(lse_i - lse) o_i / ..., all in fp32."""
    b, kvh = tl.program_id(0), tl.program_id(1)
    slot = tl.load(Slots + b)
    gen_len = tl.load(GenLens + b)
    offs_h = tl.arange(0, BLOCK_H)
    h_valid = offs_h < REP
    heads = kvh * REP + offs_h
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=h_valid[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    m_i, l_i, acc = _attend(q, K + slot * sk_s + kvh * sk_h, V + slot * sv_s + kvh * sv_h, sk_t, sv_t, 0, gen_len,
                            m_i, l_i, acc, scale, D, BLOCK_N, UPCAST, PRECISION)
    # merge the generated part with each prefix split, every part given as (normalised output, lse)
    lse_gen = m_i + tl.log(l_i)  # gen_len >= 1, so finite
    m_all = lse_gen
    for s_i in range(0, n_splits):
        lse_s = tl.load(Lpart + b * sl_b + heads * sl_h + s_i, mask=h_valid, other=float("-inf"))
        m_all = tl.maximum(m_all, lse_s)
    w_gen = tl.exp(lse_gen - m_all)
    out = acc / l_i[:, None] * w_gen[:, None]
    total = w_gen
    for s_i in range(0, n_splits):
        lse_s = tl.load(Lpart + b * sl_b + heads * sl_h + s_i, mask=h_valid, other=float("-inf"))
        w = tl.exp(lse_s - m_all)  # 0 for an empty split
        o_s = tl.load(Opart + b * so_b + heads[:, None] * so_h + s_i * so_s + offs_d[None, :], mask=h_valid[:, None],
                      other=0.0)
        out += o_s * w[:, None]
        total += w
    out = out / total[:, None]
    tl.store(Out + b * sout_b + heads[:, None] * sout_h + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=h_valid[:, None])


def num_splits(prefix_capacity: int, block_n: int = 64, max_splits: int = 16) -> int:
    """Prefix splits per (group, KV head): enough programs to spread a long prefix over the SMs."""
    return max(1, min(max_splits, math.ceil(prefix_capacity / (4 * block_n))))


def cascade_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_lens: torch.Tensor,
                      groups: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor, slots: torch.Tensor,
                      gen_lens: torch.Tensor, group_offsets: torch.Tensor | None = None,
                      splits: int | None = None) -> torch.Tensor:
    """Triton cascade attention; arguments as cascade_attention_ref. group_offsets [P + 1] (rows of group g are
    group_offsets[g]:group_offsets[g+1]) is derived from `groups` when not given (the engine passes it so the
    step needs no extra launches)."""
    b, hq, d = q.shape
    p, tp, hkv, dk = prefix_k.shape
    assert d == dk and d in (16, 32, 64, 128), f"head dim {d} (expected 16/32/64/128, equal in q and k)"
    assert hq % hkv == 0, f"{hq} query heads do not group over {hkv} KV heads"
    assert prefix_v.shape == prefix_k.shape and gen_v.shape == gen_k.shape and gen_k.shape[2:] == (hkv, d)
    for name, t in (("q", q), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("gen_k", gen_k), ("gen_v", gen_v)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in the head dimension"
    assert q.dtype == prefix_k.dtype == gen_k.dtype, f"dtypes differ: q {q.dtype}, kv {prefix_k.dtype}/{gen_k.dtype}"
    for name, t, n in (("prefix_lens", prefix_lens, p), ("groups", groups, b), ("slots", slots, b),
                       ("gen_lens", gen_lens, b)):
        assert t.shape == (n,) and not t.is_floating_point(), f"{name} must be an integer vector of length {n}"
    if group_offsets is None:
        counts = torch.bincount(groups, minlength=p)
        group_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    assert group_offsets.shape == (p + 1,), f"group_offsets must have {p + 1} entries"
    rep = hq // hkv
    splits = splits or num_splits(tp)
    split_len = triton.cdiv(tp, splits)
    upcast = q.device.type == "cpu"  # the interpreter computes bf16 arithmetic wrongly: fp32 throughout there
    precision = "ieee" if (upcast or q.dtype == torch.float32) else "tf32"  # tf32 is ignored for bf16 operands
    o_part = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    l_part = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    scale = d ** -0.5
    block_m = 64 if rep * 8 <= 64 else 128
    _prefix_kernel[(p, hkv, splits)](
        q, prefix_k, prefix_v, prefix_lens, group_offsets, o_part, l_part,
        q.stride(0), q.stride(1), prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2), o_part.stride(0), o_part.stride(1),
        o_part.stride(2), l_part.stride(0), l_part.stride(1), scale, split_len,
        REP=rep, D=d, BLOCK_M=block_m, BLOCK_N=64, UPCAST=upcast, PRECISION=precision, num_warps=4)
    _gen_merge_kernel[(b, hkv)](
        q, gen_k, gen_v, slots, gen_lens, o_part, l_part, out,
        q.stride(0), q.stride(1), gen_k.stride(0), gen_k.stride(1), gen_k.stride(2),
        gen_v.stride(0), gen_v.stride(1), gen_v.stride(2), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        l_part.stride(0), l_part.stride(1), out.stride(0), out.stride(1), scale, splits,
        REP=rep, D=d, BLOCK_H=max(16, triton.next_power_of_2(rep)), BLOCK_N=64, UPCAST=upcast,
        PRECISION=precision, num_warps=4)
    return out


def _attend_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [N, H, M, D] (already scaled) over k / v [N, H, T, D] (T >= 1) -> (output
    [N, H, M, D], log-sum-exp of the scores [N, H, M, 1]); `mask` [N, 1, 1, T] adds -inf to masked keys.

    torch's fused CPU flash-attention kernel (the one F.scaled_dot_product_attention runs on the CPU) returns
    both in one parallel region; the matmul form is the fallback. Both subtract the running max, so scores
    above ~88 (where exp overflows fp32) stay finite. Few parallel regions matter on a CPU: each one waits
    for every thread, which costs milliseconds when the cores are shared."""
    if _FLASH_CPU is not None:
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=1.0)
        return out, lse[..., None]
    scores = torch.matmul(q, k.transpose(-1, -2))  # (N, H, M, T)
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(scores.sub_(lse).exp_(), v), lse


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                      spans: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, attention over its group's prefix as (output [B, Hkv, rep, D], lse [B, Hkv, rep, 1]); q
    [B, Hkv, rep, D], scaled. spans: (group, first row, end row, prefix length) of each group with rows and a
    prefix, in row order. Each group's prefix is read once for all its rows and query heads: M = rows x rep
    queries per KV head against the shared keys. Rows of no span (the pad group) get an empty part (0, -inf)."""
    b, hkv, rep, d = q.shape
    parts = []
    for g, r0, r1, length in spans:
        qg = q[r0:r1].transpose(0, 1).reshape(1, hkv, (r1 - r0) * rep, d)  # (1, Hkv, n*rep, D)
        kg = prefix_k[g, :length].to(q.dtype).transpose(0, 1)[None]  # (1, Hkv, L, D), a view for fp32
        vg = prefix_v[g, :length].to(q.dtype).transpose(0, 1)[None]
        parts.append([x.view(hkv, r1 - r0, rep, -1).transpose(0, 1) for x in _attend_cpu(qg, kg, vg)])
    covered = [(r0, r1) for _, r0, r1, _ in spans]
    if covered and covered[0][0] == 0 and covered[-1][1] == b and all(
            a[1] == c[0] for a, c in zip(covered, covered[1:])):  # every row has a prefix: no padding to fill
        return tuple(torch.cat(xs) if len(xs) > 1 else xs[0] for xs in zip(*parts))
    out = torch.zeros(b, hkv, rep, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, hkv, rep, 1), float("-inf"), dtype=q.dtype, device=q.device)
    for (r0, r1), (og, lg) in zip(covered, parts):
        out[r0:r1], lse[r0:r1] = og, lg
    return out, lse


def cascade_attention_cpu(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_lens: torch.Tensor,
                          groups: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor, slots: torch.Tensor,
                          gen_lens: torch.Tensor, group_offsets: torch.Tensor | None = None,
                          splits: int | None = None) -> torch.Tensor:
    """The CPU path; arguments as cascade_attention_ref (splits is ignored). Rows must be sorted by group.

    The prefix is never copied per row (the reference gathers prefix_k[groups], B x Tp keys): each group's
    queries attend to its prefix in one call, every row then to its own generated keys, and the two parts
    merge by their log-sum-exp, max subtracted. Reading group offsets and lengths on the host costs nothing
    on the CPU."""
    b, hq, d = q.shape
    hkv = prefix_k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    if group_offsets is None:
        counts = torch.bincount(groups, minlength=prefix_k.shape[0])
        group_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    offsets, lens = group_offsets.tolist(), prefix_lens.tolist()
    spans = [(g, offsets[g], offsets[g + 1], lens[g]) for g in range(min(len(lens), len(offsets) - 1))
             if offsets[g + 1] > offsets[g] and lens[g] > 0]
    qs = (q.to(acc) * d ** -0.5).view(b, hkv, hq // hkv, d)  # (B, Hkv, rep, D), the scale folded into q
    o_p, lse_p = _prefix_attention(qs, prefix_k, prefix_v, spans)
    tg = int(gen_lens.max())
    kg = gen_k[slots, :tg].to(acc).permute(0, 2, 1, 3)  # (B, Hkv, tg, D): the rows' own keys, tg <= their count
    vg = gen_v[slots, :tg].to(acc).permute(0, 2, 1, 3)
    mask = torch.zeros(b, 1, 1, tg, dtype=acc, device=q.device).masked_fill_(
        torch.arange(tg, device=q.device) >= gen_lens[:, None, None, None], float("-inf"))  # (B, 1, 1, tg)
    o_g, lse_g = _attend_cpu(qs, kg, vg, mask)
    m = torch.maximum(lse_p, lse_g)  # finite: every row has its current token (gen_len >= 1)
    w_p, w_g = (lse_p - m).exp_(), (lse_g - m).exp_()
    out = (o_p * w_p).add_(o_g * w_g).div_(w_p + w_g)
    return out.reshape(b, hq, d).to(q.dtype)


def cascade_attention_ref(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_lens: torch.Tensor,
                          groups: torch.Tensor, gen_k: torch.Tensor, gen_v: torch.Tensor, slots: torch.Tensor,
                          gen_lens: torch.Tensor, group_offsets: torch.Tensor | None = None,
                          splits: int | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q [B, Hq, D]; prefix_k/v [P, Tp, Hkv, D]; prefix_lens [P]; groups [B]; gen_k/v [S, Tg, Hkv, D];
    slots [B]; gen_lens [B] (valid generated keys, the current token included) -> [B, Hq, D] in q's dtype.
    Plain torch, in fp32 (fp64 for fp64 inputs): the definition of correct. (group_offsets / splits are the
    Triton path's scheduling hints and change nothing here; compute_dtype=q.dtype gives the plain
    low-precision computation the tests measure torch's own rounding error with.)"""
    b, hq, d = q.shape
    hkv = prefix_k.shape[2]
    scale = d ** -0.5
    rep = hq // hkv
    acc = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).view(b, hkv, rep, d)  # (B, Hkv, rep, D)
    kp, vp = prefix_k[groups].to(acc), prefix_v[groups].to(acc)  # (B, Tp, Hkv, D)
    kg, vg = gen_k[slots].to(acc), gen_v[slots].to(acc)  # (B, Tg, Hkv, D)
    keys, values = torch.cat([kp, kg], dim=1), torch.cat([vp, vg], dim=1)  # (B, Tp+Tg, Hkv, D)
    tp, tg = kp.shape[1], kg.shape[1]
    valid = torch.cat([torch.arange(tp, device=q.device)[None] < prefix_lens[groups][:, None],
                       torch.arange(tg, device=q.device)[None] < gen_lens[:, None]], dim=1)  # (B, Tp+Tg)
    scores = torch.einsum("bhrd,bthd->bhrt", qf, keys) * scale  # (B, Hkv, rep, T)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhrt,bthd->bhrd", torch.softmax(scores, dim=-1), values)
    return out.reshape(b, hq, d).to(q.dtype)
