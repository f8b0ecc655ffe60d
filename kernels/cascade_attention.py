"""Cascade (shared-prefix) decode attention over a paged KV pool.

One decode step for B rows (samples). The keys and values live in one layer of the engine's pool,
k_cache / v_cache [num_blocks, block_size, Hkv, D]; a sequence is a list of block ids (a row of a block table),
its position t at block table[t // block_size], offset t % block_size. Row b belongs to prompt group
g = groups[b]; its keys are the group's prefix (prefix_lens[g] positions through prefix_tables[g], written
once at prefill and shared by all the group's samples) followed by its own generated keys (gen_lens[b]
positions through gen_tables[b]). Output:

    out[b, h] = softmax(q[b, h] . [K_prefix(g); K_gen(b)]^T * scale) @ [V_prefix(g); V_gen(b)]

GQA: query head h reads KV head h // (Hq / Hkv). Table entries past a sequence's length are never read.

The Triton path runs in two launches:
  1. _prefix_kernel, grid (P, Hkv, splits): the prefix is read ONCE per (group, KV head) for all of the group's
     rows and query heads together (n samples x Hq/Hkv heads = the M dimension of one tl.dot), split along the
     prefix for parallelism (flash-decoding: each group's own length is cut in `splits` equal parts, read from
     memory, so a captured CUDA graph serves every length); each split writes a normalised partial (o, lse)
     per row/head.
  2. _gen_merge_kernel, grid (B, Hkv): each row's own generated keys, then the merge of its partials with the
     prefix splits by log-sum-exp.
Rows must be sorted by group (the engine keeps them so); `group_offsets` [P + 1] delimits each group's rows.

The CPU path (`cascade_attention_cpu`, plain torch) has the same structure: per group one batched matmul of all
its (row, head) queries against the prefix (a view of the pool when the prefix's blocks are consecutive, as the
allocator mostly makes them, else a gather), then each row's generated keys, merged by log-sum-exp.
"""
from __future__ import annotations

import math

import torch

from ._triton import tl, triton  # a sibling: the kernels import nothing else of omni_fast


@triton.jit
def _attend(q, K, V, Table, sk_b, sk_t, sv_b, sv_t, start, end, m_i, l_i, acc, scale,
            D: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, UPCAST: tl.constexpr,
            PRECISION: tl.constexpr):
    """Online-softmax attention of q (M, D) over positions [start, end) of one paged sequence (block ids at
    Table; K / V at one KV head, block stride sk_b / sv_b, token stride sk_t / sv_t): returns the running
    (max, sum, unnormalised output) updated."""
    offs_d = tl.arange(0, D)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        blk = tl.load(Table + offs_n // BS, mask=n_valid, other=0).to(tl.int64)
        tok = offs_n % BS
        k = tl.load(K + (blk * sk_b + tok * sk_t)[None, :] + offs_d[:, None], mask=n_valid[None, :],
                    other=0.0)  # (D, BLOCK_N)
        v = tl.load(V + (blk * sv_b + tok * sv_t)[:, None] + offs_d[None, :], mask=n_valid[:, None],
                    other=0.0)  # (BLOCK_N, D)
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
def _prefix_kernel(Q, K, V, Tables, PrefixLens, GroupOffsets, Opart, Lpart,
                   sq_b, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, st_p, so_b, so_h, so_s, sl_b, sl_h,
                   scale, n_splits,
                   REP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Partial attention of all of group g's (row, head) queries for KV head kvh over split `split` of its
    prefix (the prefix cut in n_splits parts of whole BLOCK_N tiles): Opart = softmax-weighted sum of the
    split's values (normalised over the split), Lpart = log-sum-exp of the split's scores (-inf, Opart 0 when
    empty)."""
    g, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0 = tl.load(GroupOffsets + g)
    n_rows = tl.load(GroupOffsets + g + 1) - row0
    prefix_len = tl.load(PrefixLens + g)
    split_len = tl.cdiv(tl.cdiv(prefix_len, n_splits), BLOCK_N) * BLOCK_N
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
        m_i, l_i, acc = _attend(q, K + kvh * sk_h, V + kvh * sv_h, Tables + g * st_p, sk_b, sk_t, sv_b, sv_t,
                                start, end, m_i, l_i, acc, scale, D, BLOCK_N, BS, UPCAST, PRECISION)
        nonempty = l_i > 0
        lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        o_ptr = Opart + rows[:, None] * so_b + heads[:, None] * so_h + split * so_s + offs_d[None, :]
        tl.store(o_ptr, o, mask=m_valid[:, None])
        tl.store(Lpart + rows * sl_b + heads * sl_h + split, lse, mask=m_valid)


@triton.jit
def _gen_merge_kernel(Q, K, V, Tables, GenLens, Opart, Lpart, Out,
                      sq_b, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, st_b, so_b, so_h, so_s, sl_b, sl_h,
                      sout_b, sout_h, scale, n_splits,
                      REP: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                      BS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Row b, KV head kvh: attention over the row's generated keys [0, gen_len), merged with the prefix
    partials: out = sum_i exp(lse_i - lse) o_i / ..., all in fp32."""
    b, kvh = tl.program_id(0), tl.program_id(1)
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
    m_i, l_i, acc = _attend(q, K + kvh * sk_h, V + kvh * sv_h, Tables + b * st_b, sk_b, sk_t, sv_b, sv_t, 0,
                            gen_len, m_i, l_i, acc, scale, D, BLOCK_N, BS, UPCAST, PRECISION)
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
    """Prefix splits per (group, KV head): enough programs to spread a prefix of this length over the SMs."""
    return max(1, min(max_splits, math.ceil(prefix_capacity / (4 * block_n))))


def _check_args(q, k_cache, v_cache, prefix_tables, prefix_lens, groups, gen_tables, gen_lens):
    b, hq, d = q.shape
    nb, bs, hkv, dk = k_cache.shape
    p = prefix_tables.shape[0]
    assert d == dk and d in (16, 32, 64, 128), f"head dim {d} (expected 16/32/64/128, equal in q and k)"
    assert hq % hkv == 0, f"{hq} query heads do not group over {hkv} KV heads"
    assert bs & (bs - 1) == 0, f"block size {bs} must be a power of two"
    assert v_cache.shape == k_cache.shape, f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in the head dimension"
    assert q.dtype == k_cache.dtype == v_cache.dtype, f"dtypes differ: q {q.dtype}, kv {k_cache.dtype}/{v_cache.dtype}"
    for name, t, n in (("prefix_tables", prefix_tables, p), ("gen_tables", gen_tables, b)):
        assert t.dim() == 2 and t.shape[0] == n and t.dtype in (torch.int32, torch.int64) and t.stride(1) == 1, \
            f"{name} must be an int32/int64 [{n}, W] block table, unit stride along W"
    for name, t, n in (("prefix_lens", prefix_lens, p), ("groups", groups, b), ("gen_lens", gen_lens, b)):
        assert t.shape == (n,) and not t.is_floating_point(), f"{name} must be an integer vector of length {n}"


def _offsets(groups: torch.Tensor, p: int) -> torch.Tensor:
    counts = torch.bincount(groups, minlength=p)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def cascade_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_tables: torch.Tensor,
                      prefix_lens: torch.Tensor, groups: torch.Tensor, gen_tables: torch.Tensor,
                      gen_lens: torch.Tensor, group_offsets: torch.Tensor | None = None,
                      splits: int | None = None) -> torch.Tensor:
    """Triton cascade attention; arguments as cascade_attention_ref. group_offsets [P + 1] (rows of group g are
    group_offsets[g]:group_offsets[g+1]) is derived from `groups` when not given (the engine passes it so the
    step needs no extra launches)."""
    _check_args(q, k_cache, v_cache, prefix_tables, prefix_lens, groups, gen_tables, gen_lens)
    b, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    p = prefix_tables.shape[0]
    group_offsets = _offsets(groups, p) if group_offsets is None else group_offsets
    assert group_offsets.shape == (p + 1,), f"group_offsets must have {p + 1} entries"
    rep = hq // hkv
    splits = splits or num_splits(prefix_tables.shape[1] * bs)
    upcast = q.device.type == "cpu"  # the interpreter computes bf16 arithmetic wrongly: fp32 throughout there
    precision = "ieee" if (upcast or q.dtype == torch.float32) else "tf32"  # tf32 is ignored for bf16 operands
    o_part = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    l_part = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    scale = d ** -0.5
    block_m = 64 if rep * 8 <= 64 else 128
    kv_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
                  v_cache.stride(2))
    _prefix_kernel[(p, hkv, splits)](
        q, k_cache, v_cache, prefix_tables, prefix_lens, group_offsets, o_part, l_part,
        q.stride(0), q.stride(1), *kv_strides, prefix_tables.stride(0), o_part.stride(0), o_part.stride(1),
        o_part.stride(2), l_part.stride(0), l_part.stride(1), scale, splits,
        REP=rep, D=d, BLOCK_M=block_m, BLOCK_N=64, BS=bs, UPCAST=upcast, PRECISION=precision, num_warps=4)
    _gen_merge_kernel[(b, hkv)](
        q, k_cache, v_cache, gen_tables, gen_lens, o_part, l_part, out,
        q.stride(0), q.stride(1), *kv_strides, gen_tables.stride(0), o_part.stride(0), o_part.stride(1),
        o_part.stride(2), l_part.stride(0), l_part.stride(1), out.stride(0), out.stride(1), scale, splits,
        REP=rep, D=d, BLOCK_H=max(16, triton.next_power_of_2(rep)), BLOCK_N=64, BS=bs, UPCAST=upcast,
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


def paged_keys(cache: torch.Tensor, blocks: list[int], length: int) -> torch.Tensor:
    """The first `length` positions of a paged sequence, (length, Hkv, D): a view of the pool when its blocks
    are one consecutive run, else a gather."""
    bs = cache.shape[1]
    blocks = blocks[: -(-length // bs)]
    first = blocks[0]
    if blocks[-1] - first == len(blocks) - 1 and blocks == list(range(first, first + len(blocks))):
        return cache.view(-1, *cache.shape[2:])[first * bs: first * bs + length]
    return cache[blocks].view(-1, *cache.shape[2:])[:length]


def _prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      spans: list[tuple[list[int], int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, attention over its group's prefix as (output [B, Hkv, rep, D], lse [B, Hkv, rep, 1]); q
    [B, Hkv, rep, D], scaled. spans: (block ids, first row, end row, prefix length) of each group with rows and
    a prefix, in row order. Each group's prefix is read once for all its rows and query heads: M = rows x rep
    queries per KV head against the shared keys. Rows of no span (the pad group) get an empty part (0, -inf)."""
    b, hkv, rep, d = q.shape
    parts = []
    for blocks, r0, r1, length in spans:
        qg = q[r0:r1].transpose(0, 1).reshape(1, hkv, (r1 - r0) * rep, d)  # (1, Hkv, n*rep, D)
        kg = paged_keys(k_cache, blocks, length).to(q.dtype).transpose(0, 1)[None]  # (1, Hkv, L, D)
        vg = paged_keys(v_cache, blocks, length).to(q.dtype).transpose(0, 1)[None]
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


def cascade_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_tables: torch.Tensor,
                          prefix_lens: torch.Tensor, groups: torch.Tensor, gen_tables: torch.Tensor,
                          gen_lens: torch.Tensor, group_offsets: torch.Tensor | None = None,
                          splits: int | None = None) -> torch.Tensor:
    """The CPU path; arguments as cascade_attention_ref (splits is ignored). Rows must be sorted by group.

    The prefix is never copied per row (the reference gathers it per row, B x Tp keys): each group's queries
    attend to its prefix in one call, every row then to its own generated keys, and the two parts merge by
    their log-sum-exp, max subtracted. Reading group offsets, lengths and tables on the host costs nothing on
    the CPU."""
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    if group_offsets is None:
        group_offsets = _offsets(groups, prefix_tables.shape[0])
    offsets, lens = group_offsets.tolist(), prefix_lens.tolist()
    tables = prefix_tables.tolist()
    spans = [(tables[g], offsets[g], offsets[g + 1], lens[g]) for g in range(min(len(lens), len(offsets) - 1))
             if offsets[g + 1] > offsets[g] and lens[g] > 0]
    qs = (q.to(acc) * d ** -0.5).view(b, hkv, hq // hkv, d)  # (B, Hkv, rep, D), the scale folded into q
    o_p, lse_p = _prefix_attention(qs, k_cache, v_cache, spans)
    tg = int(gen_lens.max())
    width = -(-tg // bs)
    rows = gen_tables[:, :width]
    kg = k_cache[rows].view(b, width * bs, hkv, d)[:, :tg].to(acc).permute(0, 2, 1, 3)  # (B, Hkv, tg, D)
    vg = v_cache[rows].view(b, width * bs, hkv, d)[:, :tg].to(acc).permute(0, 2, 1, 3)
    mask = torch.zeros(b, 1, 1, tg, dtype=acc, device=q.device).masked_fill_(
        torch.arange(tg, device=q.device) >= gen_lens[:, None, None, None], float("-inf"))  # (B, 1, 1, tg)
    o_g, lse_g = _attend_cpu(qs, kg, vg, mask)
    m = torch.maximum(lse_p, lse_g)  # finite: every row has its current token (gen_len >= 1)
    w_p, w_g = (lse_p - m).exp_(), (lse_g - m).exp_()
    out = (o_p * w_p).add_(o_g * w_g).div_(w_p + w_g)
    return out.reshape(b, hq, d).to(q.dtype)


def cascade_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_tables: torch.Tensor,
                          prefix_lens: torch.Tensor, groups: torch.Tensor, gen_tables: torch.Tensor,
                          gen_lens: torch.Tensor, group_offsets: torch.Tensor | None = None,
                          splits: int | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q [B, Hq, D]; k_cache / v_cache [num_blocks, block_size, Hkv, D] (one layer of the pool);
    prefix_tables [P, Wp] block ids of each group's prefix, prefix_lens [P] its positions; groups [B];
    gen_tables [B, Wg] block ids of each row's generated keys, gen_lens [B] their count (the current token
    included) -> [B, Hq, D] in q's dtype. Plain torch, in fp32 (fp64 for fp64 inputs): the definition of
    correct. (group_offsets / splits are the Triton path's scheduling hints and change nothing here;
    compute_dtype=q.dtype gives the plain low-precision computation the tests measure torch's own rounding error
    with.)"""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    scale = d ** -0.5
    rep = hq // hkv
    acc = compute_dtype or torch.promote_types(q.dtype, torch.float32)

    def paged(cache, tables):  # (B, W * block_size, Hkv, D): every row's sequence, gathered
        return cache[tables.long()].reshape(tables.shape[0], -1, hkv, d).to(acc)

    qf = q.to(acc).view(b, hkv, rep, d)  # (B, Hkv, rep, D)
    kp, vp = paged(k_cache, prefix_tables[groups]), paged(v_cache, prefix_tables[groups])  # (B, Tp, Hkv, D)
    kg, vg = paged(k_cache, gen_tables), paged(v_cache, gen_tables)  # (B, Tg, Hkv, D)
    keys, values = torch.cat([kp, kg], dim=1), torch.cat([vp, vg], dim=1)  # (B, Tp+Tg, Hkv, D)
    tp, tg = kp.shape[1], kg.shape[1]
    valid = torch.cat([torch.arange(tp, device=q.device)[None] < prefix_lens[groups][:, None],
                       torch.arange(tg, device=q.device)[None] < gen_lens[:, None]], dim=1)  # (B, Tp+Tg)
    scores = torch.einsum("bhrd,bthd->bhrt", qf, keys) * scale  # (B, Hkv, rep, T)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhrt,bthd->bhrd", torch.softmax(scores, dim=-1), values)
    return out.reshape(b, hq, d).to(q.dtype)
