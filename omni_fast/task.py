"""The emotion-recognition task R1-Omni is trained and evaluated on, in one place: the label sets, the
questions, the answer format and its parsers, the RAVDESS renames. The prompts (model/prompt.py), the rewards
(grpo/rewards.py), the annotation reader (data.py), the eval and the API read the task from here, so changing
the answer format means editing this file.

An answer is "<think>reasoning</think>\\n<answer>label</answer>"; the label is read from the first
<answer>...</answer>. Two readings exist because the reference has two: R1-Omni's accuracy reward matches the
tag on one line (its regex has no re.DOTALL), everything else lets the tag's content span lines.
"""
from __future__ import annotations

import re

# --- labels -----------------------------------------------------------------------------------------------------
# The label words of the RL data (DFEW + MAFW): DFEW's 7, then MAFW's 4 more. A training record whose label is
# not in GRPOConfig.label_set (this, by default) is a bad entry.
EMOTION_LABELS = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear", "contemptuous", "disappointed",
                  "helpless", "anxious")
# The classes each evaluation set is scored over (after the RAVDESS renames).
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "dfew": EMOTION_LABELS[:7],  # happy, sad, neutral, angry, surprise, disgust, fear
    "mafw": EMOTION_LABELS,  # DFEW's 7 + contemptuous, disappointed, helpless, anxious
    "ravdess": ("neutral", "calm", "happy", "sad", "angry", "fear", "disgust", "surprise"),
}
RAVDESS_LABELS = {"fearful": "fear", "surprised": "surprise"}  # the RAVDESS eval's renames


def dataset_label(label: str, source: str) -> str:
    """An annotation's label as its dataset's eval scores it: stripped, RAVDESS's words renamed."""
    label = label.strip()
    return RAVDESS_LABELS.get(label, label) if source == "ravdess" else label


# --- questions ----------------------------------------------------------------------------------------------------
EMOTION_QUESTION = ("As an emotional recognition expert; throughout the video, which emotion conveyed by the "
                    "characters is the most obvious to you?")
# The GRPO trainer's question template: the answer format the rewards check, asked for in words.
QUESTION_TEMPLATE = ("{Question}\nOutput the thinking process in <think> </think> and final emotion in "
                     "<answer> </answer> tags.")
# The instruct of R1-Omni's README demo (two spaces before "Output", as there): `omni-fast infer`'s default.
DEFAULT_INSTRUCT = (EMOTION_QUESTION + "  Output the thinking process in <think> </think> and final emotion in "
                    "<answer> </answer> tags.")
# The reference eval scripts' prompt: `omni-fast eval`'s default.
EVAL_QUESTION = ("As an emotional recognition expert, in the video, when the characters display their emotions, "
                 "which predominant feeling is most clearly expressed?\n")


def grpo_question(question: str = EMOTION_QUESTION) -> str:
    """The GRPO prompt's text after the placeholders (also what the GRPO trainer feeds the BERT gate)."""
    return QUESTION_TEMPLATE.format(Question=question)


# The human turn of the reference SFT data (and what an SFT record without one, or the "chat_template" GRPO
# prompt, gets).
DEFAULT_SFT_QUESTION = "<video>\n<audio>\n" + grpo_question()

# --- answers ------------------------------------------------------------------------------------------------------
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_ONE_LINE = re.compile(r"<answer>(.*?)</answer>")  # R1-Omni's accuracy_reward: no re.DOTALL
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_WELL_FORMED = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def solution(label: str) -> str:
    """The reference GRPO script's solution string for a label, what the accuracy reward compares with."""
    return f"<answer> {label} </answer>"


def response(reasoning: str, label: str) -> str:
    """A response in the answer format, as the SFT targets write it."""
    return f"<think>{reasoning}</think>\n<answer>{label}</answer>"


def answer(text: str, one_line: bool = False) -> str | None:
    """The stripped content of the first <answer>...</answer> of `text`, None when there is none; one_line: the
    content may not span a newline (the accuracy reward's reading)."""
    match = (_ANSWER_ONE_LINE if one_line else _ANSWER).search(text)
    return match.group(1).strip() if match else None


def label_of(text: str, one_line: bool = False) -> str:
    """The label a response gives: its answer, else the whole stripped text (what the accuracy reward and the
    eval compare, exactly and case-sensitively)."""
    found = answer(text, one_line)
    return found if found is not None else text.strip()


def parse_response(text: str) -> tuple[str | None, str | None]:
    """-> (reasoning inside the first <think></think>, emotion inside the first <answer></answer>), None if absent."""
    think = _THINK.search(text)
    return (think.group(1).strip() if think else None), answer(text)


def well_formed(text: str) -> bool:
    """The whole text is <think>...</think> then <answer>...</answer> (whitespace between, anything inside,
    newlines allowed): what the format reward rewards."""
    return _WELL_FORMED.fullmatch(text) is not None
