"""OmniModel and the omni-fast CLI end to end on the tiny checkpoint and synthetic clips."""
import json

import pytest
import torch

from omni_fast import cli
from omni_fast.api import parse_response
from omni_fast.config import SamplingParams
from omni_fast.media.pyav import MediaError, load_clip
from omni_fast.model.prompt import DEFAULT_INSTRUCT


def _reference_text(omni, reference, clip_path, max_new_tokens, instruct=DEFAULT_INSTRUCT):
    clip = load_clip(clip_path, aspect="stretch")
    bert = dict(omni.bert_tokenizer([instruct], return_tensors="pt", padding=True, truncation=True))
    embeds = reference.embeddings(omni.prompt_ids(instruct), clip.frames, clip.mel, bert)
    gen = omni.loaded.generation
    ids = reference.greedy(embeds, max_new_tokens, list(gen.eos_token_ids), gen.repetition_penalty, gen.pad_token_id)
    return omni.tokenizer.decode(ids, skip_special_tokens=True).strip()


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_cli_infer_prints_what_the_transformers_composition_generates(tiny_ckpt, clips, omni, reference, capsys):
    rc = cli.main(["infer", "--model_path", str(tiny_ckpt), "--video_path", str(clips["mp4"]), "--modal",
                   "video_audio", "--instruct", DEFAULT_INSTRUCT, "--max_new_tokens", "24", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed == _reference_text(omni, reference, clips["mp4"], 24)


def test_cli_json_and_several_clips(tiny_ckpt, clips, capsys):
    rc = cli.main(["infer", "--model_path", str(tiny_ckpt), "--video_path", str(clips["mp4"]), str(clips["webm"]),
                   "--max_new_tokens", "8", "--json", "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["video"] for r in rows] == [str(clips["mp4"]), str(clips["webm"])]
    assert all(r["num_tokens"] <= 8 and set(r["timings"]) == {"load_s", "media_s", "encode_s", "generate_s"}
               for r in rows)


@pytest.mark.parametrize("argv,match", [
    (["--model_path", "/nonexistent/ckpt", "--video_path", "{mp4}"], "/nonexistent/ckpt"),
    (["--model_path", "{ckpt}", "--video_path", "/nonexistent/v.mp4"], "/nonexistent/v.mp4"),
    (["--model_path", "{ckpt}", "--video_path", "{mp4}", "--bert_path", "/nonexistent/bert"], "/nonexistent/bert"),
])
def test_cli_errors_name_the_argument(tiny_ckpt, clips, capsys, argv, match):
    argv = [a.format(mp4=clips["mp4"], ckpt=tiny_ckpt) for a in argv]
    assert cli.main(["infer", *argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_demo(capsys, tmp_path):
    assert cli.main(["demo", "--workdir", str(tmp_path), "--max_new_tokens", "6", "--sft_steps", "2",
                     "--grpo_steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "write tiny R1-Omni checkpoint" in out and "recognize" in out and "response" in out
    assert "SFT: 2 steps" in out and "GRPO step   2" in out and "GRPO step   3" not in out
    assert out.count("after GRPO") == 3  # one clip per toy label
    assert (tmp_path / "toy-grpo" / "checkpoint-2" / "model.safetensors").is_file()
    # a second run into the same directory would overwrite the first one's files: refused, nothing touched
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli.main(["demo", "--workdir", str(tmp_path), "--grpo_steps", "0"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "tiny-r1-omni" / "config.json").is_file()


def test_batched_recognize_equals_one_by_one(omni, clips):
    paths = [clips["mp4"], clips["mp4_wide"], clips["avi"]]
    together = omni.recognize(paths, max_new_tokens=12, batch_size=3)
    alone = [omni.recognize([p], max_new_tokens=12)[0] for p in paths]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.video for r in together] == [str(p) for p in paths]


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
@pytest.mark.parametrize("modal", ["video", "audio"])
def test_single_modality(omni, reference, clips, modal):
    r = omni.recognize(clips["mp4"], modal=modal, max_new_tokens=6)[0]
    assert 1 <= len(r.token_ids) <= 6 and isinstance(r.text, str)
    # exactly what the transformers composition generates greedily for the one modality: 6 tokens unless it
    # stopped at an EOS (then "stop" and the EOS last)
    clip = load_clip(clips["mp4"], aspect="stretch")
    bert = dict(omni.bert_tokenizer([DEFAULT_INSTRUCT], return_tensors="pt", padding=True, truncation=True))
    embeds = reference.embeddings(omni.prompt_ids(DEFAULT_INSTRUCT, modal), clip.frames if modal == "video" else None,
                                  clip.mel if modal == "audio" else None, bert)
    gen = omni.loaded.generation
    expected = reference.greedy(embeds, 6, list(gen.eos_token_ids), gen.repetition_penalty, gen.pad_token_id)
    assert r.token_ids == expected
    stopped = bool(expected) and expected[-1] in gen.eos_token_ids
    assert len(r.token_ids) == (len(expected) if stopped else 6)
    assert r.finish_reason == ("stop" if stopped else "length")


def test_generate_samples_n_per_clip(omni, clips):
    params = SamplingParams(n=3, temperature=1.0, top_k=50, max_tokens=10, seed=3)
    a = omni.generate([clips["mp4"], clips["webm"]], sampling=params, aspect="pad")
    b = omni.generate([clips["mp4"], clips["webm"]], sampling=params, aspect="pad")
    assert [len(g.texts) for g in a] == [3, 3]
    assert [c.token_ids for g in a for c in g.completions] == [c.token_ids for g in b for c in g.completions]
    assert all(torch.isfinite(c.logprobs).all() and (c.logprobs <= 0).all() for g in a for c in g.completions)


def test_bad_inputs(omni, clips, tmp_path):
    with pytest.raises(MediaError, match="missing.mp4"):
        omni.recognize([tmp_path / "missing.mp4"])
    with pytest.raises(ValueError, match="modal"):
        omni.recognize([clips["mp4"]], modal="text")
    with pytest.raises(ValueError, match="2 videos but 3 instructs"):
        omni.generate([clips["mp4"], clips["avi"]], instruct=["a", "b", "c"])


@pytest.mark.parametrize("text,expected", [
    ("<think>She smiles.</think>\n<answer>happy</answer>", ("She smiles.", "happy")),
    ("<answer> sad </answer>", (None, "sad")),
    ("<think>multi\nline</think><answer>a</answer><answer>b</answer>", ("multi\nline", "a")),
    ("no tags", (None, None)),
])
def test_parse_response(text, expected):
    assert parse_response(text) == expected


def test_engine_and_media_settings_reach_the_model(tiny_ckpt, clips, monkeypatch, capsys):
    from omni_fast.api import OmniModel
    from omni_fast.config import EngineConfig, LoaderConfig

    seen = []
    real = OmniModel.from_pretrained.__func__
    monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda c, *a, **k: seen.append(k) or real(c, *a, **k)))
    assert cli.main(["infer", "--model_path", str(tiny_ckpt), "--video_path", str(clips["mp4"]), "--device", "cpu",
                     "--max_new_tokens", "4", "--media_workers", "1", "--max_samples", "8", "--no_cuda_graphs"]) == 0
    (kw,) = seen
    assert kw["engine_config"] == EngineConfig(max_samples=8, cuda_graphs=False)
    assert kw["loader_config"].workers == 1 and kw["loader_config"].backend == "pyav"
    model = OmniModel.from_pretrained(tiny_ckpt, "cpu", bert_path=tiny_ckpt / "bert-base-uncased",
                                      loader_config=LoaderConfig(workers=1, prefetch=0))
    assert model.recognize([clips["mp4"]], max_new_tokens=3)[0].token_ids
    assert model.loader_config.workers == 1
