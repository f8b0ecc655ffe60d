"""Token sampling: greedy, temperature, top-k, top-p, with per-row seeds, returning the sampled token and its
log-probability.

Sampling is Gumbel-max: token = argmax over the kept tokens of (logits / T + G), G = -log(-log(U)), which draws
exactly from softmax(logits / T) restricted to the kept set. U comes from a counter-based hash of
(seed, step, token id), so a row's draw depends only on its own seed and step: reproducible for a request
whatever else is in the batch, and identical between the kernel and this reference.

Per row: temperature 0 means greedy (argmax of the raw logits). Otherwise, in HF's warper order, logits are
divided by the temperature, then only the top_k largest are kept (0 = all; ties at the k-th value are kept),
then the smallest set of most likely tokens whose probability mass reaches top_p (1.0 = all). The returned
log-probability is log_softmax(logits / T)[token] over the whole vocabulary (T = 1 for greedy rows): the
tempered policy's log-probability, before top-k / top-p truncation.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values (products wrap, low 32 bits kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def uniform_noise_ref(seeds: torch.Tensor, step: torch.Tensor | int, vocab: int) -> torch.Tensor:
    """seeds [B] int64, step (scalar) -> U [B, vocab] float32 in (0, 1)."""
    seed32 = (seeds ^ (seeds >> 32)) & _MASK32
    step = torch.as_tensor(step, device=seeds.device, dtype=torch.int64)
    row = _fmix32((seed32 * 0x9E3779B1 + step * 0x85EBCA77 + 0x27D4EB2F) & _MASK32)  # (B,)
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = _fmix32((row[:, None] ^ ((ids[None, :] * 0xC2B2AE3D) & _MASK32)) & _MASK32)
    return ((x >> 8).float() + 0.5) * (1.0 / 16777216.0)


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seeds: torch.Tensor, step: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V]; temperature/top_p [B] float; top_k [B] int (0 = off); seeds [B] int64
    -> (tokens [B] int64, logprobs [B] float32)."""
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]
    scaled = logits / t
    keep = torch.ones_like(scaled, dtype=torch.bool)
    k_max = int(top_k.max()) if top_k.numel() else 0
    if k_max > 0:
        values = scaled.topk(min(k_max, scaled.shape[1]), dim=1).values  # (B, k_max) descending
        k = top_k.clamp(min=1, max=values.shape[1]) - 1
        kth = values.gather(1, k[:, None])
        keep &= (scaled >= kth) | (top_k[:, None] <= 0)
    if bool((top_p < 1).any()):
        masked = scaled.masked_fill(~keep, float("-inf"))
        sorted_vals, order = masked.sort(dim=1, descending=True)
        probs = torch.softmax(sorted_vals, dim=1)
        before = probs.cumsum(dim=1) - probs  # mass strictly before each token
        keep_sorted = before < top_p[:, None].float()
        keep_sorted[:, 0] = True
        keep &= torch.zeros_like(keep).scatter(1, order, keep_sorted)
    gumbel = -torch.log(-torch.log(uniform_noise_ref(seeds, step, logits.shape[1])))
    sampled = (scaled + gumbel).masked_fill(~keep, float("-inf")).argmax(dim=1)
    tokens = torch.where(greedy, logits.argmax(dim=1), sampled)
    logprobs = torch.log_softmax(scaled, dim=1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs
