"""Rewards the multi-process tests name as "rewards_for_tests:<function>" in their configs (imported by each
rank; tests/ is on the ranks' PYTHONPATH)."""
import os


def text_length(completions):
    """Differs between the tiny random model's completions, so advantages and gradients are not zero."""
    return [len(c) / 10 for c in completions]


def fail_on_rank_1(completions):
    if os.environ.get("RANK") == "1":
        raise ValueError("rank 1's reward failed on purpose")
    return [0.0 for _ in completions]


def varied_for_happy(completions, solutions):
    """Differs between completions for a "happy" clip only: every other clip's group is all 0 (zero variance),
    which dynamic sampling drops."""
    return [len(c) / 10 if "happy" in s else 0.0 for c, s in zip(completions, solutions)]
