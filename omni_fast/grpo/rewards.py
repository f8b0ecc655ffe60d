"""R1-Omni's verifiable rewards (src/r1-v/src/open_r1/grpo.py), with the same matching rules.

Both take the decoded completion texts (special tokens skipped) and return one float per completion; the
reference sums them into a total reward in {0, 1, 2}.
"""
from __future__ import annotations

import re

_ANSWER = re.compile(r"<answer>(.*?)</answer>")                       # no DOTALL, as the reference
_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def _answer(text: str) -> str:
    match = _ANSWER.search(text)
    return match.group(1).strip() if match else text.strip()


def accuracy_reward(completions: list[str], solutions: list[str]) -> list[float]:
    """1.0 where the completion's answer equals the solution's, else 0.0.

    The answer is the stripped content of the first <answer>...</answer> on one line (no re.DOTALL: an answer
    spanning a newline does not match), falling back to the whole stripped text; the comparison is exact and
    case-sensitive. The reference first tries math_verify's parse/verify, which does not fire for the word
    labels of emotion recognition; that step is skipped here.
    """
    if len(completions) != len(solutions):
        raise ValueError(f"{len(completions)} completions but {len(solutions)} solutions")
    return [float(_answer(c) == _answer(s)) for c, s in zip(completions, solutions)]


def format_reward(completions: list[str]) -> list[float]:
    """1.0 where the whole completion is <think>...</think> then <answer>...</answer> (whitespace between,
    anything inside, newlines allowed: re.fullmatch with re.DOTALL), else 0.0."""
    return [float(_FORMAT.fullmatch(c) is not None) for c in completions]
