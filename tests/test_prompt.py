"""Prompts and their tokenisation against the reference's own procedure (mm_infer, tokenizer_multimodal_token)."""
import pytest

from omni_fast.model.checkpoint import load_tokenizer
from omni_fast.model.prompt import grpo_bert_text, grpo_prompt, inference_prompt, tokenize_multimodal
from omni_fast.task import DEFAULT_INSTRUCT


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


def _reference_tokenize(prompt, tokenizer):
    """tokenizer_multimodal_token as written in humanomni/mm_utils.py (MODAL_INDEX_MAP order, zip interleave)."""
    chunks = [prompt]
    for token, index in {"<audio>": -202, "<video>": -201, "<image>": -200}.items():
        if token in prompt:
            split = []
            for chunk in chunks:
                if isinstance(chunk, str):
                    parts = chunk.split(token)
                    split.extend([p for pair in zip(parts, [index] * len(parts)) for p in pair][:-1])
                else:
                    split.append(chunk)
            chunks = split
    ids = []
    for chunk in chunks:
        ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids if isinstance(chunk, str) else [chunk])
    return ids


@pytest.mark.parametrize("modal,token", [("video_audio", "<video>\n<audio>"), ("video", "<video>"), ("audio", "<audio>")])
def test_inference_prompt_is_mm_infer(tok, modal, token):
    message = [{"role": "user", "content": token + "\n" + DEFAULT_INSTRUCT}]
    expected = tok.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    expected = expected.replace("<video>", "<vi_start><video><vi_end>").replace("<audio>", "<au_start><audio><au_end>")
    ours = inference_prompt(tok, DEFAULT_INSTRUCT, modal)
    assert ours == expected
    assert ours.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    ids = tokenize_multimodal(tok, ours)
    assert ids == _reference_tokenize(ours, tok)
    assert ids.count(-201) == ("video" in modal) and ids.count(-202) == ("audio" in modal)


def test_a_system_turn_replaces_the_templates_default(tok):
    ours = inference_prompt(tok, "Which emotion?", "video", system="You judge emotions.")
    assert ours == ("<|im_start|>system\nYou judge emotions.<|im_end|>\n<|im_start|>user\n<vi_start><video><vi_end>\n"
                    "Which emotion?<|im_end|>\n<|im_start|>assistant\n")
    assert inference_prompt(tok, "Which emotion?", "video", system=None) == inference_prompt(tok, "Which emotion?",
                                                                                              "video")


def test_tokenize_handles_adjacent_and_repeated_placeholders(tok):
    prompt = "<video><audio>x<video>\n<audio>"
    assert tokenize_multimodal(tok, prompt) == _reference_tokenize(prompt, tok)
    assert tokenize_multimodal(tok, "plain text") == tok("plain text", add_special_tokens=False).input_ids


def test_grpo_prompt_is_the_r1_omni_training_prompt():
    assert grpo_prompt() == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|><vi_start><video><vi_end>\n<au_start><audio><au_end>\n"
        "As an emotional recognition expert; throughout the video, which emotion conveyed by the characters is the most "
        "obvious to you?\nOutput the thinking process in <think> </think> and final emotion in <answer> </answer> "
        "tags.<|im_end|>\n<|im_start|>assistant\n")
    assert "<video>" not in grpo_bert_text() and grpo_bert_text().endswith("<answer> </answer> tags.")


def test_special_tokens_are_single_ids(tok):
    for t in ("<|im_start|>", "<|im_end|>", "<|video_pad|>", "<|endoftext|>"):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1
    ids = tok("<think>a</think><answer>sad</answer>", add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think><answer>sad</answer>"


def test_bad_modal(tok):
    with pytest.raises(ValueError, match="modal 'image'"):
        inference_prompt(tok, "x", "image")
