"""The whole model against its composition from transformers' classes (tests/reference.py), fp32 on CPU."""
import pytest
import torch

from omni_fast.media.pyav import load_clip
from omni_fast.task import DEFAULT_INSTRUCT

TOL = 1e-4


def _bert(omni, text):
    return dict(omni.bert_tokenizer([text], return_tensors="pt", padding=True, truncation=True))


@pytest.mark.parametrize("modal", ["video_audio", "video", "audio"])
def test_logits_match_reference_composition(omni, reference, clips, modal):
    clip = load_clip(clips["mp4"], aspect="stretch")
    ids = omni.prompt_ids(DEFAULT_INSTRUCT, modal)
    frames = clip.frames if modal != "audio" else None
    mel = clip.mel if modal != "video" else None
    ours = omni.forward_logits(torch.tensor([ids]), frames, mel, DEFAULT_INSTRUCT)
    ref = reference.logits(reference.embeddings(ids, frames, mel, _bert(omni, DEFAULT_INSTRUCT)))
    extra = {"video_audio": 392 + 500 - 2, "video": 392 - 1, "audio": 500 - 1}[modal]
    assert ours.shape == ref.shape == (1, len(ids) + extra, omni.config.vocab_size)
    assert (ours - ref).abs().max() < TOL


def test_inputs_change_the_logits(omni, clips):
    """Frames, audio and instruct each reach the output (guards against a branch silently dropped)."""
    a, b = load_clip(clips["mp4"]), load_clip(clips["mp4_wide"])
    ids = torch.tensor([omni.prompt_ids(DEFAULT_INSTRUCT)])
    base = omni.forward_logits(ids, a.frames, a.mel, DEFAULT_INSTRUCT)[0, -1]
    for frames, mel, text in ((b.frames, a.mel, DEFAULT_INSTRUCT), (a.frames, b.mel, DEFAULT_INSTRUCT),
                              (a.frames, a.mel, "which emotion")):
        other = omni.forward_logits(ids, frames, mel, text)[0, -1]
        assert (other - base).abs().max() > 1e-3


def test_video_tower_runs_only_the_selected_layers(omni, reference, clips):
    frames = load_clip(clips["mp4"]).frames
    ours = omni.model.vision_features(frames[None])[0]
    ref = reference.siglip(frames, output_hidden_states=True).hidden_states[-2]
    assert omni.model.model.vision_tower.num_layers_run == reference.siglip.config.num_hidden_layers - 1
    assert (ours - ref).abs().max() < TOL


def test_greedy_generation_matches_transformers_generate(omni, reference, clips):
    clip = load_clip(clips["mp4_wide"])
    ids = omni.prompt_ids(DEFAULT_INSTRUCT)
    embeds = reference.embeddings(ids, clip.frames, clip.mel, _bert(omni, DEFAULT_INSTRUCT))
    gen = omni.loaded.generation
    expected = reference.greedy(embeds, 40, list(gen.eos_token_ids), gen.repetition_penalty, gen.pad_token_id)
    got = omni.generate([clips["mp4_wide"]], sampling=_greedy(omni, 40))[0].completions[0].token_ids
    assert got == expected
    assert len(set(expected)) > 3  # a non-degenerate sequence


def _greedy(omni, n):
    from omni_fast.config import SamplingParams

    gen = omni.loaded.generation
    return SamplingParams(temperature=0.0, max_tokens=n, repetition_penalty=gen.repetition_penalty,
                          stop_token_ids=gen.eos_token_ids)


def test_forward_logits_rejects_missing_inputs(omni):
    ids = torch.tensor([omni.prompt_ids(DEFAULT_INSTRUCT)])
    with pytest.raises(ValueError, match="-201"):
        omni.forward_logits(ids, None, torch.zeros(128, 3000))
    with pytest.raises(ValueError, match="-202"):
        omni.forward_logits(ids, torch.zeros(8, 3, 224, 224), None)
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        omni.forward_logits(ids[0])


def test_token_counts_equal_the_projected_embeddings(omni, clips):
    """num_video_tokens / num_audio_tokens (the prompt's placeholder budget) are the rows that project_video /
    project_audio actually produce for a clip."""
    clip = load_clip(clips["mp4"])
    model = omni.model
    with torch.no_grad():
        video = model.project_video(model.vision_features(clip.frames[None]), model.gate_weights(_bert(omni, DEFAULT_INSTRUCT)))
        audio = model.project_audio(model.audio_features(clip.mel[None]))
    assert video.shape[:2] == (1, model.num_video_tokens)
    assert audio.shape[:2] == (1, model.num_audio_tokens)
    assert (model.num_video_tokens, model.num_audio_tokens) == (392, 500)     # the tiny checkpoint's (and R1-Omni's)
