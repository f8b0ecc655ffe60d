"""Token sampling: greedy, temperature, top-k, top-p, with per-row seeds, returning the sampled token and its
log-probability.

Sampling is Gumbel-max: token = argmax over the kept tokens of (logits / T + G), G = -log(-log(U)), which draws
exactly from softmax(logits / T) restricted to the kept set. U comes from a counter-based hash of
(seed, step, token id), where seed and step are the row's own (step = the index of the token being drawn in
its sequence, an int for every row or one per row), so a row's draw depends only on its own seed and token
index: reproducible for a request whatever else is in the batch and whenever it joined, and identical between
the kernel and this reference.

Per row: temperature 0 means greedy (argmax of the raw logits). Otherwise, in HF's warper order, logits are
divided by the temperature, then only the top_k largest are kept (0 = all), then the smallest set of the most
likely remaining tokens whose renormalised mass reaches top_p (1.0 = all). Both filters are expressed as one
threshold per row (`keep_threshold`): a token is kept when its scaled logit is >= the threshold, so ties at the
boundary are kept. The returned log-probability is log_softmax(logits / T)[token] over the whole vocabulary
(T = 1 for greedy rows): the tempered policy's log-probability, before top-k / top-p truncation.

The Triton kernel reads each row of logits once: log-sum-exp, the greedy argmax and the Gumbel argmax over the
kept tokens in the same pass (tiles with no kept token skip the noise). Only the threshold comes from torch:
torch.topk(k_max) when a row uses top-k, a sort of the candidates when one uses top-p.

The CPU path (`sample_cpu`) draws the same tokens without the reference's B x V noise: a filtered row hashes
noise only for its kept candidates (from torch.topk, never a sort of the vocabulary).
"""
from __future__ import annotations

import torch

from ._triton import tl, triton  # a sibling: the kernels import nothing else of omni_fast

_MASK32 = 0xFFFFFFFF


@triton.jit
def _fmix32(x):
    """murmur3's finaliser on int64 values holding uint32 (products wrap mod 2^64; the low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _sample_kernel(Logits, Temperature, Threshold, Seeds, Steps, Tokens, Logprobs, V, stride_row,
                   BLOCK_V: tl.constexpr):
    """One row: scaled = x / T; lse = logsumexp(scaled); token = argmax(x) if T <= 0 else
    argmax_{scaled >= thr}(scaled + gumbel(seed, step, id)); logprob = scaled[token] - lse."""
    row = tl.program_id(0)
    t = tl.load(Temperature + row)
    greedy = t <= 0
    t = tl.where(greedy, 1.0, t)
    thr = tl.load(Threshold + row)
    seed = tl.load(Seeds + row)
    step = tl.load(Steps + row)
    seed32 = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    row_hash = _fmix32((seed32 * 0x9E3779B1 + step.to(tl.int64) * 0x85EBCA77 + 0x27D4EB2F) & 0xFFFFFFFF)
    m = float("-inf")
    s = 0.0
    best = float("-inf")
    best_idx = 0
    best_scaled = 0.0
    top = float("-inf")
    top_idx = 0
    for v0 in range(0, V, BLOCK_V):
        ids = v0 + tl.arange(0, BLOCK_V)
        valid = ids < V
        x = tl.load(Logits + row * stride_row + ids, mask=valid, other=float("-inf")).to(tl.float32)
        scaled = x / t
        tile_max = tl.max(scaled, 0)
        m_new = tl.maximum(m, tile_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(scaled - m_new), 0.0), 0)
        m = m_new
        raw_max = tl.max(x, 0)
        if raw_max > top:  # strict: the first maximum wins, as torch.argmax
            top_idx = tl.min(tl.where(x == raw_max, ids, V), 0)
            top = raw_max
        if tile_max >= thr:  # any kept token in this tile: draw its noise
            keep = valid & (scaled >= thr)
            h = _fmix32((row_hash ^ ((ids.to(tl.int64) * 0xC2B2AE3D) & 0xFFFFFFFF)) & 0xFFFFFFFF)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = tl.where(keep, scaled - tl.log(-tl.log(u)), float("-inf"))
            tile_best = tl.max(score, 0)
            if tile_best > best:
                best_idx = tl.min(tl.where(score == tile_best, ids, V), 0)
                best_scaled = tl.sum(tl.where(ids == best_idx, scaled, 0.0), 0)
                best = tile_best
    lse = m + tl.log(s)
    token = tl.where(greedy, top_idx, best_idx)
    logprob = tl.where(greedy, top, best_scaled) - lse
    tl.store(Tokens + row, token.to(tl.int64))
    tl.store(Logprobs + row, logprob)


def batch_filters(top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[int, bool, bool]:
    """(largest top_k, any row with top_p < 1, any such row without top_k): what keep_threshold must do for a
    batch. The engine computes it once per batch so its steps make no host sync."""
    needs_p = top_p < 1
    return int(top_k.max()), bool(needs_p.any()), bool((needs_p & (top_k <= 0)).any())


def keep_threshold(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   filters: tuple[int, bool, bool] | None = None) -> torch.Tensor:
    """Per row, the smallest scaled logit that survives top-k then top-p (-inf: everything survives).
    filters: batch_filters(top_k, top_p), computed here when not given."""
    b, v = logits.shape
    k_max, use_top_p, full_sort = filters or batch_filters(top_k, top_p)
    t = torch.where(temperature <= 0, torch.ones_like(temperature), temperature).float()[:, None]
    thr = torch.full((b,), float("-inf"), device=logits.device)
    if k_max <= 0 and not use_top_p:
        return thr
    if full_sort:  # a row with top-p but no top-k needs its whole distribution sorted
        cand = logits.float().sort(dim=1, descending=True).values / t  # (B, V)
    else:
        cand = logits.float().topk(min(k_max, v), dim=1).values / t  # (B, k_max), descending
    pos = torch.arange(cand.shape[1], device=logits.device)[None]
    k = torch.where(top_k > 0, top_k.clamp(max=cand.shape[1]), cand.shape[1])[:, None]
    cand = cand.masked_fill(pos >= k, float("-inf"))  # top-k applied to the candidates
    thr = torch.where(top_k > 0, cand.gather(1, (k - 1).clamp(min=0))[:, 0], thr)
    if use_top_p:
        probs = torch.softmax(cand, dim=1)  # renormalised over the top-k survivors, as HF's warper order does
        before = probs.cumsum(dim=1) - probs
        last = ((before < top_p[:, None].float()) & (pos < k)).sum(dim=1).clamp(min=1) - 1
        thr = torch.where(top_p < 1, torch.maximum(thr, cand.gather(1, last[:, None])[:, 0]), thr)
    return thr


def row_steps(step: torch.Tensor | int, rows: int, device: torch.device) -> torch.Tensor:
    """`step` as an int64 [rows] tensor: the token index each row draws (an int is every row's)."""
    steps = torch.as_tensor(step, dtype=torch.int64, device=device)
    return steps.expand(rows).contiguous() if steps.dim() == 0 else steps


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, step: torch.Tensor | int, filters: tuple[int, bool, bool] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path; arguments as sample_ref."""
    b, v = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    steps = row_steps(step, b, logits.device)
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seeds", seeds),
                    ("step", steps)):
        assert t.shape == (b,), f"{name} must have one entry per row ({b}), got {tuple(t.shape)}"
    assert seeds.dtype == torch.int64, "seeds must be int64"
    thr = keep_threshold(logits, temperature, top_k, top_p, filters)
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    _sample_kernel[(b,)](logits, temperature.float().contiguous(), thr, seeds, steps, tokens, logprobs, v,
                         logits.stride(0), BLOCK_V=4096 if logits.is_cuda else 1024, num_warps=8)
    return tokens, logprobs


def _fmix32_ref(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def uniform_noise_at(seeds: torch.Tensor, step: torch.Tensor | int, ids: torch.Tensor) -> torch.Tensor:
    """seeds [B] int64, step (an int or int64 [B]), token ids [B, W] or [W] int64 -> U [B, W] float32 in (0, 1):
    the noise of those tokens only. Integer hashing and an exact 24-bit conversion, so it equals the
    full-vocabulary draw at the same ids bit for bit."""
    seed32 = (seeds ^ (seeds >> 32)) & _MASK32
    step = torch.as_tensor(step, device=seeds.device, dtype=torch.int64)
    row = _fmix32_ref((seed32 * 0x9E3779B1 + step * 0x85EBCA77 + 0x27D4EB2F) & _MASK32)  # (B,), step broadcast
    x = _fmix32_ref((row[:, None] ^ ((ids.expand(seeds.shape[0], -1) * 0xC2B2AE3D) & _MASK32)) & _MASK32)
    return ((x >> 8).float() + 0.5) * (1.0 / 16777216.0)


def uniform_noise_ref(seeds: torch.Tensor, step: torch.Tensor | int, vocab: int) -> torch.Tensor:
    """seeds [B] int64, step (an int or int64 [B]) -> U [B, vocab] float32 in (0, 1)."""
    return uniform_noise_at(seeds, step, torch.arange(vocab, device=seeds.device, dtype=torch.int64))


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, step: torch.Tensor | int, filters: tuple[int, bool, bool] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V]; temperature/top_p [B] float; top_k [B] int (0 = off); seeds [B] int64; step: the token
    index each row draws (an int for all, or int64 [B]);
    filters: batch_filters(top_k, top_p) if known -> (tokens [B] int64, logprobs [B] float32).
    Plain torch: the definition of correct."""
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]
    scaled = logits / t
    keep = scaled >= keep_threshold(logits, temperature, top_k, top_p, filters)[:, None]
    gumbel = -torch.log(-torch.log(uniform_noise_ref(seeds, step, logits.shape[1])))
    sampled = (scaled + gumbel).masked_fill(~keep, float("-inf")).argmax(dim=1)
    tokens = torch.where(greedy, logits.argmax(dim=1), sampled)
    logprobs = torch.log_softmax(scaled, dim=1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs


def _candidate_threshold(logits: torch.Tensor, scaled: torch.Tensor, t: torch.Tensor, top_k: torch.Tensor,
                         top_p: torch.Tensor, filters: tuple[int, bool, bool]
                         ) -> tuple[torch.Tensor, torch.return_types.topk | None]:
    """keep_threshold from torch.topk alone -> (threshold [B], the W + 1 largest logits per row (values and
    ids, descending; W when W = V), W >= the largest top_k). The extra candidate tells whether ties at the
    threshold keep tokens past the first W. scaled = logits / t.

    Without a top-p-only row this is keep_threshold's own computation on the same values (the same threshold
    bit for bit). A row with top_p but no top_k needs the head of its distribution only: W grows (x4 from
    256) until every such row's nucleus ends inside it, and its probabilities are exp(x - logsumexp(row))
    where the reference softmaxes the fully sorted row: equal up to rounding, so a nucleus whose mass lands
    within ~1e-6 of top_p can end one token apart."""
    b, v = logits.shape
    k_max, use_top_p, full_sort = filters
    if k_max <= 0 and not use_top_p:
        return torch.full((b,), float("-inf"), device=logits.device), None
    p_only = (top_p < 1) & (top_k <= 0)
    width = min(v, k_max if not full_sort else max(k_max, 256))
    lse = torch.logsumexp(scaled, dim=1, keepdim=True) if full_sort else None  # (B, 1)
    while True:
        top = logits.topk(min(v, width + 1), dim=1)
        cand = top.values[:, :width] / t  # (B, W), descending
        pos = torch.arange(width, device=logits.device)[None]
        k = torch.where(top_k > 0, top_k.clamp(max=width), width)[:, None]
        cand = cand.masked_fill(pos >= k, float("-inf"))
        thr = torch.where(top_k > 0, cand.gather(1, (k - 1).clamp(min=0))[:, 0], float("-inf"))
        if not use_top_p:
            return thr, top
        probs = torch.softmax(cand, dim=1)
        if full_sort:
            probs = torch.where(p_only[:, None], torch.exp(cand - lse), probs)
        cum = probs.cumsum(dim=1)
        before = cum - probs
        last = ((before < top_p[:, None].float()) & (pos < k)).sum(dim=1).clamp(min=1) - 1
        thr = torch.where(top_p < 1, torch.maximum(thr, cand.gather(1, last[:, None])[:, 0]), thr)
        open_rows = p_only & (cum[:, -1] < top_p)
        if width == v or not bool(open_rows.any()):
            return thr, top
        width = min(v, 4 * width)


def _gumbel_argmax(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """argmax of scores + G, G = -log(-log(u)); the first maximum wins, as in the reference."""
    return (scores - torch.log(-torch.log(u))).argmax(dim=1)


_WIDE_CHUNK = 2**18  # noise hashed per chunk of this many logits: the int64 temporaries stay in cache


def _draw_over_vocabulary(scaled: torch.Tensor, thr: torch.Tensor, seeds: torch.Tensor,
                          steps: torch.Tensor) -> torch.Tensor:
    """The reference's draw for rows that keep more than their candidates: noise for the whole vocabulary, a
    few rows at a time, so the cost stays linear in the rows (the reference's B x V int64 temporaries outgrow
    the caches, and it slows down faster than the rows grow)."""
    rows = max(1, _WIDE_CHUNK // scaled.shape[1])
    out = []
    for r in range(0, scaled.shape[0], rows):
        x, t = scaled[r:r + rows], thr[r:r + rows, None]
        u = uniform_noise_ref(seeds[r:r + rows], steps[r:r + rows], x.shape[1])
        out.append(_gumbel_argmax(x.masked_fill(x < t, float("-inf")), u))
    return torch.cat(out)


def sample_cpu(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, step: torch.Tensor | int, filters: tuple[int, bool, bool] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path; arguments and results as sample_ref, the same tokens and log-probs for the same seeds.

    The reference draws noise for all B x V tokens; here a filtered row draws it only for its kept tokens,
    which are among its top-W candidates unless ties at the threshold keep more (the W+1-th candidate is
    kept too): such rows, and rows with no filter, draw over the whole vocabulary as the reference does. The
    kept ids are sorted so the first maximum is the smallest id, the reference's tie-break. Cost per row: one
    topk and the log-softmax, so linear in the rows; the host reads which rows need the whole vocabulary.
    Every pass over B x V is a parallel region, which stalls when the machine is oversubscribed, so the
    division by a temperature of 1 is skipped."""
    logits = logits.float()
    b, v = logits.shape
    filters = filters or batch_filters(top_k, top_p)
    steps = row_steps(step, b, logits.device)
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]
    scaled = logits if bool((t == 1).all()) else logits / t  # x / 1 == x: skip a pass over B x V
    thr, top = _candidate_threshold(logits, scaled, t, top_k, top_p, filters)
    tokens = logits.argmax(dim=1) if bool(greedy.any()) else torch.zeros(b, dtype=torch.int64, device=logits.device)
    wide = ~greedy
    if top is not None:
        kept = top.values / t >= thr[:, None]  # (B, W + 1) or (B, V): kept, a prefix of each row
        width = kept.shape[1] if kept.shape[1] == v else kept.shape[1] - 1
        overflow = kept[:, width] if width < kept.shape[1] else torch.zeros_like(greedy)  # a tie past W
        n_keep = kept[:, :width].sum(dim=1)
        pos = torch.arange(width, device=logits.device)[None]
        ids = torch.where(pos < n_keep[:, None], top.indices[:, :width], v).sort(dim=1).values  # kept ids ascending
        kept = ids < v
        ids = ids.clamp(max=v - 1)
        scores = scaled.gather(1, ids).masked_fill(~kept, float("-inf"))
        picked = ids.gather(1, _gumbel_argmax(scores, uniform_noise_at(seeds, steps, ids))[:, None])[:, 0]
        narrow = ~greedy & ~overflow
        tokens = torch.where(narrow, picked, tokens)
        wide = ~greedy & overflow
    rows = wide.nonzero()[:, 0]
    if rows.numel():
        tokens[rows] = _draw_over_vocabulary(scaled[rows], thr[rows], seeds[rows], steps[rows])
    logprobs = torch.log_softmax(scaled, dim=1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs
