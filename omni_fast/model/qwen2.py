"""A lean Qwen2 decoder with Hugging Face's weight names (model.embed_tokens, model.layers.N.self_attn.q_proj, ...).

The numerics follow transformers' Qwen2 (RMSNorm in fp32, RoPE tables in fp32 cast to the activation dtype,
q/k/v with bias, o_proj without). Attention is delegated: `forward(embeds, positions, ctx)` hands each layer's
rotated q, k, v to `ctx.attend(layer, q, k, v)`; with no context it is plain causal attention over [B, T].
The rollout engine passes its own context (prefill into the KV cache, cascade decode), so the model stays
`(embeds, positions)` and knows nothing about caches.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from omni_fast import ops
from omni_fast.config import ModelConfig


class AttentionContext(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [*lead, Hq, D], k/v [*lead, Hkv, D] (RoPE applied) -> attention output [*lead, Hq, D]."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (norm(x + residual), x + residual): the residual add is fused with the norm."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Rotary:
    """RoPE cos/sin tables in fp32 for every position, built once per device (not a module buffer, so a
    model built on the meta device and loaded with assign=True needs no buffer repair)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
            inv_freq = 1.0 / (self.theta ** exponent)
            positions = torch.arange(self.max_positions, device=device, dtype=torch.float32)
            freqs = positions[:, None] * inv_freq[None, :]  # (P, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
            self._tables[device] = (emb.cos(), emb.sin())
        return self._tables[device]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.tables(positions.device)
        return cos[positions].to(dtype), sin[positions].to(dtype)


def pack_linears(module: nn.Module, packed: str, parts: dict[str, int]) -> None:
    """Store several projections of the same input as ONE nn.Linear `module.<packed>` (one GEMM instead of
    several per decode step), while state_dict() / load_state_dict() keep the checkpoint's separate names
    (`<name>.weight`, `<name>.bias`), split and concatenated along the output dimension. The packed tensor is
    the parameter: an optimizer step on it is what the engine decodes with, no copy to keep in sync."""
    sizes = list(parts.values())

    def split(mod, state, prefix, local_metadata):
        for kind in ("weight", "bias"):
            whole = state.pop(f"{prefix}{packed}.{kind}", None)
            if whole is not None:
                for name, piece in zip(parts, whole.split(sizes, dim=0)):
                    state[f"{prefix}{name}.{kind}"] = piece

    def merge(state, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in parts]
            if all(k in state for k in keys):
                state[f"{prefix}{packed}.{kind}"] = torch.cat([state.pop(k) for k in keys], dim=0)

    module.register_state_dict_post_hook(split)
    module._register_load_state_dict_pre_hook(merge)


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.head_dim = layer, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=True)
        pack_linears(self, "qkv_proj", {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size})
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.sizes = [q_size, kv_size, kv_size]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext | None) -> torch.Tensor:
        lead = x.shape[:-1]
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        q, k = ops.rope(q, k, cos, sin)
        out = ops.causal_attention(q, k, v) if ctx is None else ctx.attend(self.layer, q, k, v)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        pack_linears(self, "gate_up_proj", {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size})
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, layer)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's input delta, residual stream) -> (its output delta, residual stream); the residual adds
        happen inside the fused norms (and the next layer's, or the final norm)."""
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen2Decoder(nn.Module):
    """`model.*` of a Qwen2ForCausalLM checkpoint: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext | None = None) -> torch.Tensor:
        """embeds [*lead, H], positions [*lead] -> final-normed hidden states [*lead, H]."""
        cos, sin = self.rotary(positions, embeds.dtype)
        x, residual = embeds, None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, ctx)
        return self.norm(x, residual)[0]


class Qwen2LM(nn.Module):
    """Decoder + LM head (tied to embed_tokens unless the config unties it, then `lm_head.weight`)."""

    def __init__(self, cfg: ModelConfig, decoder: Qwen2Decoder | None = None):
        super().__init__()
        self.config = cfg
        self.model = decoder if decoder is not None else Qwen2Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor | None = None,
                ctx: AttentionContext | None = None) -> torch.Tensor:
        """embeds [B, T, H] -> logits [B, T, V] (positions default to 0..T-1)."""
        if positions is None:
            positions = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1)
        return self.logits(self.model(embeds, positions, ctx))
