"""The page at /ui (omni_fast.serve.ui) in headless Chromium: on a server in this process over the scripted engine
(tests/serve_support.py: every token known, the engine held still where a test needs it), and on a real
`omni-fast serve --ui` subprocess, whose answer on the page must be the API's for the same clip and question.
The login that guards the page under --api_key is checked route by route without a browser too."""
import concurrent.futures
from collections import Counter
import subprocess
import sys
import threading
import time

import httpx
import pytest

from browser_support import Page, require, start_chromium
from omni_fast.serve.page import NO_ANSWER, agreement_line, error_line, label_note
from omni_fast.task import DEFAULT_INSTRUCT
from serve_support import (ANSWER, ServeProcess, ThreadServer, answer_script, data_url, scripted_engine,
                           user)

KEY = "k3y"
HOLD_S = 60.0  # the longest the scripted engine is held still


@pytest.fixture(scope="module")
def script(omni):
    return answer_script(omni)


@pytest.fixture(scope="module")
def samples(clips):
    from omni_fast.serve.ui import Sample

    return [Sample("a clip", str(clips["mp4"])), Sample("a silent clip", str(clips["mp4_silent"]))]


@pytest.fixture(scope="module")
def served(omni, script, samples):
    require(False, "gradio")
    engine = scripted_engine(omni, script)
    with ThreadServer(omni, engine, samples=samples, ui=True, api_key=KEY, max_queue=1, max_clip_seconds=2.5,
                      max_num_seqs=4) as server:
        yield server, engine


@pytest.fixture(scope="module")
def chromium():
    require(True, "gradio")
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def page(served, chromium):
    server, _ = served
    p = Page(chromium, server.url)
    if p.open() == "login":
        p.login("anyone", KEY)
        assert p.wait(lambda: p.open() == "page", "the page after logging in")
    return p


# --- the login in front of the page, route by route -----------------------------------------------------------------
def test_the_page_is_closed_without_the_api_key(served, samples):
    server, _ = served
    url = server.url + "/ui"
    closed = [httpx.get(url + "/config"), httpx.get(url + "/gradio_api/info"),
              httpx.get(url + f"/gradio_api/file={samples[0].video}"),
              httpx.post(url + "/gradio_api/upload", files={"files": ("a.mp4", b"x" * 10)}),
              httpx.post(url + "/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "s"})]
    assert [r.status_code for r in closed] == [401] * 5
    html = httpx.get(url + "/").text  # the login form, not the page
    assert "auth_required" in html and "API key as the password" in html and "reasoning" not in html
    wrong = httpx.post(url + "/login", data={"username": "anyone", "password": "wrong"})
    assert wrong.status_code == 400
    with httpx.Client() as client:
        assert client.post(url + "/login", data={"username": "anyone", "password": KEY}).status_code == 200
        assert client.get(url + "/config").status_code == 200
        assert "reasoning" in client.get(url + "/").text
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API's own auth is untouched
    assert httpx.get(server.url + "/health").status_code == 200


def test_without_a_key_the_page_is_open(omni, script):
    require(False, "gradio")
    engine = scripted_engine(omni, script)
    with ThreadServer(omni, engine, ui=True) as server:
        assert httpx.get(server.url + "/ui/config").status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
        home = httpx.get(server.url + "/")  # the server's root leads to the page
        assert home.status_code == 307 and home.headers["location"] == "/ui/"
    with ThreadServer(omni, engine) as server:  # without --ui: no page
        assert httpx.get(server.url + "/ui/").status_code == 404 and httpx.get(server.url + "/").status_code == 404


# --- in the browser, over the scripted engine -----------------------------------------------------------------------
def test_login_form(served, chromium):
    server, _ = served
    chromium.delete_all_cookies()
    p = Page(chromium, server.url)
    assert p.open() == "login"
    p.login("anyone", "wrong")
    assert "Incorrect Credentials" in p.login_error()
    assert p.open() == "login"
    p.login("anyone", KEY)
    p.wait(lambda: p.open() == "page", "the page after logging in")


def test_the_reasoning_streams_then_the_emotion_appears(page, served, omni, script):
    server, engine = served
    gate, original = threading.Event(), engine.token
    held_at = 8

    def held(request, sample, position):  # the engine stops after 8 tokens until the test has looked
        if position == held_at:
            gate.wait(HOLD_S)
        return original(request, sample, position)

    engine.token = held
    try:
        assert page.pick_sample(0) == "a clip"
        page.recognize()
        partial = page.wait(lambda: page.reasoning(), "the first streamed tokens")
        time.sleep(0.3)  # what the page shows while the engine is held
        partial = page.reasoning()
        assert partial and ANSWER.startswith(partial) and len(partial) < len(ANSWER)
        assert omni.tokenizer.decode(script[:held_at]).startswith(partial)
        assert page.emotion() == "" and page.timings() == ""
    finally:
        gate.set()
        engine.token = original
    page.wait_done()
    assert page.reasoning() == ANSWER and page.error() == ""
    assert page.emotion() == "angry"
    assert page.note().startswith("In MAFW's label set (11 labels: happy, sad, neutral, angry")
    assert page.timings().startswith("media ") and "generation" in page.timings()
    assert page.answers() == []  # n = 1: no table
    page.screenshot("ui_scripted")


def test_stop_aborts_the_request(page, served, script):
    """Stop cancels the page's event; its API request goes with it: the engine aborts it (its memory freed) before
    it finishes."""
    server, engine = served
    gate, original = threading.Event(), engine.token
    engine.token = lambda request, sample, position: (position != 4 or gate.wait(HOLD_S),
                                                      original(request, sample, position))[1]
    before = set(engine.added)
    try:
        page.pick_sample(0)
        page.recognize()
        page.wait(lambda: page.reasoning(), "the first streamed tokens")
        (rid,) = set(engine.added) - before
        page.driver.find_element("css selector", "#stop").click()
        page.wait(lambda: server.state.in_flight == 0, "the server to see the page's request go")
    finally:
        gate.set()
        engine.token = original
    page.wait(lambda: rid in engine.aborted, "the engine aborting the request")
    assert rid not in engine.requests and len(engine.added[rid].ids[0]) < len(script), engine.added[rid].ids
    # no result and no error line of ours; Gradio may leave its own status word in the cancelled output box
    # (seen once as "Error" under a loaded CI machine), which is not a result
    assert not page.timings().startswith("media ") and (page.emotion(), page.error()) == ("", "")


def test_n_answers_and_their_agreement(page, served, clips):
    server, _ = served
    page.pick_sample(0)
    page.set_number("temperature", 1)
    page.set_number("n", 3)
    page.set_number("seed", 7)
    page.recognize()
    page.wait_done()
    api = server.client(KEY).chat.completions.create(
        model="omni-fast", messages=user(data_url(clips["mp4"]), text=DEFAULT_INSTRUCT), temperature=1.0, n=3,
        seed=7)
    emotions = [c.emotion for c in api.choices]
    rows = page.answers()
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert [r[1] or None for r in rows] == emotions
    assert page.reasoning() == api.choices[0].message.content
    assert page.note().startswith(agreement_line(emotions))
    assert page.emotion() == Counter(e or NO_ANSWER for e in emotions).most_common(1)[0][0]


def test_errors_are_one_line(page, served, clips, omni, script, monkeypatch):
    server, engine = served
    import omni_fast.serve.ui as ui

    async def broken(*args, **kwargs):  # a fault in the page's own code: one line, never a trace
        raise RuntimeError("the page's own\nfault")
        yield

    monkeypatch.setattr(ui, "stream_answer", broken)
    page.pick_sample(0)
    page.recognize()
    page.wait_done()
    assert page.error() == "Error: RuntimeError: the page's own fault"
    monkeypatch.undo()

    page.open()  # a fresh page for each case: the last one's line stays until the next answer clears it

    page.upload_video(clips["mp4_wide"])  # 3.0 s; the server takes 2.5 s
    page.recognize()
    page.wait_done()
    assert page.error() == "Error 400: the video: the clip is 3.0 s long; the limit is --max_clip_seconds 2.5"
    assert page.reasoning() == "" and page.emotion() == ""

    engine.step_gate.clear()  # an API request waits in the engine: the queue (--max_queue 1) is full
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(server.client(KEY).chat.completions.create, model="omni-fast",
                            messages=user(data_url(clips["mp4"])), temperature=0)
        try:
            page.wait(lambda: server.state.waiting == 1, "an API request waiting")
            page.open()
            page.pick_sample(0)
            page.recognize()
            page.wait_done()
            assert page.error() == ("Error 429: the server's queue is full (--max_queue 1 requests waiting); "
                                    "retry later")
        finally:
            engine.step_gate.set()
        assert first.result().choices[0].emotion == "angry"
    assert "Traceback" not in page.driver.page_source


# --- in the browser, on `omni-fast serve --ui` ----------------------------------------------------------------------
@pytest.mark.slow
def test_the_page_on_omni_fast_serve(tiny_ckpt, chromium, tmp_path):
    """Upload a clip, wait for the streamed reasoning: the emotion (and the text) shown are the API's for the same
    clip and question, and the page and the API share the engine's prefix cache; an undecodable upload shows its
    one-line error; the page is saved as test-artifacts/ui_page.png (and ui_error.png)."""
    from omni_fast.testing import make_clip

    clip = make_clip(tmp_path / "clip.mp4", seconds=2.0, size=(160, 120), seed=5)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    max_tokens = 32
    with ServeProcess("--model_path", tiny_ckpt, "--bert_path", tiny_ckpt / "bert-base-uncased", "--ui",
                      "--served_model_name", "tiny-r1-omni") as server:
        page = Page(chromium, server.url)
        assert page.open() == "page"
        assert len(page.sample_names()) == 3  # the bundled sample clips
        page.upload_video(clip)
        page.set_number("max-tokens", max_tokens)
        page.recognize()
        page.wait(lambda: page.reasoning(), "the streamed reasoning")
        page.wait_done()
        assert page.error() == "", page.error()
        api = server.client().chat.completions.create(
            model="tiny-r1-omni", messages=user(data_url(clip), text=DEFAULT_INSTRUCT), temperature=0,
            max_tokens=max_tokens)
        choice = api.choices[0]
        assert page.reasoning() == choice.message.content
        assert page.emotion() == (choice.emotion or NO_ANSWER)
        assert page.note() == label_note([choice.emotion], "mafw")
        prompt = api.usage.prompt_tokens
        assert page.timings().startswith("media ") and page.timings().endswith(f"prefix cache: 0 of {prompt} prompt "
                                                                                 "positions")
        # the page and the API share the engine: the API's request read the page's prompt from the prefix cache,
        # and the page's next one reads it too
        assert api.usage.prompt_tokens_details.cached_tokens == prompt
        page.recognize()
        page.wait(lambda: page.timings().endswith(f"prefix cache: {prompt} of {prompt} prompt positions"),
                  "the second answer, its prompt from the prefix cache")
        assert page.reasoning() == choice.message.content
        page.screenshot("ui_page")

        page.open()
        page.upload_video(bad)
        page.recognize()
        page.wait_done()
        refused = httpx.post(server.url + "/v1/chat/completions", json={"messages": user(data_url(bad))}, timeout=60)
        assert refused.status_code == 400
        line = error_line(400, refused.json()["error"]["message"], {"messages[0].content[0]": "the video"})
        assert page.error() == line == "Error 400: the video: cannot be opened as a media file (InvalidDataError)"
        assert "Traceback" not in page.driver.page_source
        page.screenshot("ui_error")


@pytest.mark.slow
def test_demo_serve():
    """`omni-fast demo --serve`: the tiny checkpoint served with the page on; SIGTERM ends it with status 0."""
    require(False, "gradio")
    with ServeProcess(command=("demo", "--serve")) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        config = httpx.get(server.url + "/ui/config").json()
        samples = next(c for c in config["components"] if c["props"].get("label") == "Sample clips")
        assert len(samples["props"]["samples"]) == 3
        models = httpx.get(server.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny-r1-omni"]  # the demo's checkpoint
    assert server.close() == 0


def test_serve_ui_without_gradio_is_a_one_line_error(tiny_ckpt):
    """--ui without the `ui` extra: a one-line error naming the extra, before the model loads."""
    code = ("import sys, importlib.util; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'gradio' else real(n, *a); "
            "from omni_fast.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "serve", "--model_path", str(tiny_ckpt), "--ui"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ('omni-fast serve: error: --ui needs Gradio: pip install -e ".[ui]" '
                                                 "(the `ui` extra)")
