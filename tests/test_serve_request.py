"""Parsing a chat request: the wire models, the messages -> question / system / media / modality, sampling over the
checkpoint's generation_config.json, the limits checked before decoding, and the SSE framing."""
import asyncio
import json

import pytest

from omni_fast.task import DEFAULT_INSTRUCT
from omni_fast.serve.chat import read_messages
from omni_fast.serve.limits import check_clip_seconds, check_media_parts, check_n, check_queue, read_body
from omni_fast.serve.protocol import DONE, ServeError, error_body, parse_request, sse
from omni_fast.serve.sampling import DEFAULT_MAX_TOKENS, SamplingDefaults, sampling_params

VIDEO = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}


def _req(**kw):
    body = {"messages": [{"role": "user", "content": [VIDEO, {"type": "text", "text": "Which emotion?"}]}], **kw}
    return parse_request(json.dumps(body).encode())


def _refused(fn, status=400, *words):
    with pytest.raises(ServeError) as e:
        fn()
    assert e.value.status == status, e.value.message
    for w in words:
        assert w in e.value.message, e.value.message
    assert "\n" not in e.value.message
    return e.value


# --- protocol --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, words", [
    (b"{not json", ["not valid JSON"]),
    (b"[1, 2]", ["JSON object"]),
    (b'{"messages": []}', ["messages"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "temprature": 0}', ["temprature", "unknown field"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', ["n:", "greater than or equal to 1"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}', ["top_p"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', ["temperature"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}', ["presence_penalty", "not supported"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}', ["stream: true"]),
])
def test_bad_bodies_are_400_naming_the_field(body, words):
    _refused(lambda: parse_request(body), 400, *words)


def test_error_body_has_openais_shape():
    assert error_body(429, "full", "n") == {"error": {"message": "full", "type": "rate_limit_error", "param": "n",
                                                      "code": 429}}
    assert error_body(500, "boom")["error"]["type"] == "server_error"


def test_sse_framing():
    assert sse({"a": 1}) == b'data: {"a": 1}\n\n'
    assert DONE == b"data: [DONE]\n\n"


# --- messages ---------------------------------------------------------------------------------------------------
def test_question_system_and_parts():
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                         {"role": "user", "content": [{"type": "text", "text": "Line one"}, VIDEO,
                                                      {"type": "text", "text": "line two"}, AUDIO]}]}
    chat = read_messages(parse_request(json.dumps(body).encode()))
    assert chat.question == "Line one\nline two" and chat.system == "Be brief."
    assert chat.video.url == VIDEO["video_url"]["url"] and chat.video.where == "messages[1].content[1]"
    assert chat.audio.data == "AAAA" and chat.audio.format == "wav" and chat.audio.where == "messages[1].content[3]"


def test_no_text_means_infers_default_instruct():
    chat = read_messages(parse_request(json.dumps({"messages": [{"role": "user", "content": [VIDEO]}]}).encode()))
    assert chat.question == DEFAULT_INSTRUCT and chat.system is None


@pytest.mark.parametrize("video, audio, has_track, use_track, modal", [
    (True, False, True, None, "video_audio"), (True, False, False, None, "video"),
    (True, False, True, False, "video"), (True, True, False, None, "video_audio"),
    (True, True, True, False, "video_audio"), (False, True, False, None, "audio")])
def test_modality_follows_the_parts(video, audio, has_track, use_track, modal):
    parts = ([VIDEO] if video else []) + ([AUDIO] if audio else [])
    body = {"messages": [{"role": "user", "content": parts}]}
    if use_track is not None:
        body["mm_processor_kwargs"] = {"use_audio_in_video": use_track}
    assert read_messages(parse_request(json.dumps(body).encode())).modal(has_track) == modal


@pytest.mark.parametrize("messages, status, words", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], 400,
     ["messages[0].content[0]", "unknown part type 'image_url'"]),
    ([{"role": "user", "content": [VIDEO, "just a string"]}], 400, ["messages[0].content[1]"]),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"uri": "x"}}]}], 400,
     ["messages[0].content[0].video_url"]),
    ([{"role": "user", "content": 5}], 400, ["messages[0].content", "a string or a list of parts"]),
    ([{"role": "user", "content": "no clip here"}], 400, ["no video_url, audio_url or input_audio"]),
    ([{"role": "user", "content": [VIDEO, VIDEO]}], 400, ["2 video parts", "at most 1 video and 1 audio"]),
    ([{"role": "user", "content": [AUDIO, AUDIO, VIDEO]}], 400, ["2 audio parts"]),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": [VIDEO]}], 400, ["roles", "system"]),
    ([{"role": "user", "content": [VIDEO]}, {"role": "user", "content": [VIDEO]}], 400, ["roles"]),
    ([{"role": "system", "content": [VIDEO]}, {"role": "user", "content": [VIDEO]}], 400,
     ["messages[0].content[0]", "text parts only"]),
])
def test_bad_messages_name_the_part(messages, status, words):
    _refused(lambda: read_messages(parse_request(json.dumps({"messages": messages}).encode())), status, *words)


# --- sampling ---------------------------------------------------------------------------------------------------
def test_defaults_are_generation_configs(omni):
    d = SamplingDefaults.from_generation_config(omni.loaded.generation.config)
    # the tiny checkpoint's generation_config.json: Qwen2.5's sampling values
    assert (d.temperature, d.top_k, d.top_p, d.repetition_penalty, d.max_tokens) == (0.7, 20, 0.8, 1.1,
                                                                                     DEFAULT_MAX_TOKENS)
    params, stops = sampling_params(_req(), d)
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (0.7, 20, 0.8, 1.1)
    assert params.max_tokens == DEFAULT_MAX_TOKENS and params.seed is None and params.stop_token_ids is None
    assert stops == ()


def test_fields_the_file_does_not_set_are_off():
    from transformers import GenerationConfig

    d = SamplingDefaults.from_generation_config(GenerationConfig(do_sample=False, max_new_tokens=77))
    assert (d.temperature, d.top_k, d.top_p, d.repetition_penalty, d.max_tokens) == (0.0, 0, 1.0, 1.0, 77)
    assert SamplingDefaults.from_generation_config(None) == SamplingDefaults()


def test_request_fields_override():
    d = SamplingDefaults(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)
    params, stops = sampling_params(_req(temperature=0, top_k=-1, top_p=0.5, repetition_penalty=1.0, n=3, seed=-7,
                                         max_tokens=9, max_completion_tokens=11, stop="</answer>"), d)
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (0.0, 0, 0.5, 1.0)
    assert (params.n, params.seed, params.max_tokens) == (3, -7, 11)  # max_completion_tokens wins
    assert stops == ("</answer>",)
    assert sampling_params(_req(max_tokens=9), d)[0].max_tokens == 9


@pytest.mark.parametrize("kw, words", [({"stop": ["a", ""]}, ["stop", "empty"]),
                                       ({"stop": [str(i) for i in range(17)]}, ["at most 16"]),
                                       ({"logprobs": True, "top_logprobs": 2}, ["top_logprobs", "only 0"]),
                                       ({"top_logprobs": 0}, ["needs logprobs"])])
def test_bad_sampling_is_400(kw, words):
    _refused(lambda: sampling_params(_req(**kw), SamplingDefaults()), 400, *words)


# --- limits -----------------------------------------------------------------------------------------------------
async def _chunks(*parts):
    for p in parts:
        yield p


def test_body_limit_from_the_header_and_while_reading():
    assert asyncio.run(read_body(_chunks(b"ab", b"cd"), "4", 4)) == b"abcd"
    assert asyncio.run(read_body(_chunks(b"ab", b"cd"), None, 4)) == b"abcd"
    e = _refused(lambda: asyncio.run(read_body(_chunks(b"a"), "5", 4)), 413, "5 bytes", "--max_request_bytes 4")
    assert e.status == 413
    _refused(lambda: asyncio.run(read_body(_chunks(b"abc", b"de"), None, 4)), 413, "--max_request_bytes 4")
    _refused(lambda: asyncio.run(read_body(_chunks(b"abc", b"de"), "3", 4)), 413)  # a lying header is caught too
    _refused(lambda: asyncio.run(read_body(_chunks(b""), "x", 4)), 400, "Content-Length")


def test_count_limits():
    check_media_parts({"video": 1, "audio": 1})
    _refused(lambda: check_media_parts({"video": 0, "audio": 2}), 400, "2 audio parts")
    check_n(8, 8)
    _refused(lambda: check_n(9, 8), 400, "n = 9", "--max_num_seqs 8")
    check_queue(3, 4)
    e = _refused(lambda: check_queue(4, 4), 429, "--max_queue 4")
    assert e.headers == {"Retry-After": "1"}
    check_clip_seconds(10.0, 10.0, "p")
    _refused(lambda: check_clip_seconds(10.05, 10.0, "messages[0].content[0]"), 400, "messages[0].content[0]",
             "10.1 s", "--max_clip_seconds 10")


# --- the command --------------------------------------------------------------------------------------------------
ISSUE_FLAGS = ["model_path", "bert_path", "host", "port", "served_model_name", "api_key", "allowed_local_media_path",
               "allowed_media_domains", "max_num_seqs", "kv_cache_memory", "max_request_bytes", "max_clip_seconds",
               "max_queue", "request_timeout", "device", "dtype"]


def test_serve_flags_are_the_issues_with_kebab_twins():
    from omni_fast.cli import build_parser

    values = {"model_path": "m", "bert_path": "b", "host": "0.0.0.0", "port": "0", "served_model_name": "r1",
              "api_key": "k", "allowed_local_media_path": "/d", "allowed_media_domains": "a.com", "max_num_seqs": "4",
              "kv_cache_memory": "1000", "max_request_bytes": "10", "max_clip_seconds": "2.5", "max_queue": "3",
              "request_timeout": "9", "device": "cpu", "dtype": "fp32"}
    for spell in (lambda f: f, lambda f: f.replace("_", "-")):
        argv = ["serve"] + [x for f in ISSUE_FLAGS for x in ("--" + spell(f), values[f])]
        args = build_parser().parse_args(argv)
        assert {f: getattr(args, f) for f in ISSUE_FLAGS} == {
            **values, "port": 0, "max_num_seqs": 4, "kv_cache_memory": 1000, "max_request_bytes": 10,
            "max_clip_seconds": 2.5, "max_queue": 3, "request_timeout": 9.0, "allowed_media_domains": ["a.com"]}
    d = build_parser().parse_args(["serve", "--model_path", "m"])
    assert (d.host, d.port, d.api_key, d.allowed_media_domains, d.allowed_local_media_path) == ("127.0.0.1", 8000,
                                                                                             None, [], None)


def test_bad_serve_settings_fail_before_loading(capsys, tmp_path):
    from omni_fast.cli import main

    assert main(["serve", "--model-path", str(tmp_path / "no-model"), "--allowed-local-media-path",
                 str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"omni-fast serve: error: --allowed_local_media_path {tmp_path / 'none'}: not a directory"]


def test_serve_cache_flags_reach_the_server(monkeypatch):
    """--no_enable_prefix_caching (vLLM's flag) turns the prefix-cache keys off; --tower_cache_dir and
    --encoder_cache_bytes go to OmniModel.from_pretrained; without them: keys on, no store, a 1 GiB encoder cache;
    a negative size is refused."""
    from omni_fast import cli

    seen = []
    monkeypatch.setattr(cli, "_serve", lambda *args: seen.append(args) or 0)
    assert cli.main(["serve", "--model-path", "m", "--no-enable-prefix-caching", "--tower-cache-dir", "/x",
                     "--encoder-cache-bytes", "0"]) == 0
    assert cli.main(["serve", "--model_path", "m"]) == 0
    (_, _, off, _, _, _, store, no_cache), (_, _, on, _, _, _, none, cache) = seen
    assert (off.enable_prefix_caching, store, on.enable_prefix_caching, none) == (False, "/x", True, None)
    assert (no_cache, cache) == (0, 1 << 30)
    assert cli.main(["serve", "--model_path", "m", "--encoder_cache_bytes", "-1"]) == 2
