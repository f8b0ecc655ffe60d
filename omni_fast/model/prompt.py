"""Prompts as the reference builds them, and their tokenisation with the -201 / -202 placeholders.

Two named prompts (docs/REFERENCE.md §4):
  * inference_prompt: humanomni.mm_infer - the checkpoint tokenizer's own chat template over
    "<video>\\n<audio>\\n" + instruct, then <video> -> <vi_start><video><vi_end> (mm_use_x_start_end).
  * grpo_prompt: the R1-Omni GRPO trainer - Qwen2-VL's template (system "You are a helpful assistant.",
    a <|vision_start|><|video_pad|><|vision_end|> item whose <|video_pad|> stays an ordinary token) around
    the wrapped placeholders and the task's question (omni_fast.task.grpo_question).
The BERT gate reads the instruct text (inference) or the question+template text (GRPO), never the placeholders.
The words of the questions are the task's (omni_fast/task.py); this module only renders them.
"""
from __future__ import annotations

from omni_fast import task
from omni_fast.config import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX

MODALS = ("video_audio", "video", "audio")
MODAL_PREFIX = {"video_audio": "<video>\n<audio>", "video": "<video>", "audio": "<audio>"}
PLACEHOLDERS = {"<audio>": AUDIO_TOKEN_INDEX, "<video>": VIDEO_TOKEN_INDEX}
WRAPPERS = {"<video>": "<vi_start><video><vi_end>", "<audio>": "<au_start><audio><au_end>",
            "<image>": "<im_start><image><im_end>"}


def _wrap(prompt: str) -> str:
    for tag, wrapped in WRAPPERS.items():
        prompt = prompt.replace(tag, wrapped)
    return prompt


def inference_prompt(tokenizer, instruct: str, modal: str = "video_audio", use_x_start_end: bool = True,
                     system: str | None = None) -> str:
    """The rendered reference inference prompt (string, placeholders still as <video> / <audio>). system: a system
    turn before the user's (None: the chat template's own default, as the reference renders it)."""
    if modal not in MODALS:
        raise ValueError(f"modal {modal!r}: expected one of {MODALS}")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": MODAL_PREFIX[modal] + "\n" + instruct})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _wrap(prompt) if use_x_start_end else prompt


def grpo_prompt(question: str = task.EMOTION_QUESTION) -> str:
    """The rendered R1-Omni GRPO prompt for one clip."""
    text = task.grpo_question(question)
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|video_pad|><|vision_end|>" + _wrap("<video>\n<audio>\n") + text +
            "<|im_end|>\n<|im_start|>assistant\n")


def grpo_bert_text(question: str = task.EMOTION_QUESTION) -> str:
    """What the GRPO trainer feeds the BERT gate: the question with its output template, no placeholders."""
    return task.grpo_question(question)


def tokenize_multimodal(tokenizer, prompt: str) -> list[int]:
    """tokenizer_multimodal_token: split on <audio> / <video>, tokenise each text piece without special-token
    additions, and put -202 / -201 where the placeholders were."""
    pieces: list[str | int] = [prompt]
    for tag, index in PLACEHOLDERS.items():
        split: list[str | int] = []
        for piece in pieces:
            if isinstance(piece, int):
                split.append(piece)
                continue
            for i, part in enumerate(piece.split(tag)):
                if i:
                    split.append(index)
                split.append(part)
        pieces = split
    ids: list[int] = []
    for piece in pieces:
        ids.extend([piece] if isinstance(piece, int) else tokenizer(piece, add_special_tokens=False).input_ids)
    return ids
