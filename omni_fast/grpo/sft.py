"""The cold-start SFT stage (R1-Omni's EMER-SFT, train_humanomni.py): cross-entropy on the assistant turn.

Same data readers, media loader, towers-once features, checkpoints and progress as GRPO (trainer.py); only
the micro-step differs. What trains is what the reference's SFT trains: the LLM, the projectors and the BERT
gate; the towers and BERT stay frozen (train_humanomni.py lines 879-882). The log-probs of the target tokens
come from the same shared-prefix forward as GRPO's (one completion per prompt) and the LM head runs through
ops.selective_logprob, so no [N, V] logits exist. The loss is the mean over every target token of the
optimizer step (the whole accumulated batch), so the split into micro-batches does not change the update.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_fast.grpo.inputs import ClipFeatures, SFTExample, pad_rows, sft_example
from omni_fast.grpo.logprobs import completion_logprobs


@dataclass(slots=True)
class SFTBatch:
    features: ClipFeatures  # the frozen towers' output
    examples: list[SFTExample]  # per clip: prompt ids, target ids, BERT text
    targets: torch.Tensor  # (B, C) int64 target ids, padded
    lengths: torch.Tensor  # (B,) int64

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def sft_batch(tokenizer, features: ClipFeatures, records, max_length: int, use_x_start_end: bool,
              pad_id: int) -> SFTBatch:
    examples = [sft_example(tokenizer, r.question, r.target, max_length, use_x_start_end) for r in records]
    targets, lengths = pad_rows([e.target_ids for e in examples], pad_id, features.vision.device)
    return SFTBatch(features=features, examples=examples, targets=targets, lengths=lengths)


def sft_loss(model, bert_tokenizer, batch: SFTBatch, step_tokens: int) -> torch.Tensor:
    """-sum(log p(target tokens)) / step_tokens for one micro-batch (differentiable)."""
    device = batch.targets.device
    bert = model.bert_inputs(bert_tokenizer, [e.bert_text for e in batch.examples])
    prompt_ids = [torch.tensor(e.prompt_ids, device=device) for e in batch.examples]
    prefixes = model.prompt_embeddings(prompt_ids, batch.features.vision, batch.features.audio, bert)
    logp = completion_logprobs(model, prefixes, batch.targets, batch.lengths, 1)    # (B, C), 0 past lengths
    return -logp.sum() / step_tokens
