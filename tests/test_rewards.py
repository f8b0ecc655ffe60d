"""R1-Omni's accuracy and format rewards: the matching rules of the reference grpo.py, edge cases."""
import pytest

from omni_fast.grpo.rewards import accuracy_reward, format_reward

GOOD = "<think>The corners of the mouth turn down.</think>\n<answer>sad</answer>"


@pytest.mark.parametrize("completion,solution,expected", [
    (GOOD, "<answer> sad </answer>", 1.0),                                # the solution's answer is stripped
    ("<think>x</think><answer>  sad\t</answer>", "<answer>sad</answer>", 1.0),
    (GOOD, "<answer> happy </answer>", 0.0),
    ("<think>x</think><answer>Sad</answer>", "<answer> sad </answer>", 0.0),  # case-sensitive
    ("<think>x</think><answer>happiness</answer>", "<answer> happy </answer>", 0.0),  # no synonyms
    ("<answer>sad</answer><answer>happy</answer>", "<answer> sad </answer>", 1.0),  # the first block counts
    ("<answer>happy</answer> then <answer>sad</answer>", "<answer> sad </answer>", 0.0),
    ("<think>x</think><answer>\nsad\n</answer>", "<answer> sad </answer>", 0.0),  # no DOTALL: no match ...
    ("\n sad \n", "<answer> sad </answer>", 1.0),                         # ... missing tags: whole text, stripped
    ("sad", "sad", 1.0),                                                  # solution without tags
    ("<think>sad</think>", "<answer> sad </answer>", 0.0),
    ("", "<answer> sad </answer>", 0.0),
])
def test_accuracy_reward(completion, solution, expected):
    assert accuracy_reward([completion], [solution]) == [expected]


def test_accuracy_reward_is_elementwise():
    assert accuracy_reward([GOOD, GOOD, "happy"], ["<answer>sad</answer>", "<answer>happy</answer>", "happy"]) \
        == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        accuracy_reward([GOOD], [])


@pytest.mark.parametrize("completion,expected", [
    (GOOD, 1.0),
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>line one\nline two</think>  \n\n <answer>multi\nline</answer>", 1.0),  # DOTALL, whitespace between
    ("<think></think><answer></answer>", 1.0),
    (" " + GOOD, 0.0),                                                    # leading whitespace
    (GOOD + "\n", 0.0),                                                   # trailing whitespace
    (GOOD + "<|im_end|>", 0.0),                                           # trailing text
    ("<answer>sad</answer>", 0.0),                                        # no think
    ("<think>x</think>", 0.0),                                            # no answer
    ("<think>x</think>text<answer>sad</answer>", 0.0),                    # text between the blocks
    ("<answer>sad</answer><think>x</think>", 0.0),                        # wrong order
    ("<THINK>x</THINK><ANSWER>sad</ANSWER>", 0.0),                        # case-sensitive tags
])
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


def test_total_reward_range():
    completions = [GOOD, "<think>x</think><answer>happy</answer>", "sad", "nothing"]
    total = [a + f for a, f in zip(accuracy_reward(completions, ["<answer> sad </answer>"] * 4),
                                   format_reward(completions))]
    assert total == [2.0, 1.0, 1.0, 0.0]
