"""Per-token log-probabilities of G completions of each prompt, the prompt computed once per group.

GRPO needs log p(completion | prompt) for B prompts x G completions, twice per step (policy with grad,
reference without). The naive forward runs cat(prompt, completion) for each of the B*G rows, so every prompt
(~900 multimodal tokens here, against completions of ~100-500) goes through the decoder G times, and its
backward G times. Here it goes through once:

* Every token is packed into ONE 1-D lead dimension, no padding: the B prefixes (sum P_b tokens), then the
  B*G completions, each fed without its last token (that token is only ever a target, never a predictor),
  so the decoder sees sum(P_b) + B*G*(C-1) tokens. Everything but attention is token-wise, so one call does
  all GEMMs at full width. Positions: prefix b at 0..P_b-1, completion token t of a row of group b at P_b + t.
* `SharedPrefixContext.attend` splits the packed q/k/v per group: the prefix attends causally over itself
  (ops.causal_attention, flash-attn where installed); the G completion rows attend over the prefix's k/v
  expanded to G rows plus their own, under the lower-right causal mask [C-1, P_b + C-1] (every prefix column
  visible, own columns causal). Autograd sums the gradient over the expand back into the prefix's k/v, which
  is exactly the sum over rows the naive forward does, so values and gradients are those of the naive one.
  KV heads are repeated to the query heads by hand rather than passing enable_gqa: SDPA with a mask and
  enable_gqa has no fused CUDA kernel and falls back to the math one, which saves [G, Hq, C, P+C] fp32
  probabilities per layer (e.g. Comfy-Org/ComfyUI#15135); with equal head counts the memory-efficient kernel
  takes the mask.
* Completion token t is predicted by the last prefix position (t = 0) or completion position t-1; those
  hidden states go through ops.selective_logprob, never forming [N, V] logits. Positions t >= lengths[r]
  are set to 0 with torch.where, so no gradient flows from them.

Left for later: the per-group loop (B is 1-4 per device) and the [G, P+C] copy of the prefix k/v per layer;
a cascade kernel with a log-sum-exp merge (prefix part + own part) would avoid both but needs its own backward.

`naive_completion_logprobs` (same signature) is the definition of correct and the benchmark baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from omni_fast import ops


def shared_prefix_mask(prefix_len: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [width, prefix_len + width]: True where completion query i may attend key j (every prefix key,
    own keys j - prefix_len <= i). The lower-right causal mask."""
    rows = torch.arange(width, device=device)[:, None]
    cols = torch.arange(prefix_len + width, device=device)[None, :]
    return cols <= rows + prefix_len


def packed_positions(prefix_lens: Sequence[int], group_size: int, width: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [sum(P_b) + B*G*width]: 0..P_b-1 for each prefix, then P_b + t for token t of each of the G
    rows of group b (rows in order, group b owning rows b*G .. b*G+G-1)."""
    prefix = [torch.arange(p, device=device) for p in prefix_lens]
    starts = torch.tensor(list(prefix_lens), device=device, dtype=torch.int64).repeat_interleave(group_size)
    completion = starts[:, None] + torch.arange(width, device=device)[None, :]         # (B*G, width)
    return torch.cat(prefix + [completion.reshape(-1)])


def completion_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                         k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """G completion rows of one group over the shared prefix and their own keys.

    q [G, W, Hq, D], prefix_k/v [P, Hkv, D], k/v [G, W, Hkv, D] -> [G, W, Hq, D]."""
    g, w, hq, _ = q.shape
    p, hkv = prefix_k.shape[:2]
    keys = torch.cat((prefix_k[None].expand(g, -1, -1, -1), k), dim=1)                 # (G, P+W, Hkv, D)
    values = torch.cat((prefix_v[None].expand(g, -1, -1, -1), v), dim=1)
    keys = keys.repeat_interleave(hq // hkv, dim=2)                                    # (G, P+W, Hq, D)
    values = values.repeat_interleave(hq // hkv, dim=2)
    mask = shared_prefix_mask(p, w, q.device)                                          # (W, P+W)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask)                               # (G, Hq, W, D)
    return out.transpose(1, 2)


@dataclass(slots=True)
class SharedPrefixContext:
    """Attention over the packed layout of `packed_positions`: B prefixes, then B*G completion rows of
    `width` tokens each."""
    prefix_lens: tuple[int, ...]  # P_b, one per prompt
    group_size: int  # G completions per prompt
    width: int  # completion tokens fed per row (C - 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D], N = sum(P_b) + B*G*width -> [N, Hq, D]."""
        b, g, w = len(self.prefix_lens), self.group_size, self.width
        n_prefix = sum(self.prefix_lens)
        comp_q = q[n_prefix:].reshape(b, g, w, *q.shape[1:])                           # (B, G, W, Hq, D)
        comp_k = k[n_prefix:].reshape(b, g, w, *k.shape[1:])                           # (B, G, W, Hkv, D)
        comp_v = v[n_prefix:].reshape(b, g, w, *v.shape[1:])
        prefix_out, comp_out, start = [], [], 0
        for i, p in enumerate(self.prefix_lens):
            pq, pk, pv = (x[start:start + p] for x in (q, k, v))                       # (P, H, D)
            prefix_out.append(ops.causal_attention(pq[None], pk[None], pv[None])[0])
            if w:
                out = completion_attention(comp_q[i], pk, pv, comp_k[i], comp_v[i])          # (G, W, Hq, D)
                comp_out.append(out.reshape(g * w, *q.shape[1:]))
            start += p
        return torch.cat(prefix_out + comp_out)


def _check_inputs(lm, prefixes, completions, lengths, group_size,
                  temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise ValueError naming the bad argument; return (completions, lengths) as int64, both on the
    completions' device."""
    hidden, vocab = lm.config.hidden_size, lm.config.vocab_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not isinstance(prefixes, (list, tuple)) or not prefixes:
        raise ValueError(f"prefixes must be a non-empty list of (P_b, {hidden}) tensors, got {type(prefixes)}")
    for i, p in enumerate(prefixes):
        if not torch.is_tensor(p) or p.ndim != 2 or p.shape[0] < 1 or p.shape[1] != hidden:
            shape = tuple(p.shape) if torch.is_tensor(p) else type(p)
            raise ValueError(f"prefixes[{i}] must be (P >= 1, hidden={hidden}), got {shape}")
    rows = len(prefixes) * group_size
    if (not torch.is_tensor(completions) or completions.ndim != 2 or completions.dtype.is_floating_point
            or completions.dtype.is_complex or completions.dtype == torch.bool):
        got = (tuple(completions.shape), completions.dtype) if torch.is_tensor(completions) else type(completions)
        raise ValueError(f"completions must be an integer (B*G, C) tensor of ids, got {got}")
    if completions.shape[0] != rows:
        raise ValueError(f"completions has {completions.shape[0]} rows; expected len(prefixes) * group_size = "
                         f"{len(prefixes)} * {group_size} = {rows}")
    if completions.numel() and not 0 <= int(completions.min()) <= int(completions.max()) < vocab:
        raise ValueError(f"completions ids must lie in [0, {vocab}) (pad with a valid id)")
    lengths = torch.as_tensor(lengths, device=completions.device)
    if lengths.shape != (rows,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be integer ({rows},), got {tuple(lengths.shape)} {lengths.dtype}")
    width = completions.shape[1]
    if rows and not 0 <= int(lengths.min()) <= int(lengths.max()) <= width:
        raise ValueError(f"lengths must lie in [0, C={width}], got {lengths.tolist()}")
    return completions.long(), lengths.long()


def _zero_past_lengths(logp: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """logp [R, C] with positions t >= lengths[r] set to exactly 0 (and no gradient through them)."""
    valid = torch.arange(logp.shape[1], device=logp.device)[None, :] < lengths[:, None]  # (R, C)
    return torch.where(valid, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))


def completion_logprobs(lm, prefixes: Sequence[torch.Tensor], completions: torch.Tensor,
                        lengths: torch.Tensor | Sequence[int], group_size: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """float32 (B*G, C): log p(completions[r, t] | prefixes[r // G], completions[r, :t]) at `temperature`,
    0 for t >= lengths[r]; the shared-prefix forward (module docstring). Differentiable w.r.t. the
    prefixes and lm's parameters; computed in lm's parameter dtype (the prefixes are cast to it).

    lm: Qwen2LM (or HumanOmniForCausalLM); prefixes: B tensors (P_b, H); completions: int64 (B*G, C), any
    valid id past lengths; lengths: (B*G,) ints in [0, C]."""
    completions, lengths = _check_inputs(lm, prefixes, completions, lengths, group_size, temperature)
    rows, c = completions.shape
    if c == 0:
        return torch.zeros(rows, 0, dtype=torch.float32, device=completions.device)
    dtype = lm.model.embed_tokens.weight.dtype
    prefix_lens = tuple(p.shape[0] for p in prefixes)
    n_prefix, w, h = sum(prefix_lens), c - 1, lm.config.hidden_size
    embeds = torch.cat([p.to(dtype) for p in prefixes] + [lm.embed(completions[:, :w]).reshape(rows * w, h)])
    positions = packed_positions(prefix_lens, group_size, w, completions.device)
    hidden = lm.model(embeds, positions, SharedPrefixContext(prefix_lens, group_size, w))  # (N, H)
    last_prefix = torch.tensor(prefix_lens, device=hidden.device).cumsum(0) - 1           # (B,)
    first = hidden[last_prefix].repeat_interleave(group_size, dim=0)[:, None]              # (B*G, 1, H)
    rest = hidden[n_prefix:].view(rows, w, h)                                              # (B*G, C-1, H)
    predictors = torch.cat((first, rest), dim=1).reshape(rows * c, h)                     # (B*G*C, H)
    logp = ops.selective_logprob(predictors, lm.lm_head_weight, completions.reshape(-1), float(temperature))
    return _zero_past_lengths(logp.view(rows, c).float(), lengths)


def naive_completion_logprobs(lm, prefixes: Sequence[torch.Tensor], completions: torch.Tensor,
                              lengths: torch.Tensor | Sequence[int], group_size: int,
                              temperature: float = 1.0) -> torch.Tensor:
    """The definition (and the reference trainer's way): for each row, the full forward over
    cat(prefix, embed(completion)), full logits, log_softmax(logits / temperature) at the completion's ids,
    in fp32 (fp64 for an fp64 model); same contract as `completion_logprobs`."""
    completions, lengths = _check_inputs(lm, prefixes, completions, lengths, group_size, temperature)
    dtype = lm.model.embed_tokens.weight.dtype
    out = []
    for r in range(completions.shape[0]):
        prefix = prefixes[r // group_size].to(dtype)
        p, ids = prefix.shape[0], completions[r]
        logits = lm(torch.cat((prefix, lm.embed(ids)))[None])[0, p - 1:p - 1 + ids.shape[0]]  # (C, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        out.append(torch.log_softmax(logits, dim=-1).gather(-1, ids[:, None])[:, 0])
    logp = torch.stack(out).float() if out else torch.zeros(0, completions.shape[1], device=completions.device)
    return _zero_past_lengths(logp, lengths)
