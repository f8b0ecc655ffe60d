"""`omni-fast serve` for real: one server subprocess for the module (tests/serve_support.py ServeProcess, the tiny
checkpoint on 127.0.0.1, the real engine) driven by the real `openai` client. Greedy answers are `omni-fast infer`'s
text for the same clip and question; seeds, n, stop strings and streaming give what they promise; 16 requests at
once each get their one-at-a-time answer; bad input is refused and the next request is answered; a client that
leaves mid-stream gives its rows and KV blocks back; a repeated clip and question hit the caches; SIGTERM lets the
running request finish, then the process exits 0 (the module's last test: it ends the server).

tests/test_serve_app.py covers the same layer in more detail over a scripted engine; this module keeps to what
needs the real engine, within a bounded count of short requests."""
import concurrent.futures
import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from serve_support import ServeProcess, data_url, user

pytestmark = pytest.mark.slow

MAX_TOKENS = 16  # per completion: random tiny weights rarely say EOS, so most answers run to this length
QUESTION = "What is the emotional state of the person in the video?"
MODEL = "tiny"
WAIT_S = 60.0  # the longest wait for the server to show an effect (a loaded 2-core machine)


@pytest.fixture(scope="module")
def media(clips):
    """The clips with an audio track (so `omni-fast infer`'s default modality is theirs too)."""
    return [clips["mp4"], clips["webm"], clips["avi"]]


@pytest.fixture(scope="module")
def infer_run(tiny_ckpt, media):
    """`omni-fast infer` on the clips with QUESTION, started before the server so that both start at once."""
    proc = subprocess.Popen([sys.executable, "-m", "omni_fast.cli", "infer", "--model_path", str(tiny_ckpt),
                             "--video_path", *map(str, media), "--instruct", QUESTION, "--max_new_tokens",
                             str(MAX_TOKENS), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tiny_ckpt, clips, tmp_path_factory, infer_run):
    store = tmp_path_factory.mktemp("tower-cache")
    with ServeProcess("--model_path", tiny_ckpt, "--bert_path", tiny_ckpt / "bert-base-uncased",
                      "--served_model_name", MODEL, "--allowed_local_media_path", clips["mp4"].parent,
                      "--max_num_seqs", 16, "--kv_cache_memory", 64 << 20, "--max_clip_seconds", 2.5,
                      "--tower_cache_dir", store) as s:
        s.store = store
        yield s


@pytest.fixture(scope="module")
def infer_texts(infer_run, media):
    """What `omni-fast infer` prints for each clip with QUESTION (its --json lines: the same text)."""
    out, err = infer_run.communicate(timeout=300)
    assert infer_run.returncode == 0, err[-2000:]
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["video"] for line in lines] == list(map(str, media))
    return [(line["text"], line["finish_reason"]) for line in lines]


def _ask(server, clip, question=QUESTION, **kw):
    kw = {"temperature": 0, "max_tokens": MAX_TOKENS, **kw}
    return server.client().chat.completions.create(model=MODEL, messages=user(clip, text=question), **kw)


def _metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _eventually(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"the server did not show {what} within {WAIT_S:g} s"
        time.sleep(0.05)
    return value


# --- answers --------------------------------------------------------------------------------------------------------
def test_greedy_is_infers_text_plain_and_streamed(server, media, infer_texts):
    for clip, (text, reason) in zip(media, infer_texts):
        plain = _ask(server, str(clip))  # a local path under --allowed_local_media_path
        assert plain.choices[0].message.content == text, clip.name
        assert plain.choices[0].finish_reason == reason
        stream = _ask(server, data_url(clip, "video/x"), stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text, clip.name
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
        usage = chunks[-1].usage
        assert usage.prompt_tokens == plain.usage.prompt_tokens > 900  # text + 392 video + 500 audio embeddings
        assert usage.completion_tokens == plain.usage.completion_tokens


def test_n_and_seeds(server, media):
    def ask(seed):
        r = _ask(server, str(media[0]), n=3, seed=seed, temperature=1.0)
        return [c.message.content for c in r.choices], r

    first, r = ask(7)
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(first)) == 3  # n samples, each its own
    assert 3 <= r.usage.completion_tokens <= 3 * MAX_TOKENS
    assert ask(7)[0] == first  # the same seed: the same samples
    assert ask(8)[0] != first


def test_stop_strings(server, media, infer_texts):
    text, _ = infer_texts[0]
    stop = next(text[i:i + 3] for i in range(len(text) // 2, len(text) - 2)
                if not any(c.isspace() for c in text[i:i + 3]))
    r = _ask(server, str(media[0]), stop=[stop, "never in the text \u2603"])
    assert r.choices[0].message.content == text[:text.find(stop)].strip() and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < _ask(server, str(media[0])).usage.completion_tokens  # cut short


def test_concurrent_requests_each_get_their_one_at_a_time_answer(server, media, clips):
    """16 requests at once over four clips (one silent: the video modality) and four questions, cold; then each
    alone: the same text, the second time read from the prefix cache."""
    jobs = [(clip, f"Question {q}: how does the person feel?") for clip in (*media, clips["mp4_silent"])
            for q in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _ask(server, data_url(job[0], "video/x"), job[1]), jobs))
    alone = [_ask(server, str(clip), question) for clip, question in jobs]
    for job, a, b in zip(jobs, together, alone):
        assert a.choices[0].message.content == b.choices[0].message.content, job
        assert a.usage.prompt_tokens_details.cached_tokens == 0, job  # each clip and question new
        assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens, job
    assert len({r.choices[0].message.content for r in together}) > 1  # the answers depend on the request
    assert {r.usage.prompt_tokens for r in together[-4:]} != {r.usage.prompt_tokens for r in together[:4]}


def test_a_repeated_clip_and_question_hit_the_caches(server, media):
    before = _metrics(server)
    first = _ask(server, data_url(media[1], "video/webm"), "A question asked twice?")
    mid = _metrics(server)
    again = _ask(server, str(media[1]), "A question asked twice?")  # the same bytes, by path
    after = _metrics(server)
    prompt = first.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    assert after["omni_fast:prefix_cache_queries_total"] - before["omni_fast:prefix_cache_queries_total"] == 2 * prompt
    assert after["omni_fast:prefix_cache_hits_total"] - mid["omni_fast:prefix_cache_hits_total"] == prompt
    # the clip's tower features: stored by an earlier test's request, read from --tower_cache_dir both times
    assert after["omni_fast:encoder_cache_queries_total"] - before["omni_fast:encoder_cache_queries_total"] == 2
    assert after["omni_fast:encoder_cache_hits_total"] - before["omni_fast:encoder_cache_hits_total"] == 2
    assert any(server.store.rglob("*")), "nothing was written to --tower_cache_dir"


# --- faults ---------------------------------------------------------------------------------------------------------
def test_bad_input_then_good(server, clips, media, infer_texts, tmp_path):
    client = server.client()
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0" * 500)
    cases = [({"messages": user(data_url(junk))}, 400, "cannot be opened as a media file"),
             ({"messages": user(str(clips["mp4_wide"]))}, 400, "--max_clip_seconds 2.5"),
             ({"messages": user({"type": "image_url", "image_url": {"url": "x"}})}, 400, "unknown part type"),
             ({"messages": user(str(media[0])), "n": 17}, 400, "--max_num_seqs 16")]
    for body, status, words in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, **body)
        assert e.value.status_code == status and words in e.value.message, e.value.message
        assert _ask(server, str(media[0])).choices[0].message.content == infer_texts[0][0]


def test_a_client_gone_mid_stream_frees_its_memory(server, media):
    """Left to run, the request would take minutes (30,000 tokens): the server ends it when its client goes."""
    stream = _ask(server, str(media[2]), "A long answer, please.", stream=True, max_tokens=30000,
                  extra_body={"ignore_eos": True})
    pieces = 0
    for chunk in stream:
        pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        if pieces == 3:
            break
    held = _metrics(server)  # while it streams: a row and its KV blocks
    assert held["omni_fast:num_engine_rows"] == 1 and held["omni_fast:kv_cache_usage_perc"] > 0
    gone = 'omni_fast:requests_total{status="499"}'
    stream.close()
    _eventually(lambda: _metrics(server).get(gone, 0.0) == held.get(gone, 0.0) + 1, "the client's request ended")
    left = _eventually(lambda: (m := _metrics(server))["omni_fast:num_engine_rows"] == 0 and m,
                       "the engine's row freed")
    assert left["omni_fast:kv_cache_usage_perc"] == 0 and left["omni_fast:num_requests_running"] == 0
    assert _ask(server, str(media[0])).choices[0].finish_reason in ("stop", "length")


def test_sigterm_drains_then_exits_0(server, media):
    """The module's last test: it ends the server."""
    tokens = 48
    stream = _ask(server, str(media[0]), "Until the end, please.", stream=True, max_tokens=tokens,
                  extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    chunks = iter(stream)
    first = next(c for c in chunks if c.choices and c.choices[0].delta.content)
    server.proc.send_signal(signal.SIGTERM)
    _eventually(lambda: httpx.get(server.url + "/health", timeout=30).status_code == 503, "503 on /health")
    with pytest.raises(openai.APIStatusError) as e:
        _ask(server, str(media[0]))
    assert e.value.status_code == 503 and "shutting down" in e.value.message
    rest = list(chunks)
    assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
    assert rest[-1].usage.completion_tokens == tokens and first.choices[0].delta.content
    assert server.proc.wait(WAIT_S) == 0
