"""omni_fast.serve.media and inputs.load_clip: where media may come from (data URLs, the allowed directory with no
`..` or symlink escape, allowed domains with size and time limits, no redirects), probing before decoding, and
decoding + preprocessing equal to what `omni-fast infer`'s loader gives for the same clip."""
import base64
import dataclasses
import http.server
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from omni_fast.serve.chat import ChatInput, MediaRef
from omni_fast.serve.config import ServeConfig
from omni_fast.serve.inputs import load_clip
from omni_fast.serve.media import fetch, local_file, probe, scheme, write_inline
from omni_fast.serve.protocol import ServeError


def _refused(fn, *words, status=400):
    with pytest.raises(ServeError) as e:
        fn()
    assert e.value.status == status
    for w in words:
        assert w in e.value.message, e.value.message
    return e.value


def _ref(url=None, kind="video", **kw):
    return MediaRef(kind, "messages[0].content[0]", url=url, **kw)


def test_scheme():
    assert [scheme(u) for u in ("data:video/mp4;base64,AA", "file:///a", "HTTP://x", "https://x/y", "/abs/p",
                                "rel/p", "s3://b/k", "C:/x")] == ["data", "file", "http", "https", "path", "path",
                                                                   "s3", "path"]


# --- inline data ----------------------------------------------------------------------------------------------
def test_data_url_and_input_audio(tmp_path):
    payload = os.urandom(100)
    path = write_inline(_ref("data:video/mp4;base64," + base64.b64encode(payload).decode()), tmp_path)
    assert path.read_bytes() == payload and path.suffix == ".mp4" and path.parent == tmp_path
    path = write_inline(_ref(kind="audio", data=base64.b64encode(payload).decode(), format="wav"), tmp_path)
    assert path.read_bytes() == payload and path.suffix == ".wav"


@pytest.mark.parametrize("url, words", [("data:video/mp4,AAAA", ["data:<mime type>;base64"]),
                                        ("data:video/mp4;base64", ["data:<mime type>;base64"]),
                                        ("data:video/mp4;base64,@@@@", ["not valid base64"]),
                                        ("data:video/mp4;base64,", ["empty"])])
def test_bad_data_urls(tmp_path, url, words):
    _refused(lambda: write_inline(_ref(url), tmp_path), "messages[0].content[0]", *words)


# --- local files ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def omni(omni):
    """The session's model without the encoder cache: these tests decode clips that earlier tests left in the
    session model's cache (where a server finds them without decoding: test_a_stored_clip_is_not_decoded_...)."""
    from omni_fast.api import OmniModel

    return OmniModel(omni.loaded, loader_config=omni.loader_config, encoder_cache_bytes=0)


@pytest.fixture()
def tree(tmp_path):
    root, outside = tmp_path / "media", tmp_path / "secret"
    (root / "sub dir").mkdir(parents=True)
    outside.mkdir()
    (root / "sub dir" / "a b.mp4").write_bytes(b"x")
    (outside / "key.mp4").write_bytes(b"y")
    (root / "inside_link.mp4").symlink_to(root / "sub dir" / "a b.mp4")
    (root / "escape_link.mp4").symlink_to(outside / "key.mp4")
    (root / "escape_dir").symlink_to(outside)
    return root, outside


def test_local_files_inside_the_allowed_directory(tree):
    root, _ = tree
    target = (root / "sub dir" / "a b.mp4").resolve()
    for url in ("sub dir/a b.mp4", str(root / "sub dir" / "a b.mp4"), "file://" + str(root) + "/sub%20dir/a%20b.mp4",
                "file://localhost" + str(root) + "/sub%20dir/a%20b.mp4", "inside_link.mp4",
                "sub dir/../sub dir/a b.mp4"):
        assert local_file(_ref(url), str(root.resolve())) == target, url


@pytest.mark.parametrize("url, words", [
    ("../secret/key.mp4", ["outside --allowed_local_media_path"]),
    ("sub dir/../../secret/key.mp4", ["outside"]),
    ("escape_link.mp4", ["outside"]),  # a symlink inside pointing out
    ("escape_dir/key.mp4", ["outside"]),
    ("SECRET_ABS", ["outside"]),
    ("file://evil.example/etc/passwd", ["file URL host"]),
    ("sub dir", ["no such file"]),
    ("missing.mp4", ["no such file"])])
def test_local_files_never_escape(tree, url, words):
    root, outside = tree
    url = url.replace("SECRET_ABS", str(outside / "key.mp4"))
    _refused(lambda: local_file(_ref(url), str(root.resolve())), "messages[0].content[0]", *words)


def test_local_files_need_the_flag(tree):
    root, _ = tree
    _refused(lambda: local_file(_ref(str(root / "sub dir" / "a b.mp4")), None), "--allowed_local_media_path DIR")


# --- remote files ---------------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/clip.mp4":
            body = self.server.payload
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/clip.mp4")
            self.end_headers()
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(3)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.payload = os.urandom(5000)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _fetch(url, config, seconds=30.0):
    import asyncio

    return asyncio.run(fetch(_ref(url), config, time.monotonic() + seconds))


def test_fetch_from_an_allowed_domain(web):
    server, base = web
    assert _fetch(base + "/clip.mp4", ServeConfig(allowed_media_domains=("127.0.0.1",))) == server.payload


@pytest.mark.parametrize("path, config, words", [
    ("/clip.mp4", ServeConfig(), ["remote media is off"]),
    ("/clip.mp4", ServeConfig(allowed_media_domains=("example.com",)), ["'127.0.0.1' is not in"]),
    ("/moved", ServeConfig(allowed_media_domains=("127.0.0.1",)), ["HTTP 302", "redirects are not followed"]),
    ("/nothing", ServeConfig(allowed_media_domains=("127.0.0.1",)), ["HTTP 404"]),
    ("/clip.mp4", ServeConfig(allowed_media_domains=("127.0.0.1",), max_request_bytes=4096), ["exceeds", "4096"]),
    ("/slow", ServeConfig(allowed_media_domains=("127.0.0.1",), fetch_timeout=0.5), ["took longer than 0.5 s"])])
def test_fetch_refusals(web, path, config, words):
    _, base = web
    t0 = time.monotonic()
    _refused(lambda: _fetch(base + path, config), "messages[0].content[0]", *words)
    assert time.monotonic() - t0 < 2.5  # the slow server is cut off at the timeout


def test_fetch_within_what_is_left_of_the_request(web):
    _, base = web
    _refused(lambda: _fetch(base + "/slow", ServeConfig(allowed_media_domains=("127.0.0.1",)), seconds=0.3),
             "took longer than 0.3 s")


def test_config_checks_domains_and_the_directory(tmp_path):
    from omni_fast.config import ConfigError

    assert ServeConfig(allowed_media_domains=("Example.COM.",)).allowed_media_domains == ("example.com",)
    for bad in ("http://example.com", "example.com:80", "a/b"):
        with pytest.raises(ConfigError, match="--allowed_media_domains"):
            ServeConfig(allowed_media_domains=(bad,))
    with pytest.raises(ConfigError, match="--allowed_local_media_path"):
        ServeConfig(allowed_local_media_path=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="--max_queue"):
        ServeConfig(max_queue=0)


# --- probing --------------------------------------------------------------------------------------------------
def test_probe(clips, awkward_clips):
    p = probe(_ref(), clips["mp4"], 60)
    assert p.has_video and p.has_audio and abs(p.seconds - 2.0) < 0.1
    assert not probe(_ref(), clips["mp4_silent"], 60).has_audio
    assert probe(_ref(kind="audio"), awkward_clips["audio_only"], 60).has_audio
    _refused(lambda: probe(_ref(), awkward_clips["audio_only"], 60), "has no video stream")
    _refused(lambda: probe(_ref(kind="audio"), clips["mp4_silent"], 60), "has no audio stream")
    _refused(lambda: probe(_ref(), awkward_clips["corrupt"], 60), "cannot be opened as a media file")
    _refused(lambda: probe(_ref(), clips["mp4_wide"], 2.5), "3.0 s long", "--max_clip_seconds 2.5")


# --- decoding as infer decodes --------------------------------------------------------------------------------
def _config(root):
    return ServeConfig(allowed_local_media_path=str(root))


def _loader_batch(omni, path, modal):
    return next(iter(omni._media([str(path)], modal, "stretch", 1, "raise")))


def _loaded(omni, chat, root, fetched=None):
    """load_clip, its temporary files removed (as prepare does once the prompt is built)."""
    clip = load_clip(omni, chat, fetched or {}, _config(root))
    clip.close()
    return clip


@pytest.mark.parametrize("parts, modal", [("video", "video_audio"), ("silent", "video"), ("audio", "audio"),
                                          ("video_no_track", "video")])
def test_clips_decode_as_infers_loader(omni, clips, parts, modal):
    path = clips["mp4_silent" if parts == "silent" else "mp4"]
    ref = _ref(str(path), kind="audio" if parts == "audio" else "video")
    chat = ChatInput(question="q", system=None, video=ref if ref.kind == "video" else None,
                     audio=ref if ref.kind == "audio" else None, use_audio_in_video=parts != "video_no_track")
    clip = _loaded(omni, chat, path.parent)
    assert clip.modal == modal and clip.ready and clip.found is None
    assert clip.cache_key == omni.prefix_key(str(path), "q", modal, "stretch")  # infer's key for the same clip
    batch = _loader_batch(omni, path, modal)
    assert (clip.frames is None) == (modal == "audio") and (clip.mel is None) == (modal == "video")
    if clip.frames is not None:
        assert torch.equal(clip.frames, batch.frames)
    if clip.mel is not None:
        assert torch.equal(clip.mel, batch.mel)


def test_separate_audio_part_is_the_clips_audio(omni, awkward_clips, clips, tmp_path):
    """video_url + audio_url: the loader's record with a separate audio file gives the same tensors and key."""
    video, audio = awkward_clips["vp9"], awkward_clips["vp9_wav"]
    chat = ChatInput(question="q", system="s", video=_ref(str(video)), audio=_ref(str(audio), kind="audio"))
    clip = _loaded(omni, chat, Path(video).parent)
    record = type("R", (), {"video": str(video), "audio": str(audio)})()
    batch = next(iter(omni._media([record], "video_audio", "stretch", 1, "raise")))
    assert clip.modal == "video_audio"
    assert torch.equal(clip.frames, batch.frames) and torch.equal(clip.mel, batch.mel)
    assert clip.cache_key == omni.prefix_key(record, "q", "video_audio", "stretch", "s")
    assert clip.cache_key != omni.prefix_key(str(video), "q", "video_audio", "stretch", "s")


def test_same_bytes_same_key_and_no_files_left(omni, clips, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = clips["mp4"]
    data = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    chat = ChatInput(question="q", system=None, video=_ref(data), audio=None)
    by_data = load_clip(omni, chat, {}, _config(path.parent))
    assert len(list(tmp_path.iterdir())) == 1  # the data's file lives until the prompt is built
    by_data.close()
    by_path = _loaded(omni, dataclasses.replace(chat, video=_ref(str(path))), path.parent)
    by_fetch = _loaded(omni, dataclasses.replace(chat, video=_ref("http://h/x.mp4")), path.parent,
                       {"video": path.read_bytes()})
    assert by_data.cache_key == by_path.cache_key == by_fetch.cache_key
    assert torch.equal(by_data.frames, by_path.frames) and torch.equal(by_data.mel, by_fetch.mel)
    muted = _loaded(omni, dataclasses.replace(chat, use_audio_in_video=False), path.parent)
    other = _loaded(omni, dataclasses.replace(chat, question="another"), path.parent)
    system = _loaded(omni, dataclasses.replace(chat, system="a system turn"), path.parent)
    assert muted.modal == "video" and len({by_data.cache_key, muted.cache_key, other.cache_key,
                                           system.cache_key}) == 4
    off = load_clip(omni, chat, {}, ServeConfig(allowed_local_media_path=str(path.parent),
                                                enable_prefix_caching=False))
    off.close()
    assert off.cache_key is None
    assert list(tmp_path.iterdir()) == []  # the request's temporary files are gone


def test_a_refused_part_leaves_no_files(omni, clips, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = "data:video/mp4;base64," + base64.b64encode(clips["mp4_wide"].read_bytes()).decode()
    chat = ChatInput(question="q", system=None, video=_ref(data), audio=None)
    config = ServeConfig(max_clip_seconds=2.5)
    _refused(lambda: load_clip(omni, chat, {}, config), "--max_clip_seconds 2.5")
    assert list(tmp_path.iterdir()) == []


def test_undecodable_and_too_long_parts(omni, clips, awkward_clips, tmp_path):
    wav = awkward_clips["audio_only"]
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF" + os.urandom(200))
    for ref, words in ((_ref(str(junk), kind="audio"), ["cannot be opened as a media file"]),
                       (_ref("s3://bucket/clip.mp4"), ["scheme 's3' is not supported"]),
                       (_ref(str(awkward_clips["truncated"])), ["truncated"])):
        chat = ChatInput(question="q", system=None, video=ref if ref.kind == "video" else None,
                         audio=ref if ref.kind == "audio" else None)
        root = Path(ref.url).parent if ref.url.startswith("/") else tmp_path
        _refused(lambda: load_clip(omni, chat, {}, _config(root)), "messages[0].content[0]", *words)
    chat = ChatInput(question="q", system=None, video=None, audio=_ref(str(wav), kind="audio"))
    _refused(lambda: load_clip(omni, chat, {}, ServeConfig(allowed_local_media_path=str(wav.parent),
                                                           max_clip_seconds=0.2)), "--max_clip_seconds 0.2")


@pytest.mark.parametrize("name, modal", [("mp4", "video_audio"), ("mp4_silent", "video")])
def test_a_stored_clip_is_not_decoded_and_gives_the_same_prompt(omni, clips, tmp_path, name, modal):
    """With a tower-feature store (serve --tower_cache_dir), a clip seen before is found there before decoding,
    or, when another request stored it after this one was decoded, when its prompt is built; either way its prompt
    is the one the towers gave."""
    from omni_fast.api import OmniModel
    from omni_fast.config import EngineConfig, SamplingParams
    from omni_fast.serve.inputs import prepare

    model = OmniModel(omni.loaded, EngineConfig(kv_cache_memory=1 << 20), tower_cache_dir=tmp_path / "store")
    path = clips[name]
    chat = ChatInput(question="q", system=None, video=_ref(str(path)), audio=None)

    def built(clip):
        return prepare(model, clip, chat, SamplingParams(max_tokens=4), "r").prompt

    first, second = (load_clip(model, chat, {}, _config(path.parent)) for _ in range(2))  # both decoded
    assert (first.found, second.found, first.modal) == (None, None, modal)
    prompts = [built(first), built(second)]  # the first stores the clip's features, the second reads them
    third = load_clip(model, chat, {}, _config(path.parent))
    assert third.found is not None and third.media is None  # found before decoding
    prompts.append(built(third))
    batch = _loader_batch(omni, path, modal)
    expected = omni.prompt_embeds(batch.frames, batch.mel, ["q"], modal)[0]
    assert all(torch.equal(p, expected) for p in prompts)


class _CountingLock:
    """threading.Lock that counts how often it was taken (Decoding's lock: each caller takes it to look)."""

    def __init__(self):
        self.lock, self.taken = threading.Lock(), 0

    def __enter__(self):
        self.lock.acquire()
        self.taken += 1

    def __exit__(self, *exc):
        self.lock.release()


@pytest.mark.parametrize("first_fails", [False, True])
def test_a_clip_being_decoded_is_decoded_once(first_fails):
    """A second request for a clip the first is decoding takes the first's result; when the first fails, the
    second decodes for itself (its own error would name its own part)."""
    from omni_fast.serve.inputs import Decoding

    decoding = Decoding()
    decoding._lock = _CountingLock()
    calls = []

    def first():
        calls.append("first")
        deadline = time.monotonic() + 60
        while decoding._lock.taken < 2:  # until the second request has looked (and found this one running)
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if first_fails:
            raise ServeError(400, "messages[0].content[0]: cannot be opened as a media file")
        return "first's frames"

    def second():
        calls.append("second")
        return "second's frames"

    results = {}

    def run(name, fn):
        try:
            results[name] = decoding.once(("hash", "video_audio"), fn)
        except ServeError as e:
            results[name] = e

    a = threading.Thread(target=run, args=("a", first))
    a.start()
    while not calls:
        time.sleep(0.005)
    b = threading.Thread(target=run, args=("b", second))
    b.start()
    a.join(60), b.join(60)
    if first_fails:
        assert isinstance(results["a"], ServeError) and results["b"] == "second's frames"
        assert calls == ["first", "second"] and decoding.shared == 0
    else:
        assert results == {"a": "first's frames", "b": "first's frames"}
        assert calls == ["first"] and decoding.shared == 1
    assert decoding.once(("hash", "video_audio"), second) == "second's frames"  # done: no longer shared
    assert decoding.once(None, second) == "second's frames" and decoding._running == {}
