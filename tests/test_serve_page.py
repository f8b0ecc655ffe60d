"""The page's requests and what it shows (omni_fast.serve.page), without Gradio or a browser: the request each of the
page's field settings sends, the streamed answer read back from a real server (uvicorn, the app, the engine loop,
over the scripted engine of tests/serve_support.py), the refusals as one line, and the lines drawn from an answer."""
import asyncio
import copy
import base64
import concurrent.futures
import time

import pytest
import torch

from omni_fast.serve.page import (NO_ANSWER, Answer, PageError, agreement, agreement_line, answers_table, error_line,
                                  label_note, page_request, stream_answer, timings_line)
from omni_fast.task import DEFAULT_INSTRUCT
from serve_support import ANSWER, ThreadServer, answer_script, data_url, scripted_engine


@pytest.fixture(scope="module")
def script(omni):
    return answer_script(omni)


@pytest.fixture(scope="module")
def served(omni, script):
    engine = scripted_engine(omni, script)
    with ThreadServer(omni, engine, max_clip_seconds=2.5, max_num_seqs=4) as server:
        yield server, engine


def _ask(server, request, key=None) -> list[Answer]:
    async def run():
        return [_copy(a) async for a in stream_answer(server.url, key, request, timeout=60)]

    return asyncio.run(run())


def _copy(a: Answer) -> Answer:
    return copy.deepcopy(a)


def _request(video=None, audio=None, modality="video + audio", question=DEFAULT_INSTRUCT, temperature=0.0, n=1,
             max_tokens=None, seed=None):
    return page_request(video, audio, modality, question, temperature, n, max_tokens, seed, "omni-fast")


# --- the request the page sends -------------------------------------------------------------------------------------
def _file_of(part: dict) -> tuple[str, str, bytes]:
    """A media part -> (its type, the data URL's media type, the bytes it carries)."""
    kind = part["type"]
    header, _, data = part[kind]["url"].partition(",")
    assert header.startswith("data:") and header.endswith(";base64")
    return kind, header[5:-7], base64.b64decode(data)


def test_each_modality_sends_the_parts_an_api_client_would(clips, awkward_clips):
    mp4, wav = clips["mp4"], awkward_clips["audio_only"]
    r = _request(mp4, wav, "video + audio", "Why?", temperature=0.7, n=3, max_tokens=9, seed=5)
    content = r.body["messages"][0]["content"]
    # (the audio type is the platform's name for wav, audio/wav or audio/x-wav: the server reads the bytes)
    assert [_file_of(p) for p in content[:2]] == [("video_url", "video/mp4", mp4.read_bytes()),
                                                  ("audio_url", _file_of(content[1])[1], wav.read_bytes())]
    assert _file_of(content[1])[1] in ("audio/wav", "audio/x-wav") and content[2] == {"type": "text", "text": "Why?"}
    assert {k: r.body[k] for k in ("stream", "stream_options", "temperature", "n", "max_tokens", "seed", "model")} == \
        {"stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7, "n": 3, "max_tokens": 9,
         "seed": 5, "model": "omni-fast"}
    assert "mm_processor_kwargs" not in r.body
    assert r.parts == {"messages[0].content[0]": "the video", "messages[0].content[1]": "the audio file"}

    r = _request(mp4, wav, "video")  # the separate audio is not sent; the video's own track is switched off
    assert [p["type"] for p in r.body["messages"][0]["content"]] == ["video_url", "text"]
    assert r.body["mm_processor_kwargs"] == {"use_audio_in_video": False}
    assert r.body["temperature"] == 0.0 and "seed" not in r.body and "max_tokens" not in r.body  # greedy: explicit
    assert "seed" not in _request(mp4, seed=-1).body and _request(mp4, seed=0).body["seed"] == 0

    r = _request(mp4, wav, "audio")
    (audio, text) = r.body["messages"][0]["content"]
    assert _file_of(audio)[::2] == ("audio_url", wav.read_bytes()) and text["type"] == "text"
    r = _request(mp4, None, "audio", question="  ")  # no audio file: the video's track; a blank question: none
    assert r.body["messages"][0]["content"] == [{"type": "audio_url", "audio_url": {"url": data_url(mp4)}}]
    assert r.parts == {"messages[0].content[0]": "the video's audio track"}


@pytest.mark.parametrize("video, audio, modality, words", [
    (None, None, "video + audio", "needs a video"), (None, "x.wav", "video", "needs a video"),
    (None, None, "audio", "needs an audio file"), ("x.mp4", None, "sound", "expected one of")])
def test_missing_inputs_are_one_line(video, audio, modality, words):
    with pytest.raises(PageError, match=words) as e:
        _request(video, audio, modality)
    assert "\n" not in e.value.line


# --- the answer read back from the server ---------------------------------------------------------------------------
def test_the_streamed_answer_is_the_apis(served, omni, clips):
    """The page's answer equals the API's for the same clip and question, and the two share the engine's prefix
    cache: the API's request after the page's reads the whole prompt from it."""
    server, engine = served
    question = "Which emotion, and why? (asked once by the page, then by the API)"
    seen = _ask(server, _request(clips["mp4"], question=question))
    api = server.client().chat.completions.create(model="omni-fast", messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(clips["mp4"])}},
        {"type": "text", "text": question}]}], temperature=0)
    last = seen[-1]
    assert last.done and last.texts == [api.choices[0].message.content] == [ANSWER]
    assert last.emotions == ["angry"] and last.reasonings == ["The brows are drawn together."]
    assert last.finish_reasons == ["stop"]
    ids = list(engine.added)
    assert torch.equal(engine.added[ids[-2]].prompt, engine.added[ids[-1]].prompt)  # the page's prompt is the API's
    assert engine.added[ids[-2]].params.temperature == 0
    t = last.timings
    assert set(t) == {"media_s", "wait_s", "encode_s", "generate_s", "total_s"} and min(t.values()) >= 0
    assert t["media_s"] + t["wait_s"] + t["encode_s"] + t["generate_s"] <= t["total_s"] + 1e-6
    assert 0 < last.first_token_s < 60
    prompt = api.usage.prompt_tokens
    assert last.usage["prompt_tokens"] == prompt and last.usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert api.usage.prompt_tokens_details.cached_tokens == prompt
    assert timings_line(last).endswith(f" · prefix cache: 0 of {prompt} prompt positions")


def test_the_answer_grows_while_it_streams(omni, script, clips):
    engine = scripted_engine(omni, script)
    original = engine.step

    def slow_step():  # one token every 30 ms: the page sees the text grow
        time.sleep(0.03)
        return original()

    engine.step = slow_step
    with ThreadServer(omni, engine) as server:
        seen = _ask(server, _request(clips["mp4"]))
    texts = [a.texts[0] for a in seen[:-1]]  # while it streams: one snapshot per new piece of text
    assert len(texts) >= 3 and all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:]))
    assert seen[-1].texts[0].startswith(texts[-1]) and seen[-1].texts[0] == ANSWER
    assert not any(a.done for a in seen[:-1]) and seen[0].emotions == [None] and seen[-1].emotions == ["angry"]


def test_n_answers(served, clips):
    server, _ = served
    last = _ask(server, _request(clips["mp4"], temperature=1.0, n=3, max_tokens=6, seed=2))[-1]
    assert len(last.texts) == 3 and len(set(last.texts)) == 3 and last.finish_reasons == ["length"] * 3
    rows = answers_table(last)
    assert [r[0] for r in rows] == [1, 2, 3] and [r[2] for r in rows] == ["length"] * 3
    assert [r[3] for r in rows] == last.texts  # no <think>: the text itself


# --- refusals: one line each, parts named as the page names them ----------------------------------------------------
def test_refusals_are_one_line(served, clips, awkward_clips, tmp_path):
    server, _ = served
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    cases = [
        (_request(bad), "Error 400: the video: cannot be opened as a media file (InvalidDataError)"),
        (_request(clips["mp4_wide"]), "Error 400: the video: the clip is 3.0 s long; the limit is "
                                      "--max_clip_seconds 2.5"),
        (_request(clips["mp4"], awkward_clips["corrupt"]), "Error 400: the audio file: cannot be opened as a media "
                                                           "file (InvalidDataError)"),
        (_request(clips["mp4_silent"], modality="audio"), "Error 400: the video's audio track: has no audio stream"),
        (_request(clips["mp4"], n=5, temperature=1.0), "Error 400: n = 5 exceeds the server's --max_num_seqs 4"),
    ]
    for request, line in cases:
        with pytest.raises(PageError) as e:
            _ask(server, request)
        assert e.value.line == line
    assert _ask(server, _request(clips["mp4"]))[-1].emotions == ["angry"]  # and the server goes on


def test_queue_full_and_the_api_key_are_the_apis(omni, script, clips):
    engine = scripted_engine(omni, script)
    engine.step_gate.clear()  # the first request is in the engine with no token yet: it waits
    with ThreadServer(omni, engine, max_queue=1, api_key="k3y") as server:
        with pytest.raises(PageError, match="^Error 401: missing or wrong API key"):
            _ask(server, _request(clips["mp4"]), key="wrong")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(_ask, server, _request(clips["mp4"]), "k3y")
            deadline = time.monotonic() + 60
            while not engine.added and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(PageError) as e:
                _ask(server, _request(clips["mp4"]), key="k3y")
            engine.step_gate.set()
            assert first.result()[-1].emotions == ["angry"]
    assert e.value.line == ("Error 429: the server's queue is full (--max_queue 1 requests waiting); retry later")


def test_an_unreachable_server_is_one_line(clips):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PageError, match=r"^Error: the server did not answer \(ConnectError") as e:
        asyncio.run(_drain(stream_answer(f"http://127.0.0.1:{port}", None, _request(clips["mp4"]), 5)))
    assert "\n" not in e.value.line


async def _drain(gen):
    async for _ in gen:
        pass


# --- the lines drawn from an answer ---------------------------------------------------------------------------------
def test_agreement_and_the_label_set():
    assert agreement(["sad", "happy", "sad", None]) == {"sad": 0.5, "happy": 0.25, NO_ANSWER: 0.25}
    assert list(agreement(["sad", "happy", "sad"])) == ["sad", "happy"]  # most common first
    assert agreement_line(["sad", "happy", "sad"]) == "2 of 3 answers agree on sad."
    assert agreement_line([None, None, "sad"]) == "2 of 3 answers agree on no answer."
    assert label_note(["angry"], "dfew").startswith("In DFEW's label set (7 labels: happy, sad, neutral, angry")
    assert label_note(["calm", "angry"], "dfew").startswith("Outside DFEW's label set") and "'calm'" in \
        label_note(["calm", "angry"], "dfew") and "'angry'" not in label_note(["calm", "angry"], "dfew")
    assert label_note(["calm"], "ravdess").startswith("In RAVDESS's label set (8 labels")
    assert label_note([None], "mafw").startswith("No emotion: the response has no <answer></answer> tag.")


def test_error_and_timings_lines():
    parts = {"messages[0].content[0]": "the video", "messages[0].content[1]": "the audio file"}
    assert error_line(400, "messages[0].content[1]: has no audio\nstream", parts) == \
        "Error 400: the audio file: has no audio stream"
    assert error_line(None, "gone", {}) == "Error: gone"
    a = Answer(["x"], ["stop"], ["sad"], [None], {"media_s": 0.01, "wait_s": 0.0, "encode_s": 0.25,
                                                  "generate_s": 1.5, "total_s": 1.8},
               {"prompt_tokens": 900, "prompt_tokens_details": {"cached_tokens": 900}}, 0.3)
    assert timings_line(a) == ("media 0.010 s · towers 0.250 s · waiting 0.000 s · generation 1.500 s · "
                               "total 1.800 s · first token after 0.300 s · prefix cache: 900 of 900 prompt positions")
    a.usage, a.timings = None, {"total_s": 2.0}
    assert timings_line(a) == "total 2.000 s · first token after 0.300 s"


def test_data_url_guesses_the_type(tmp_path):
    p = tmp_path / "a.webm"
    p.write_bytes(b"\x1a\x45")
    from omni_fast.serve.page import data_url as page_data_url

    assert page_data_url(p) == "data:video/webm;base64," + base64.b64encode(b"\x1a\x45").decode()
    (tmp_path / "b.weird").write_bytes(b"z")
    assert page_data_url(tmp_path / "b.weird").startswith("data:application/octet-stream;base64,")


def test_the_page_reaches_its_own_server(served):
    from omni_fast.serve.server import own_url

    server, _ = served
    assert server.state.url == server.url  # set once the server listens: where the page's requests go
    assert own_url("0.0.0.0", 8000) == "http://127.0.0.1:8000" and own_url("::", 8000) == "http://[::1]:8000"
    assert own_url("192.0.2.7", 81) == "http://192.0.2.7:81" and own_url("::1", 9) == "http://[::1]:9"
