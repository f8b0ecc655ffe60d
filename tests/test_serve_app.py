"""The server's HTTP layer with the real `openai` client on 127.0.0.1: a real uvicorn, the FastAPI app, the media
pool and the engine loop, over a scripted engine (tests/serve_support.py) so every token is known. What the engine
is given must be what `omni-fast infer` builds; tests/test_serve.py runs the real engine in a subprocess."""
import asyncio
import concurrent.futures
import contextlib
import json
import re
import signal
import threading
import time

import httpx
import openai
import pytest
import torch

from serve_support import FakeEngine, ThreadServer, data_url, user

QUESTION = "Which emotion does the person show?"
ANSWER = "<think>The brows are drawn together.</think><answer>angry</answer>"


@pytest.fixture(scope="module")
def script(omni):
    return omni.tokenizer(ANSWER, add_special_tokens=False).input_ids


def _engine(omni, script):
    return FakeEngine(script, omni.loaded.generation.eos_token_ids[0])


@pytest.fixture(scope="module")
def served(omni, script, clips):
    engine = _engine(omni, script)
    with ThreadServer(omni, engine, allowed_local_media_path=str(clips["mp4"].parent), max_num_seqs=8,
                      max_clip_seconds=2.5, max_request_bytes=1 << 20) as server:
        yield server, engine


def _infers_prompt(omni, path, modal, question=QUESTION, system=None):
    batch = next(iter(omni._media([str(path)], modal, "stretch", 1, "raise")))
    return omni.prompt_embeds(batch.frames, batch.mel, [question], modal, system)[0]


def _eventually(condition, seconds=60.0) -> bool:
    """Whether `condition` holds within `seconds` (generous: a loaded 2-core machine; it returns once it holds)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _ok(client, omni, script, **kw):
    """A request that must succeed with the script's text (the check after every refusal)."""
    r = client.chat.completions.create(model="omni-fast", temperature=0, **kw)
    assert r.choices[0].message.content == omni.tokenizer.decode(script).strip()
    return r


# --- what the engine is given -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["video_audio", "video", "video_muted", "audio", "system"])
def test_the_prompt_is_infers(served, omni, script, clips, case):
    server, engine = served
    clip = clips["mp4_silent" if case == "video" else "mp4"]
    part = ({"type": "audio_url", "audio_url": {"url": data_url(clip)}} if case == "audio" else data_url(clip))
    messages = user(part, text=QUESTION)
    if case == "system":
        messages = [{"role": "system", "content": "You judge emotions."}] + messages
    extra = {"mm_processor_kwargs": {"use_audio_in_video": False}} if case == "video_muted" else {}
    r = _ok(server.client(), omni, script, messages=messages, extra_body=extra)
    modal = {"video_audio": "video_audio", "system": "video_audio", "audio": "audio"}.get(case, "video")
    expected = _infers_prompt(omni, clip, modal, system="You judge emotions." if case == "system" else None)
    given = engine.added[r.id]
    assert torch.equal(given.prompt, expected)
    assert r.usage.prompt_tokens == expected.shape[0]
    p = given.params  # temperature 0 and nothing else: infer's decoding
    assert (p.temperature, p.repetition_penalty, p.max_tokens, p.n, p.stop_token_ids) == (0.0, 1.1, 2048, 1, None)
    assert r.choices[0].emotion == "angry" and r.choices[0].reasoning == "The brows are drawn together."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(script) + 1 and r.usage.total_tokens == expected.shape[0] + len(script) + 1


def test_local_path_and_cache_key(served, omni, script, clips):
    server, engine = served
    client = server.client()
    by_path = _ok(client, omni, script, messages=user(str(clips["mp4"]), text=QUESTION))
    by_url = _ok(client, omni, script, messages=user("file://" + str(clips["mp4"]), text=QUESTION))
    by_data = _ok(client, omni, script, messages=user(data_url(clips["mp4"]), text=QUESTION))
    other_q = _ok(client, omni, script, messages=user(data_url(clips["mp4"]), text="Another question?"))
    keys = [engine.added[r.id].cache_key for r in (by_path, by_url, by_data, other_q)]
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert torch.equal(engine.added[by_path.id].prompt, engine.added[by_data.id].prompt)


def test_no_question_is_infers_default_instruct(served, omni, script, clips):
    from omni_fast.task import DEFAULT_INSTRUCT

    server, engine = served
    r = _ok(server.client(), omni, script, messages=user(data_url(clips["mp4"])))
    assert torch.equal(engine.added[r.id].prompt, _infers_prompt(omni, clips["mp4"], "video_audio", DEFAULT_INSTRUCT))


# --- sampling fields --------------------------------------------------------------------------------------------
def test_defaults_and_overrides_reach_the_engine(served, omni, clips):
    server, engine = served
    client = server.client()
    r = client.chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])))
    p = engine.added[r.id].params  # generation_config.json's defaults
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.7, 20, 0.8, 1.1)
    r = client.chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])), temperature=1.0,
                                       top_p=0.5, seed=4, max_completion_tokens=5,
                                       extra_body={"top_k": 3, "repetition_penalty": 1.0})
    p = engine.added[r.id].params
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed, p.max_tokens) == (1.0, 3, 0.5, 1.0, 4, 5)


def test_n_and_seeds(served, omni, script, clips):
    server, _ = served
    client = server.client()

    def ask(seed):
        r = client.chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])), n=3, seed=seed,
                                           temperature=1.0, max_tokens=6)
        return [c.message.content for c in r.choices], r

    a, r = ask(1)
    assert a == ask(1)[0] and a != ask(2)[0]
    assert len(set(a)) == 3 and [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 18


def test_max_tokens_is_length(served, omni, script, clips):
    server, _ = served
    r = server.client().chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])),
                                                temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == omni.tokenizer.decode(script[:4]).strip()


def test_stop_strings(omni, script, clips):
    engine = FakeEngine(script * 100, omni.loaded.generation.eos_token_ids[0])  # long: it cannot finish first
    with ThreadServer(omni, engine) as server:
        # past the first answer the engine waits (at most a minute) until the server has asked for the abort, so
        # how far it runs does not depend on how quickly the server's threads get the CPU
        asked, original, abort = threading.Event(), engine.token, server.state.loop.abort
        server.state.loop.abort = lambda rid: (abort(rid), asked.set())[0]

        def token(request, sample, position):
            if position >= len(script) and not asked.wait(60):
                asked.set()  # never asked: the engine runs on, and the test fails below instead of hanging
            return original(request, sample, position)

        engine.token = token
        r = server.client().chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])),
                                                    temperature=0, stop=["</think>", "zzz"], max_tokens=3000)
        assert r.choices[0].message.content == "<think>The brows are drawn together."
        assert r.choices[0].finish_reason == "stop" and r.choices[0].emotion is None
        assert r.usage.completion_tokens < len(script)
        # every choice stopped: the engine's request is cut short (its memory freed) without running to its end
        assert _eventually(lambda: r.id in engine.aborted) and r.id not in engine.requests
        assert engine.abort_step[r.id] <= len(script) + 1


def test_logprobs(served, omni, script, clips):
    server, engine = served
    r = server.client().chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])),
                                                temperature=0, logprobs=True, stop="</think>")
    content = r.choices[0].logprobs.content
    k = r.usage.completion_tokens
    assert len(content) == k and r.id not in engine.aborted  # log-probs come with the engine's completion
    assert [t.logprob for t in content] == pytest.approx([-(i + 1) / 8 for i in range(k)])
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)


# --- streaming --------------------------------------------------------------------------------------------------
def _events(server, body, headers=None):
    """Raw server-sent events of one streamed request: (status, [parsed data], raw bytes)."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        raw = b"".join(r.iter_bytes())
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b"" and all(b.startswith(b"data: ") for b in blocks[:-1]), raw[:300]
    data = [b[len(b"data: "):].decode() for b in blocks[:-1]]
    return r.status_code, [d if d == "[DONE]" else json.loads(d) for d in data]


@pytest.mark.parametrize("n, usage", [(1, True), (2, False)])
def test_stream_framing_and_text(served, omni, script, clips, n, usage):
    server, _ = served
    body = {"model": "omni-fast", "messages": user(data_url(clips["mp4"])), "temperature": 0.0 if n == 1 else 1.0,
            "n": n, "seed": 3, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    status, events = _events(server, body)
    plain = server.client().chat.completions.create(**{k: v for k, v in body.items()
                                                       if k not in ("stream", "stream_options")})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["delta"]["role"] for c in chunks[:n]] == ["assistant"] * n
    texts, reasons, emotions = [""] * n, [None] * n, [None] * n
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["delta"].get("content") or ""
            reasons[ch["index"]] = reasons[ch["index"]] or ch["finish_reason"]
            emotions[ch["index"]] = emotions[ch["index"]] or ch.get("emotion")
    assert texts == [c.message.content for c in plain.choices]
    assert reasons == [c.finish_reason for c in plain.choices] and emotions == [c.emotion for c in plain.choices]
    if usage:  # the same clip and question again: the plain request reads its prompt from the prefix cache
        def counts(u):
            return {k: v for k, v in u.items() if k != "prompt_tokens_details"}

        assert chunks[-1]["choices"] == [] and counts(chunks[-1]["usage"]) == counts(plain.usage.model_dump(
            exclude_none=True))
        assert plain.usage.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens
    else:
        assert all(c["usage"] is None for c in chunks)


def test_openai_client_stream(served, omni, script, clips):
    server, _ = served
    stream = server.client().chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])),
                                                     temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == omni.tokenizer.decode(script).strip()


# --- refusals: status, message, and the server answers correctly afterwards ------------------------------------------
def _bad_cases(clips, awkward_clips, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (2 << 20))
    return [
        ({"messages": user({"type": "image_url", "image_url": {"url": "x"}})}, 400, ["messages[0].content[0]",
                                                                                  "unknown part type 'image_url'"]),
        ({"messages": [{"role": "user", "content": "no clip"}]}, 400, ["no video_url, audio_url or input_audio"]),
        ({"messages": user(data_url(clips["mp4"]), data_url(clips["mp4"]))}, 400, ["2 video parts", "at most 1"]),
        ({"messages": user(data_url(clips["mp4"])), "n": 9}, 400, ["n = 9", "--max_num_seqs 8"]),
        ({"messages": user(data_url(clips["mp4"])), "model": "gpt-4"}, 404, ["'gpt-4' does not exist"]),
        ({"messages": user(data_url(clips["mp4"])), "temprature": 0}, 400, ["temprature: unknown field"]),
        ({"messages": user("data:video/mp4;base64,%%%")}, 400, ["messages[0].content[0]", "not valid base64"]),
        ({"messages": user("data:video/mp4;base64,aGVsbG8gd29ybGQ=")}, 400, ["messages[0].content[0]",
                                                                            "cannot be opened as a media file"]),
        ({"messages": user(str(awkward_clips["corrupt"]))}, 400, ["outside --allowed_local_media_path"]),
        ({"messages": user(str(clips["mp4"].parent / ".." / "x.mp4"))}, 400, ["outside"]),
        ({"messages": user("https://example.com/a.mp4")}, 400, ["remote media is off"]),
        ({"messages": user("ftp://example.com/a.mp4")}, 400, ["scheme 'ftp' is not supported"]),
        ({"messages": user(data_url(clips["mp4_wide"]))}, 400, ["3.0 s long", "--max_clip_seconds 2.5"]),
        ({"messages": user(data_url(awkward_clips["truncated"]))}, 400, ["messages[0].content[0]", "truncated"]),
        ({"messages": user({"type": "audio_url", "audio_url": {"url": data_url(clips["mp4_silent"])}})}, 400,
         ["has no audio stream"]),
        ({"messages": user(data_url(clips["mp4"])), "logprobs": True, "top_logprobs": 3}, 400, ["top_logprobs"]),
        ({"messages": user("data:video/mp4;base64," + "A" * (1 << 20))}, 413, ["--max_request_bytes 1048576"]),
    ]


def test_every_bad_input(served, omni, script, clips, awkward_clips, tmp_path):
    server, _ = served
    client = server.client()
    for body, status, words in _bad_cases(clips, awkward_clips, tmp_path):
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "omni-fast", **body}, timeout=60)
        error = r.json()["error"]
        assert r.status_code == status == error["code"], (body.keys(), r.text[:300])
        assert all(w in error["message"] for w in words), error["message"]
        assert "\n" not in error["message"] and "Traceback" not in r.text
        _ok(client, omni, script, messages=user(data_url(clips["mp4"])))


def test_errors_through_the_openai_client(served, clips):
    server, _ = served
    with pytest.raises(openai.BadRequestError, match="unknown part type 'image_url'"):
        server.client().chat.completions.create(model="omni-fast", messages=user(
            {"type": "image_url", "image_url": {"url": "x"}}))
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="other", messages=user(data_url(clips["mp4"])))


def test_a_request_that_fails_inside_fails_alone(served, omni, script, clips):
    server, engine = served
    engine.fail_add = lambda rid, params: RuntimeError(f"scripted failure of {rid}") if params.seed == 666 else None
    client = server.client()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            good = [pool.submit(_ok, client, omni, script, messages=user(data_url(clips["mp4"])), seed=s)
                    for s in (1, 2, 3)]
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])), seed=666)
            for f in good:
                f.result()
    finally:
        engine.fail_add = lambda rid, params: None
    assert e.value.status_code == 500 and "RuntimeError: scripted failure of chatcmpl-" in e.value.message
    _ok(client, omni, script, messages=user(data_url(clips["mp4"])))


def test_a_failing_step_ends_its_requests_and_the_server_goes_on(served, omni, script, clips):
    server, engine = served
    engine.fail_next_step = RuntimeError("CUDA error: device-side assert")
    status, events = _events(server, {"messages": user(data_url(clips["mp4"])), "temperature": 0, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 500 and "device-side assert" in events[-2]["error"]["message"]
    _ok(server.client(), omni, script, messages=user(data_url(clips["mp4"])))


# --- one server each: auth, queue, timeout, disconnect, drain, metrics --------------------------------------------
def test_api_key(omni, script, clips):
    with ThreadServer(omni, _engine(omni, script), api_key="s3cret") as server:
        assert httpx.get(server.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = httpx.get(server.url + path, headers=headers)
                assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
            assert httpx.get(server.url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])))
        assert [m.id for m in server.client("s3cret").models.list()] == ["omni-fast"]
        _ok(server.client("s3cret"), omni, script, messages=user(data_url(clips["mp4"])))


def test_queue_full_is_429_with_retry_after(omni, script, clips):
    engine = _engine(omni, script)
    engine.step_gate.clear()  # the first request is in the engine but has no token yet: it waits
    with ThreadServer(omni, engine, max_queue=1) as server:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(_ok, server.client(), omni, script, messages=user(data_url(clips["mp4"])))
            assert _eventually(lambda: engine.added)
            r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user(data_url(clips["mp4"]))})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "--max_queue 1" in r.json()["error"]["message"]
            engine.step_gate.set()
            first.result()
        _ok(server.client(), omni, script, messages=user(data_url(clips["mp4"])))


def test_timeout_ends_the_request_and_frees_it(omni, script, clips):
    engine = _engine(omni, script)
    engine.step_gate.clear()
    with ThreadServer(omni, engine, request_timeout=5) as server:  # media + encoders take ~0.2 s of it
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            server.client().chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])))
        assert e.value.status_code == 504 and "--request_timeout 5 s" in e.value.message
        assert 5 <= time.monotonic() - t0 < 5 + 30
        (rid,) = engine.added
        engine.step_gate.set()
        assert _eventually(lambda: rid in engine.aborted) and not engine.requests
        _ok(server.client(), omni, script, messages=user(data_url(clips["mp4"])))


def test_a_closed_stream_aborts_its_request(omni, script, clips):
    engine = FakeEngine(script * 200, omni.loaded.generation.eos_token_ids[0])  # long: it cannot finish first
    with ThreadServer(omni, engine) as server:
        body = {"messages": user(data_url(clips["mp4"])), "temperature": 0, "stream": True, "max_tokens": 4000}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while "content" not in next(lines):
                pass
            (rid,) = engine.added
        assert _eventually(lambda: rid in engine.aborted) and not engine.requests  # its memory is free
        assert engine.abort_step[rid] < len(script) * 200
        assert server.state.in_flight == 0
        _ok(server.client(), omni, script[:5], messages=user(data_url(clips["mp4"])), max_tokens=5)


def test_a_client_gone_before_its_answer_frees_its_request(omni, script, clips):
    engine = _engine(omni, script)
    engine.step_gate.clear()  # the answer never comes while the client waits

    async def leave_once_in_the_engine(url):
        async with httpx.AsyncClient(timeout=60) as client:
            call = asyncio.create_task(client.post(url, json={"messages": user(data_url(clips["mp4"]))}))
            for _ in range(3000):  # at most a minute
                if engine.added or call.done():
                    break
                await asyncio.sleep(0.02)
            call.cancel()  # the client goes: its connection is closed
            with contextlib.suppress(asyncio.CancelledError):
                await call

    with ThreadServer(omni, engine) as server:
        asyncio.run(leave_once_in_the_engine(server.url + "/v1/chat/completions"))
        (rid,) = engine.added
        assert _eventually(lambda: server.state.in_flight == 0)  # the server saw the client go
        engine.step_gate.set()  # the step that was running ends; the abort comes right after it
        assert _eventually(lambda: rid in engine.aborted) and not engine.requests
        assert engine.abort_step[rid] == 1
        assert _metric(httpx.get(server.url + "/metrics").text, "omni_fast:requests_total", '{status="499"}') == 1
        _ok(server.client(), omni, script, messages=user(data_url(clips["mp4"])))


def test_sigterm_drains(omni, script, clips):
    engine = _engine(omni, script)
    engine.step_gate.clear()
    server = ThreadServer(omni, engine)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(_events, server, {"messages": user(data_url(clips["mp4"])), "temperature": 0,
                                                    "stream": True})
            assert _eventually(lambda: engine.added)
            server.server.handle_exit(signal.SIGTERM, None)
            assert httpx.get(server.url + "/health").status_code == 503
            r = httpx.post(server.url + "/v1/chat/completions", json={"messages": user(data_url(clips["mp4"]))})
            assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
            assert server.thread.is_alive()  # still serving the running request
            engine.step_gate.set()
            status, events = running.result(timeout=120)
        assert status == 200 and events[-1] == "[DONE]"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"]) == \
            omni.tokenizer.decode(script).strip()
        server.thread.join(10)
        assert not server.thread.is_alive()  # the drain ended the server
    finally:
        server.close()


def _metric(text, name, labels=""):
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_metrics(omni, script, clips):
    with ThreadServer(omni, _engine(omni, script)) as server:
        client = server.client()
        rs = [_ok(client, omni, script, messages=user(data_url(clips["mp4"]))),
              client.chat.completions.create(model="omni-fast", messages=user(data_url(clips["mp4"])), n=2,
                                             max_tokens=3)]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="omni-fast", messages=user({"type": "x"}))
        text = httpx.get(server.url + "/metrics").text
        assert _metric(text, "omni_fast:requests_total", '{status="200"}') == 2
        assert _metric(text, "omni_fast:requests_total", '{status="400"}') == 1
        assert _metric(text, "omni_fast:time_to_first_token_seconds_count") == 2
        assert _metric(text, "omni_fast:e2e_request_latency_seconds_count") == 2
        assert _metric(text, "omni_fast:time_per_output_token_seconds_count") == 2
        assert _metric(text, "omni_fast:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in rs)
        assert _metric(text, "omni_fast:generation_tokens_total") == sum(r.usage.completion_tokens for r in rs) == \
            len(script) + 1 + 6
        for gauge in ("num_requests_waiting", "num_requests_running", "num_rows_running"):
            assert _metric(text, f"omni_fast:{gauge}") == 0
        # the same clip and question twice: the second read its whole prompt from the (scripted) prefix cache
        prompt = rs[0].usage.prompt_tokens
        assert rs[1].usage.prompt_tokens_details.cached_tokens == prompt
        assert _metric(text, "omni_fast:prefix_cache_queries_total") == 2 * prompt
        assert _metric(text, "omni_fast:prefix_cache_hits_total") == prompt


def test_prefix_caching_off(omni, script, clips):
    """--no_enable_prefix_caching: no request carries a cache key, so none reads another's prompt."""
    engine = _engine(omni, script)
    with ThreadServer(omni, engine, enable_prefix_caching=False) as server:
        rs = [_ok(server.client(), omni, script, messages=user(data_url(clips["mp4"]))) for _ in range(2)]
        assert [engine.added[r.id].cache_key for r in rs] == [None, None]
        assert [r.usage.prompt_tokens_details.cached_tokens for r in rs] == [0, 0]
        text = httpx.get(server.url + "/metrics").text
        assert _metric(text, "omni_fast:prefix_cache_queries_total") == 0


def test_gauges_while_running(omni, script, clips):
    engine = _engine(omni, script)
    gate = threading.Event()
    original = engine.token

    def held(request, sample, position):  # the second token waits: the request is running meanwhile
        if position == 1:
            gate.wait(60)
        return original(request, sample, position)

    engine.token = held
    with ThreadServer(omni, engine) as server:
        scraped = []

        def running():
            scraped.append(httpx.get(server.url + "/metrics").text)
            return _metric(scraped[-1], "omni_fast:num_requests_running") == 1

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            f = pool.submit(server.client().chat.completions.create, model="omni-fast",
                            messages=user(data_url(clips["mp4"])), n=3)
            assert _eventually(running)
            text = scraped[-1]
            assert _metric(text, "omni_fast:num_rows_running") == _metric(text, "omni_fast:num_engine_rows") == 3
            assert _metric(text, "omni_fast:num_requests_waiting") == 0
            (r,) = engine.requests.values()  # the scripted engine's blocks: one per 16 prompt rows and per sample
            assert _metric(text, "omni_fast:kv_cache_usage_perc") == (-(-r.prompt.shape[0] // 16) + 3) / 4096
            gate.set()
            f.result()
        text = httpx.get(server.url + "/metrics").text
        assert _metric(text, "omni_fast:num_engine_rows") == _metric(text, "omni_fast:kv_cache_usage_perc") == 0


def test_models_and_health(served):
    server, _ = served
    assert httpx.get(server.url + "/health").status_code == 200
    body = httpx.get(server.url + "/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["omni-fast"]
    assert body["data"][0]["object"] == "model"


def test_concurrent_requests_each_get_their_own(served, omni, script, clips):
    """16 requests at once over different clips and questions: each one's prompt and text are its own."""
    server, engine = served
    client = server.client()
    names = ["mp4", "mp4_silent", "webm", "avi"]
    jobs = [(names[i % 4], f"Question {i}?") for i in range(16)]

    def ask(name, question):
        return client.chat.completions.create(model="omni-fast", messages=user(data_url(clips[name], "video/x"),
                                                                                text=question), temperature=0)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda j: ask(*j), jobs))
    for (name, question), r in zip(jobs, results):
        modal = "video" if name in ("mp4_silent",) else "video_audio"
        expected = _infers_prompt(omni, clips[name], modal, question)
        assert torch.equal(engine.added[r.id].prompt, expected), (name, question)
        assert r.choices[0].message.content == omni.tokenizer.decode(script).strip()


def test_timings(omni, script, clips, monkeypatch):
    """Each stage's seconds, in the response and in the stream's last chunks: the encoders (here slowed by SLOW s)
    count as encode_s only (not as waiting for the loop thread), the engine's steps (20 ms each here) as
    generate_s, and the stages fit in total_s. The bounds leave the unslowed work (about 0.1 s) 20x its time."""
    slow = 0.5
    engine = _engine(omni, script)
    step, embeds = engine.step, omni.feature_embeds
    engine.step = lambda: (time.sleep(0.02), step())[1]
    monkeypatch.setattr(omni, "feature_embeds", lambda *a, **k: (time.sleep(slow), embeds(*a, **k))[1])
    with ThreadServer(omni, engine) as server:
        t0 = time.monotonic()
        r = _ok(server.client(), omni, script, messages=user(data_url(clips["mp4"])))
        elapsed = time.monotonic() - t0
        t = r.model_extra["timings"]
        assert set(t) == {"media_s", "wait_s", "encode_s", "generate_s", "total_s"}
        assert slow <= t["encode_s"] < slow + 2.0 and 0 <= t["wait_s"] < slow
        assert t["generate_s"] >= 0.02 * (len(script) + 1) and t["media_s"] > 0
        assert t["media_s"] + t["wait_s"] + t["encode_s"] + t["generate_s"] <= t["total_s"] <= elapsed
        _, events = _events(server, {"messages": user(data_url(clips["mp4"])), "temperature": 0, "stream": True,
                                     "n": 2, "stream_options": {"include_usage": True}})
        chunks = events[:-1]
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finals) == 2 and all(c["timings"] == finals[0]["timings"] for c in finals)
        assert finals[0]["timings"]["encode_s"] >= slow
        assert all(c["timings"] is None for c in chunks if c not in finals)


def test_cached_tokens(served, omni, script, clips):
    """usage.prompt_tokens_details.cached_tokens: the engine's num_cached_tokens (here the scripted engine's: the whole
    prompt when an earlier request had the same clip, modality, system turn and question)."""
    server, _ = served
    client = server.client()
    question = "Asked twice in test_cached_tokens?"
    first = _ok(client, omni, script, messages=user(data_url(clips["mp4"]), text=question))
    again = _ok(client, omni, script, messages=user(str(clips["mp4"]), text=question))  # the same bytes by path
    other = _ok(client, omni, script, messages=user(data_url(clips["mp4"]), text=question + " No, thrice."))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens == first.usage.prompt_tokens
    assert other.usage.prompt_tokens_details.cached_tokens == 0
