"""Instruction-guided fusion of the three visual branches (humanomni_arch.encode_images_or_videos).

BERT reads the instruct text; its [CLS] state goes through `bert_gate` (Linear(bert_hidden, 3584)-GELU-
Linear(3584, 3); the 3584 is hard-coded in the reference for every model size) and a softmax gives one weight
per branch, applied in the order video, body, face.
"""
from __future__ import annotations

import torch
from torch import nn

GATE_HIDDEN = 3584
NUM_BRANCHES = 3


def build_bert_gate(bert_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(bert_hidden, GATE_HIDDEN), nn.GELU(), nn.Linear(GATE_HIDDEN, NUM_BRANCHES))


def branch_weights(bert_model: nn.Module, bert_gate: nn.Sequential, bert_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokenised instruct texts (B rows) -> softmax branch weights (B, 3)."""
    cls = bert_model(**bert_inputs).last_hidden_state[:, 0]  # (B, bert_hidden)
    return torch.softmax(bert_gate(cls), dim=1)


def fuse_branches(video: torch.Tensor, body: torch.Tensor, face: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, N, H) x 3 and weights (B, 3) -> w0 * video + w1 * body + w2 * face, (B, N, H)."""
    w = weights.to(video.dtype)[:, :, None, None]  # (B, 3, 1, 1)
    return video * w[:, 0] + body * w[:, 1] + face * w[:, 2]
