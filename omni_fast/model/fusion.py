"""Instruction-guided fusion of the three visual branches (humanomni_arch.encode_images_or_videos).

BERT reads the instruct text; its [CLS] state goes through `bert_gate` (Linear(bert_hidden, 3584)-GELU-
Linear(3584, 3); the 3584 is hard-coded in the reference for every model size) and a softmax gives one weight
per branch, applied in the order video, body, face.

The gate's inputs are tokenised in one place (`gate_inputs`), for inference and training alike.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

GATE_HIDDEN = 3584
NUM_BRANCHES = 3


def build_bert_gate(bert_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(bert_hidden, GATE_HIDDEN), nn.GELU(), nn.Linear(GATE_HIDDEN, NUM_BRANCHES))


def gate_inputs(tokenizer, texts: list[str], max_positions: int, device: torch.device) -> dict[str, torch.Tensor]:
    """BERT's inputs for the gate as the reference tokenises them (padding, truncation=True, special tokens), cut
    at the tokenizer's model_max_length or BERT's positions, whichever is smaller (the reference's tokenizer
    allows 512 where a BERT may have fewer positions); a text cut there is logged with both lengths."""
    limit = min(max_positions, getattr(tokenizer, "model_max_length", max_positions) or max_positions)
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=limit,
                    add_special_tokens=True)
    for text in texts:
        n = len(tokenizer(text, add_special_tokens=True).input_ids)
        if n > limit:
            log.warning("a text of %d BERT tokens is truncated to %d for the gate (BERT's positions), as the "
                        "reference's tokenizer call truncates it: %.60r...", n, limit, text)
    return {k: v.to(device) for k, v in enc.items()}


def branch_weights(bert_model: nn.Module, bert_gate: nn.Sequential, bert_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokenised instruct texts (B rows) -> softmax branch weights (B, 3)."""
    cls = bert_model(**bert_inputs).last_hidden_state[:, 0]  # (B, bert_hidden)
    return torch.softmax(bert_gate(cls), dim=1)


def fuse_branches(video: torch.Tensor, body: torch.Tensor, face: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, N, H) x 3 and weights (B, 3) -> w0 * video + w1 * body + w2 * face, (B, N, H)."""
    w = weights.to(video.dtype)[:, :, None, None]  # (B, 3, 1, 1)
    return video * w[:, 0] + body * w[:, 1] + face * w[:, 2]
