"""OmniModel and the omni-fast CLI end to end on the tiny checkpoint and synthetic clips."""
import json

import pytest
import torch

from omni_fast import cli
from omni_fast.task import parse_response
from omni_fast.config import SamplingParams
from omni_fast.media.pyav import MediaError, load_clip
from omni_fast.task import DEFAULT_INSTRUCT


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


def test_cli_json_gives_each_clip_its_own_timings(tiny_ckpt, clips, capsys):
    rc = cli.main(["infer", "--model-path", str(tiny_ckpt), "--video-path", str(clips["mp4"]), str(clips["webm"]),
                   "--max-new-tokens", "8", "--json", "--device", "cpu", "--batch-size", "1"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["video"] for r in rows] == [str(clips["mp4"]), str(clips["webm"])]
    assert all(r["num_tokens"] <= 8 and set(r["timings"]) == {"media_s", "encode_s", "generate_s", "prompt_cached"}
               for r in rows)
    assert [r["timings"]["prompt_cached"] for r in rows] == [False, False]
    assert all(r["timings"]["generate_s"] > 0 and r["error"] is None for r in rows)
    assert rows[0]["timings"] != rows[1]["timings"]  # one batch each: not the call's totals repeated


def test_cli_infer_prints_each_clip_as_it_finishes(tiny_ckpt, clips, capsys, monkeypatch):
    from omni_fast.api import OmniModel

    printed_before = []
    real = OmniModel.recognize_iter

    def watching(self, *a, **k):
        for r in real(self, *a, **k):
            printed_before.append(capsys.readouterr().out.count("\n"))
            yield r
    monkeypatch.setattr(OmniModel, "recognize_iter", watching)
    assert cli.main(["infer", "--model_path", str(tiny_ckpt), "--video_path", str(clips["mp4"]), str(clips["mp4_wide"]),
                     str(clips["webm"]), "--max_new_tokens", "3", "--device", "cpu", "--batch_size", "1"]) == 0
    assert printed_before == [0, 1, 1]  # the clip before each result was already printed


def test_cli_on_error_skip_names_the_clip_and_goes_on(tiny_ckpt, clips, tmp_path, capsys):
    missing = tmp_path / "missing.mp4"
    argv = ["infer", "--model_path", str(tiny_ckpt), "--video_path", str(missing), str(clips["mp4"]),
            "--max_new_tokens", "3", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "missing.mp4" in capsys.readouterr().err
    assert cli.main(argv[:4] + argv[5:]) == 0  # the good clip alone
    alone = capsys.readouterr().out
    assert cli.main(argv + ["--on_error", "skip"]) == 0
    out, err = capsys.readouterr()
    # a line for the skipped clip, so that each clip's answer stays on its own line, in order
    assert out.splitlines()[0] == f"[skipped {missing}: no such file]" and out.splitlines()[1:] == alone.splitlines()
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if str(missing) in line]) == 1  # named once, on one line
    assert cli.main(argv + ["--on-error", "skip", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["video"] for r in rows] == [str(missing), str(clips["mp4"])]
    assert "no such file" in rows[0]["error"] and rows[1]["error"] is None


def test_cli_device_errors_are_one_line(tiny_ckpt, clips, capsys, monkeypatch):
    base = ["infer", "--model_path", str(tiny_ckpt), "--video_path", str(clips["mp4"])]
    assert cli.main(base + ["--device", "quantum"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'quantum'" in err and err.count("\n") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (base, ["eval", "--model_path", str(tiny_ckpt), "--annotations", str(clips["mp4"])]):
        assert cli.main(command + ["--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "torch sees no CUDA GPU" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra,said", [(["--max_new_tokens", "0"], "--max_new_tokens 0"),
                                        (["--batch_size", "0"], "--batch_size 0"),
                                        (["--batch_size", "-3"], "--batch_size -3"),
                                        (["--max_num_seqs", "0"], "--max_num_seqs 0"),
                                        (["--max_num_batched_tokens", "0"], "--max_num_batched_tokens 0")])
def test_cli_infer_refuses_counts_below_one_before_loading(tiny_ckpt, clips, capsys, monkeypatch, extra, said):
    from omni_fast.api import OmniModel

    monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    assert cli.main(["infer", "--model_path", str(tiny_ckpt), "--video_path", str(clips["mp4"]), *extra]) == 2
    assert capsys.readouterr().err == f"omni-fast infer: error: {said}: expected an integer >= 1\n"


def test_batch_size_below_one_is_refused_by_the_api(omni, clips):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        omni.recognize(clips["mp4"], max_new_tokens=2, batch_size=0)


def test_cli_ctrl_c_exits_130_without_a_traceback(tiny_ckpt, clips, capsys, monkeypatch):
    from omni_fast.api import OmniModel

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
        yield
    monkeypatch.setattr(OmniModel, "recognize_iter", interrupted)
    assert cli.main(["infer", "--model_path", str(tiny_ckpt), "--video_path", str(clips["mp4"]), "--device",
                     "cpu"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


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
                     "--max_new_tokens", "4", "--media_workers", "1", "--max_num_seqs", "8", "--kv_cache_memory",
                     str(64 << 20), "--no_cuda_graphs"]) == 0
    (kw,) = seen
    assert kw["engine_config"] == EngineConfig(max_num_seqs=8, kv_cache_memory=64 << 20, cuda_graphs=False)
    assert kw["loader_config"].workers == 1 and kw["loader_config"].backend == "pyav"
    model = OmniModel.from_pretrained(tiny_ckpt, "cpu", bert_path=tiny_ckpt / "bert-base-uncased",
                                      loader_config=LoaderConfig(workers=1, prefetch=0))
    assert model.recognize([clips["mp4"]], max_new_tokens=3)[0].token_ids
    assert model.loader_config.workers == 1


def test_results_align_with_inputs_and_carry_their_errors(omni, clips, tmp_path):
    paths = [clips["mp4"], tmp_path / "missing.mp4", clips["webm"]]
    results = omni.recognize(paths, max_new_tokens=4, batch_size=2, on_error="skip")
    assert [r.video for r in results] == [str(p) for p in paths] and [r.index for r in results] == [0, 1, 2]
    assert [r.error is None for r in results] == [True, False, True] and "missing.mp4" in results[1].error
    assert results[1].finish_reason == "error" and results[1].token_ids == [] and results[1].text == ""
    alone = omni.recognize([clips["webm"]], max_new_tokens=4)[0]
    assert results[2].token_ids == alone.token_ids
    assert all(r.timings.generate > 0 for r in results if r.error is None)
    assert not hasattr(omni, "failures") and not hasattr(omni, "timings")  # no side channels between calls
    gens = omni.generate(paths, sampling=SamplingParams(max_tokens=3, seed=1), on_error="skip")
    assert [g.error is None for g in gens] == [True, False, True] and gens[1].texts == []
    with pytest.raises(ValueError, match="on_error 'ignore'"):
        omni.recognize(paths, on_error="ignore")


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(top_p=float("inf")), "top_p must be a finite number"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number"),
    (dict(max_tokens=8.5), "max_tokens must be an integer, got 8.5"),
    (dict(n=2.0), "n must be an integer, got 2.0"),
    (dict(top_k=True), "top_k must be an integer, got True"),
    (dict(seed="3"), "seed must be an integer or None"),
    (dict(stop_token_ids=(1, -3)), "stop_token_ids must be token ids"),
])
def test_sampling_params_refuse_nan_and_non_integers(kwargs, message):
    from omni_fast.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        SamplingParams(**kwargs)


def test_inference_dtype_is_the_references_fp16_on_a_gpu():
    from omni_fast.api import inference_dtype

    assert inference_dtype(torch.device("cuda")) == torch.float16
    assert inference_dtype(torch.device("cpu")) == torch.float32


def _copy_with(tiny_ckpt, tmp_path, **config):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_prompt_longer_than_the_positions_says_both_numbers(omni, tiny_ckpt, clips, tmp_path, caplog):
    from omni_fast.api import OmniModel

    prompt = len(omni.prompt_ids(DEFAULT_INSTRUCT)) - 2 + 392 + 500
    short = OmniModel.from_pretrained(_copy_with(tiny_ckpt, tmp_path, max_position_embeddings=prompt + 3), "cpu")
    with caplog.at_level("WARNING", logger="omni_fast.api"):
        r = short.recognize(clips["mp4"], max_new_tokens=10)[0]
    assert len(r.token_ids) <= 3 and f"max_tokens 10 capped to 3: the prompt takes {prompt}" in caplog.text
    with pytest.raises(ValueError, match=f"the prompt is {prompt + 5} positions long .* the model has {prompt + 3} "):
        short.recognize(clips["mp4"], instruct=DEFAULT_INSTRUCT + " a a a a a", max_new_tokens=4)


def test_instruct_longer_than_berts_positions_is_truncated_as_the_reference(omni, clips, caplog):
    long = DEFAULT_INSTRUCT + " really" * 200
    limit = omni.model.towers.bert.max_position_embeddings
    assert limit == 128 < omni.bert_tokenizer.model_max_length  # the tiny BERT's (bert-base-uncased: 512, its model_max_length)
    with caplog.at_level("WARNING", logger="omni_fast.model"):
        enc = omni.model.bert_inputs(omni.bert_tokenizer, [long, "short"])
    assert enc["input_ids"].shape == (2, limit) and f"truncated to {limit}" in caplog.text
    full = omni.bert_tokenizer([long], return_tensors="pt", truncation=True, max_length=limit)
    assert torch.equal(enc["input_ids"][0], full["input_ids"][0])  # the first 127 tokens and [SEP], as HF truncates
    assert omni.recognize(clips["mp4"], instruct=long, max_new_tokens=2)[0].token_ids


def test_generation_stops_at_the_tokenizers_eos_too(tiny_ckpt, clips, monkeypatch):
    """The reference stops on its tokenizer's EOS (KeywordsStoppingCriteria) as well as on HF generate's
    generation_config EOS ids: a tokenizer EOS missing from generation_config.json still stops generation."""
    from omni_fast.api import OmniModel
    from omni_fast.model import checkpoint

    free = OmniModel.from_pretrained(tiny_ckpt, "cpu")
    gen = free.loaded.generation
    ids = free.generate(clips["mp4"], sampling=SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                        repetition_penalty=gen.repetition_penalty))[0].completions[0].token_ids
    j = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i] and ids[i] not in gen.eos_token_ids)
    real = checkpoint.load_tokenizer

    class EosAt:
        """The checkpoint's tokenizer with another EOS id (as a tokenizer_config.json naming another eos_token)."""
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, *a, **k):
            return self._tok(*a, **k)

        eos_token_id = ids[j]
    monkeypatch.setattr(checkpoint, "load_tokenizer", lambda d: EosAt(real(d)) if d == tiny_ckpt else real(d))
    model = OmniModel.from_pretrained(tiny_ckpt, "cpu")
    assert model.loaded.generation.eos_token_ids == (*gen.eos_token_ids, ids[j])
    r = model.recognize(clips["mp4"], max_new_tokens=12)[0]
    assert r.token_ids == ids[:j + 1] and r.finish_reason == "stop"


def test_kebab_case_flags_everywhere():
    parser = cli.build_parser()
    a = parser.parse_args(["infer", "--model-path", "m", "--video-path", "v.mp4", "--max-new-tokens", "3",
                           "--bert-path", "b", "--on-error", "skip", "--no-cuda-graphs"])
    b = parser.parse_args(["infer", "--model_path", "m", "--video_path", "v.mp4", "--max_new_tokens", "3",
                           "--bert_path", "b", "--on_error", "skip", "--no_cuda_graphs"])
    assert vars(a) == vars(b) and a.max_new_tokens == 3 and a.on_error == "skip"
    assert cli.parse_overrides(["--max-steps", "3", "--learning_rate=1e-6"]) == {"max_steps": "3",
                                                                                  "learning_rate": "1e-6"}


def test_load_settings_are_what_from_pretrained_loads_with(tiny_ckpt, monkeypatch):
    """The device and dtype a results header names before loading are the ones the model gets."""
    from omni_fast.api import OmniModel, load_settings

    assert load_settings("cpu", None) == (torch.device("cpu"), torch.float32)
    assert load_settings("cpu", torch.bfloat16) == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_settings(None, None) == (torch.device("cpu"), torch.float32)
    model = OmniModel.from_pretrained(tiny_ckpt, "cpu", torch.bfloat16)
    assert (model.device, model.model.lm_head_weight.dtype) == load_settings("cpu", torch.bfloat16)


def test_save_pretrained_of_float16_weights_says_they_went_through_float16(tiny_ckpt, tmp_path, caplog):
    from omni_fast.api import OmniModel

    model = OmniModel.from_pretrained(tiny_ckpt, "cpu", torch.float16)
    with caplog.at_level("WARNING", logger="omni_fast.model.checkpoint"):
        out = model.save_pretrained(tmp_path / "saved")
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "went through float16" in line and "dtype=torch.bfloat16" in line and "--dtype bfloat16" in line
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_clips_join_the_running_engine_and_a_repeat_reuses_its_prompt(tiny_ckpt, clips):
    """One clip per media batch, three batches: a later clip's request joins while an earlier one still decodes
    (no batch waits for the previous one to drain); the third clip is the first again with the same question, so
    the engine reads its prompt's KV from the prefix cache (no prefill) and gives the same tokens; a later call
    hits too, and an early stop leaves the engine empty."""
    from omni_fast.api import OmniModel
    from omni_fast.config import LoaderConfig

    model = OmniModel.from_pretrained(tiny_ckpt, "cpu", bert_path=tiny_ckpt / "bert-base-uncased",
                                      loader_config=LoaderConfig(workers=1, prefetch=1))
    live_per_step, step = [], model.engine.step
    model.engine.step = lambda: (live_per_step.append(len(model.engine.requests)), step())[1]
    paths = [clips["mp4"], clips["webm"], clips["mp4"]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = model.generate(paths, sampling=params, batch_size=1)
    assert max(live_per_step) >= 2
    assert [g.timings.prompt_cached for g in first] == [False, False, True]
    assert first[2].completions[0].token_ids == first[0].completions[0].token_ids
    prefilled = []
    prefill = model.engine.runner.prefill
    model.engine.runner.prefill = lambda chunks: (prefilled.extend(chunks), prefill(chunks))[1]
    again = model.generate([paths[1]], sampling=params)[0]
    assert again.timings.prompt_cached and not prefilled
    assert again.completions[0].token_ids == first[1].completions[0].token_ids
    other = model.generate([paths[1]], instruct="Which emotion?", sampling=params)[0]  # another question: a miss
    assert not other.timings.prompt_cached and prefilled
    stream = model.recognize_iter(paths, max_new_tokens=8, batch_size=1)
    next(stream)
    stream.close()
    assert not model.engine.has_unfinished_requests()


def test_a_repeated_clip_reads_its_tower_features_from_the_encoder_cache_and_gives_the_same_tokens(tiny_ckpt, clips,
                                                                                                   monkeypatch):
    """Two clips generated, then again in the other order with the prefix cache emptied (so the prompts are
    prefilled again and only the features are reused): no clip is decoded or run through a tower, features_from
    says "memory", and every token and log-prob equals the first call's. The cache is keyed by FeatureSettings.key
    of the clip's content hash: the same clip with the training aspect is a miss. encoder_cache_bytes=0 turns it
    off."""
    from omni_fast.api import OmniModel
    from omni_fast.config import LoaderConfig
    from omni_fast.features.key import FeatureSettings, content_hash
    from omni_fast.media import loader as mloader

    loader = LoaderConfig(workers=1, prefetch=1)
    model = OmniModel.from_pretrained(tiny_ckpt, "cpu", bert_path=tiny_ckpt / "bert-base-uncased", loader_config=loader)
    params = SamplingParams(n=2, temperature=1.0, top_k=20, max_tokens=10, seed=3)
    paths = [clips["mp4"], clips["webm"]]
    miss = model.generate(paths, sampling=params, batch_size=2)
    assert [g.features_from for g in miss] == ["towers", "towers"]
    settings = FeatureSettings.of(model.model, model._loader_config("video_audio", "stretch"), model.device)
    assert model.encoder_cache.keys() == [settings.key(content_hash(p)) for p in paths]
    work = []
    load, vision, audio = mloader._load, model.model.vision_features, model.model.audio_features
    monkeypatch.setattr(mloader, "_load", lambda *a, **k: work.append("decode") or load(*a, **k))
    monkeypatch.setattr(model.model, "vision_features", lambda x: work.append("vision") or vision(x))
    monkeypatch.setattr(model.model, "audio_features", lambda x: work.append("audio") or audio(x))
    model.engine.reset_prefix_cache()
    hit = model.generate(paths[::-1], sampling=params, batch_size=2)[::-1]
    assert [g.features_from for g in hit] == ["memory", "memory"] and not work
    assert not any(g.timings.prompt_cached for g in hit)  # prefilled again: the features alone were reused
    for a, b in zip(hit, miss, strict=True):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        assert all(torch.equal(x.logprobs, y.logprobs) for x, y in zip(a.completions, b.completions))
    assert len({tuple(c.token_ids) for g in miss for c in g.completions}) > 1  # the clips' texts differ: a swap shows
    padded = model.generate([paths[0]], sampling=params, aspect="pad")[0]
    assert padded.features_from == "towers" and "decode" in work
    off = OmniModel(model.loaded, loader_config=loader, encoder_cache_bytes=0)
    assert off.encoder_cache is None
    assert [off.generate([paths[0]], sampling=params)[0].features_from for _ in range(2)] == ["towers", "towers"]
    with pytest.raises(ValueError, match="encoder_cache_bytes must be a number of bytes >= 0"):
        OmniModel(model.loaded, encoder_cache_bytes=-1)


def test_cli_refuses_a_negative_encoder_cache_before_loading(tiny_ckpt, clips, capsys, monkeypatch):
    from omni_fast.api import OmniModel

    monkeypatch.setattr(OmniModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    assert cli.main(["infer", "--model_path", str(tiny_ckpt), "--video_path", str(clips["mp4"]),
                     "--encoder_cache_bytes", "-1"]) == 2
    assert "--encoder_cache_bytes -1: expected a number of bytes >= 0" in capsys.readouterr().err
