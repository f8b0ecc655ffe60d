"""The emotion task's one home: the answer format written and read back the same way by every reader."""
import pytest

from omni_fast import task


@pytest.mark.parametrize("label", task.EMOTION_LABELS)
def test_solution_and_response_read_back_as_their_label(label):
    assert task.label_of(task.solution(label), one_line=True) == label
    assert task.label_of(task.solution(label)) == label
    written = task.response(f"the face shows {label}", label)
    assert task.well_formed(written)
    assert task.parse_response(written) == (f"the face shows {label}", label)


def test_the_accuracy_reading_stays_on_one_line():
    text = "<think>x</think>\n<answer>sad\n</answer> <answer>happy</answer>"
    assert task.answer(text) == "sad"
    assert task.answer(text, one_line=True) == "happy"
    assert task.answer("no tags at all") is None and task.label_of("  sad \n") == "sad"
    assert task.answer("<answer>  </answer>") == "" and task.label_of("<answer>  </answer> x") == ""


@pytest.mark.parametrize("text,ok", [("<think>a</think><answer>b</answer>", True),
                                     ("<think>a\nb</think>\n\n<answer>c\nd</answer>", True),
                                     ("<think>a</think><answer>b</answer>.", False),
                                     (" <think>a</think><answer>b</answer>", False),
                                     ("<answer>b</answer>", False)])
def test_well_formed_is_the_whole_text(text, ok):
    assert task.well_formed(text) is ok


def test_label_sets_and_ravdess_renames():
    assert task.LABEL_SETS["dfew"] == task.EMOTION_LABELS[:7] and task.LABEL_SETS["mafw"] == task.EMOTION_LABELS
    assert task.dataset_label(" fearful ", "ravdess") == "fear" and task.dataset_label("surprised", "ravdess") == "surprise"
    assert task.dataset_label("fearful", "dfew") == "fearful"
    assert set(task.RAVDESS_LABELS.values()) <= set(task.LABEL_SETS["ravdess"])


def test_questions_ask_for_the_answer_format():
    for text in (task.grpo_question(), task.DEFAULT_INSTRUCT, task.DEFAULT_SFT_QUESTION):
        assert "<think> </think>" in text and "<answer> </answer>" in text
    assert task.DEFAULT_SFT_QUESTION == "<video>\n<audio>\n" + task.grpo_question()
