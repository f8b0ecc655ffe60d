"""What the trainer feeds the model: tower features once per clip, prompt ids, the gate's BERT inputs.

The encode path is cut where the gradient stops (omni_fast/model/omni.py):
    frames, mel --SigLIP / Whisper (frozen, no grad, ONCE per clip per step)--> ClipFeatures
    ClipFeatures --model.prompt_embeddings: projectors + BERT gate (trainable), splice--> prefix
so one step's rollout, reference pass and policy pass all start from the same ClipFeatures, and only the
cheap trainable part runs again (the reference trainer re-runs both towers for each of the 8 completions).

Prompts, as the reference stages build them (docs/REFERENCE.md §4):
  GRPO  prompt.grpo_prompt(): Qwen2-VL's template text, the same for every clip; BERT reads the question and
        its output template.
  SFT   the annotation's human turn moved through preprocess_multimodal (each modal tag to the front, in the
        order audio then video, wrapped in <au_start>..</au_end> / <vi_start>..<vi_end>), rendered with the
        checkpoint tokenizer's own chat template; the loss covers the assistant turn as that template renders
        it (the answer, <|im_end|> and its newline); BERT reads the user text with <image>, <video> and every
        newline removed (train_humanomni.preprocess).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_fast.config import ConfigError
from omni_fast.model.prompt import PLACEHOLDERS, WRAPPERS, grpo_bert_text, grpo_prompt, tokenize_multimodal
from omni_fast.task import DEFAULT_SFT_QUESTION


@dataclass(slots=True)
class ClipFeatures:
    vision: torch.Tensor  # (B, T, 196, mm_hidden) SigLIP layer features, frozen
    audio: torch.Tensor  # (B, 500, audio_hidden) pooled Whisper features, frozen

    def __len__(self) -> int:
        return self.vision.shape[0]


@torch.no_grad()
def tower_features(model, frames: torch.Tensor, mel: torch.Tensor) -> ClipFeatures:
    """frames (B, T, 3, 224, 224), mel (B, n_mels, 3000) -> the frozen towers' features, computed once."""
    return ClipFeatures(vision=model.vision_features(frames), audio=model.audio_features(mel))


def grpo_prompt_ids(tokenizer, max_prompt_length: int, template: str = "qwen2vl",
                    use_x_start_end: bool = True) -> list[int]:
    """The GRPO prompt's ids, left-truncated to max_prompt_length as the reference truncates them (token ids,
    each placeholder counting as one). template "qwen2vl" is the reference trainer's prompt (Qwen2-VL's
    template text, prompt.grpo_prompt); "chat_template" renders the same question as the SFT stage does (the
    checkpoint tokenizer's own template over DEFAULT_SFT_QUESTION), for a policy cold-started on that prompt."""
    if template == "qwen2vl":
        return keep_placeholders(tokenize_multimodal(tokenizer, grpo_prompt()), max_prompt_length)
    user = sft_user_text(DEFAULT_SFT_QUESTION, use_x_start_end)
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return keep_placeholders(tokenize_multimodal(tokenizer, text), max_prompt_length)


def keep_placeholders(ids: list[int], max_prompt_length: int) -> list[int]:
    """ids left-truncated to max_prompt_length, or a ConfigError when that would cut a <video> / <audio>
    placeholder (GRPO would then train on a prompt without the clip)."""
    first = next((i for i, t in enumerate(ids) if t in PLACEHOLDERS.values()), len(ids))
    if len(ids) - first > max_prompt_length:
        raise ConfigError(f"max_prompt_length {max_prompt_length} would cut the <video> / <audio> placeholders off "
                          f"the GRPO prompt ({len(ids)} tokens, the first placeholder at token {first + 1}): use "
                          f"max_prompt_length >= {len(ids) - first}")
    return ids[-max_prompt_length:]


def grpo_bert_inputs(model, tokenizer, template: str = "qwen2vl",
                     use_x_start_end: bool = True) -> dict[str, torch.Tensor]:
    """The gate's BERT inputs for the GRPO prompt (one row, the same for every clip), as model.bert_inputs makes
    them for inference."""
    text = grpo_bert_text() if template == "qwen2vl" else sft_bert_text(sft_user_text(DEFAULT_SFT_QUESTION,
                                                                                      use_x_start_end))
    return model.bert_inputs(tokenizer, [text])


def sft_user_text(value: str, use_x_start_end: bool = True) -> str:
    """train_humanomni.preprocess_multimodal on one human turn: for each modal tag present, in the order of
    the reference's MODAL_INDEX_MAP (audio, video, image), remove it, strip, put it in front followed by a
    newline, then wrap it in its start/end strings. "<video>\\n<audio>\\nQ" becomes
    "<vi_start><video><vi_end>\\n<au_start><audio><au_end>\\n\\n\\nQ"."""
    for tag in ("<audio>", "<video>", "<image>"):
        if tag in value:
            value = (tag + "\n" + value.replace(tag, "").strip()).strip()
        if use_x_start_end:
            value = value.replace(tag, WRAPPERS[tag])
    return value


def sft_bert_text(user_text: str) -> str:
    """What SFT feeds BERT: the preprocessed user text without <image>, newlines and <video>."""
    return user_text.replace("<image>", "").replace("\n", "").replace("<video>", "")


@dataclass(slots=True)
class SFTExample:
    prompt_ids: list[int]  # the rendered conversation up to the assistant turn (with -201 / -202)
    target_ids: list[int]  # the assistant turn as the template renders it: the loss covers exactly these
    bert_text: str  # the gate's input


def sft_example(tokenizer, question: str | None, target: str, max_length: int,
                use_x_start_end: bool = True) -> SFTExample:
    """One SFT example: the conversation [user, assistant] rendered with the checkpoint's chat template; the
    instruction part (rendered with add_generation_prompt) is masked, the rest is the target; the whole is
    cut to max_length token ids (placeholders counting one) from the end of the target."""
    user = sft_user_text(question if question is not None else DEFAULT_SFT_QUESTION, use_x_start_end)
    turn = [{"role": "user", "content": user}]
    instruction = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    conversation = tokenizer.apply_chat_template(turn + [{"role": "assistant", "content": target}], tokenize=False,
                                                 add_generation_prompt=False)
    n_prompt = len(tokenize_multimodal(tokenizer, instruction))
    ids = tokenize_multimodal(tokenizer, conversation)[:max_length]
    if len(ids) <= n_prompt:
        raise ValueError(f"max_length {max_length} leaves no target token after a {n_prompt}-id prompt")
    if any(i in PLACEHOLDERS.values() for i in ids[n_prompt:]):
        raise ValueError("the SFT target holds a <video> / <audio> placeholder")
    return SFTExample(prompt_ids=ids[:n_prompt], target_ids=ids[n_prompt:], bert_text=sft_bert_text(user))


def pad_rows(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> (ids (R, C) int64 padded with pad_id, lengths (R,) int64); C >= 1."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    return ids.to(device), torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device)
