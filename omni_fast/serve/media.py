"""A request's media parts -> local files -> probed -> decoded, with the rules of what may be read.

Where a part's media may come from:
  data:<mime>;base64,<bytes>      always (its size is bounded by --max_request_bytes, checked on the body)
  input_audio {data, format}      always (base64 bytes, likewise)
  file:///abs/path, /abs/path,    only with --allowed_local_media_path DIR, and only a regular file whose real
  or a path relative to DIR       path (every `..` and symlink resolved) lies inside DIR's real path
  http(s)://host/...              only when host is one of --allowed_media_domains; fetched without following
                                  redirects, within --max_request_bytes and the fetch timeout
Anything else (another scheme, a local path without the flag) is a 400 naming the part.

The functions here that read files or decode are synchronous and run in the server's worker pool, never on the
event loop; `fetch` is the one coroutine (httpx's async client). Decoding takes the same PyAV steps as
`omni-fast infer`'s loader (omni_fast.media.pyav: the reference's frame indices, RGB conversion and audio), and
`preprocess` the same preprocessing (stretched frames, Whisper log-mel) on the model's device.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import mimetypes
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from omni_fast.media.audio import SAMPLE_RATE, log_mel
from omni_fast.media.frames import preprocess_frames
from omni_fast.media.pyav import MediaError, decode_audio, load_audio, sample_video
from omni_fast.serve.chat import MediaRef
from omni_fast.serve.config import ServeConfig
from omni_fast.serve.limits import check_clip_seconds
from omni_fast.serve.protocol import ServeError


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")  # RFC 3986
ASPECT = "stretch"  # frames as the reference inference (and `omni-fast infer`) preprocesses them


def _bad(ref: MediaRef, message: str) -> ServeError:
    return ServeError(400, f"{ref.where}: {message}", ref.where)


def scheme(url: str) -> str:
    """"data", "file", "http", "https", or "path" (no scheme); another scheme is returned as written."""
    if url.startswith("data:"):
        return "data"
    head, sep, _ = url.partition("://")
    return head.lower() if sep and _SCHEME.fullmatch(head) else "path"


# --- where the bytes come from ------------------------------------------------------------------------------------
def _decode_base64(ref: MediaRef, data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(ref, "the data is not valid base64") from None


def write_inline(ref: MediaRef, workdir: Path) -> Path:
    """A data: URL or input_audio part -> its bytes in a file under workdir."""
    if ref.url is None:
        data, suffix = ref.data or "", "." + (ref.format or "bin").lower().lstrip(".")
    else:
        header, comma, data = ref.url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise _bad(ref, "a data URL must be data:<mime type>;base64,<data>")
        suffix = mimetypes.guess_extension(header[5:-7].split(";")[0].strip()) or ".bin"
    payload = _decode_base64(ref, data)
    if not payload:
        raise _bad(ref, "the data is empty")
    path = workdir / f"{ref.kind}{suffix}"
    path.write_bytes(payload)
    return path


def local_file(ref: MediaRef, root: str | None) -> Path:
    """A file:// URL or a path -> the real path of a regular file inside `root` (--allowed_local_media_path)."""
    if root is None:
        raise _bad(ref, "local files are not served (start the server with --allowed_local_media_path DIR)")
    url = ref.url or ""
    if scheme(url) == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise _bad(ref, f"file URL host {parsed.netloc!r}: only file:///path or file://localhost/path")
        url = unquote(parsed.path)
    base = Path(root)
    path = (base / url).resolve()  # an absolute url replaces base; symlinks and .. are resolved
    if not path.is_relative_to(base):
        raise _bad(ref, "the path is outside --allowed_local_media_path")
    if not path.is_file():
        raise _bad(ref, "no such file under --allowed_local_media_path")
    return path


async def fetch(ref: MediaRef, config: ServeConfig, deadline: float) -> bytes:
    """An http(s) URL on an allowed domain -> its bytes, within the size limit and the fetch timeout (or what is
    left of the request's)."""
    import httpx

    url = ref.url or ""
    host = (urlparse(url).hostname or "").lower()
    if not config.allowed_media_domains:
        raise _bad(ref, "remote media is off (start the server with --allowed_media_domains HOST ...)")
    if host not in config.allowed_media_domains:
        raise _bad(ref, f"host {host!r} is not in --allowed_media_domains")
    timeout = max(0.0, min(config.fetch_timeout, deadline - time.monotonic()))
    limit, body = config.max_request_bytes, bytearray()
    try:
        async with asyncio.timeout(timeout):
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise _bad(ref, f"fetching {url} gave HTTP {response.status_code} (redirects are not followed)")
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > limit:
                            raise _bad(ref, f"the file at {url} exceeds --max_request_bytes {limit}")
    except TimeoutError:
        raise _bad(ref, f"fetching {url} took longer than {timeout:.1f} s") from None
    except httpx.HTTPError as e:
        raise _bad(ref, f"fetching {url} failed ({type(e).__name__}: {e})") from None
    if not body:
        raise _bad(ref, f"the file at {url} is empty")
    return bytes(body)


def write_fetched(ref: MediaRef, payload: bytes, workdir: Path) -> Path:
    """Fetched bytes -> a file under workdir (named by the URL's suffix; FFmpeg reads the content either way)."""
    path = workdir / f"{ref.kind}{Path(urlparse(ref.url or '').path).suffix[:8] or '.bin'}"
    path.write_bytes(payload)
    return path


# --- probing (container headers only) ----------------------------------------------------------------------------
@dataclass(slots=True)
class Probe:
    seconds: float  # the longest stream's length (from the header, else from packet times)
    has_video: bool
    has_audio: bool


def _packet_seconds(container, stop_after: float) -> float:
    """Length from demuxed packet times (no decoding), for containers whose header gives none; stops counting once
    past `stop_after`."""
    end = 0.0
    for packet in container.demux():
        if packet.pts is not None and packet.time_base is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            if end > stop_after:
                break
    return end


def probe(ref: MediaRef, path: Path, max_seconds: float) -> Probe:
    """Streams and length of a media file from its container (nothing decoded); a 400 naming the part when it
    is not a media file, lacks the stream the part needs, or is longer than max_seconds."""
    import av

    try:
        with av.open(str(path)) as container:
            video, audio = bool(container.streams.video), bool(container.streams.audio)
            if container.duration:
                seconds = container.duration / av.time_base
            else:
                seconds = _packet_seconds(container, max_seconds)
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as e:
        raise _bad(ref, f"cannot be opened as a media file ({type(e).__name__})") from None
    if ref.kind == "video" and not video:
        raise _bad(ref, "has no video stream (send audio as an audio_url or input_audio part)")
    if ref.kind == "audio" and not audio:
        raise _bad(ref, "has no audio stream")
    check_clip_seconds(seconds, max_seconds, ref.where)
    return Probe(seconds=seconds, has_video=video, has_audio=audio)


# --- decoding and preprocessing ----------------------------------------------------------------------------------
@dataclass(slots=True)
class DecodedMedia:
    frames: list[np.ndarray] | None  # the sampled RGB frames (H, W, 3) uint8; None for audio alone
    samples: np.ndarray | None  # 16 kHz mono float32; None when the modality is video
    audio_fallback: bool  # the video's own track had no decodable audio: silence, as `omni-fast infer` uses


def _media_error(ref: MediaRef, path: Path, e: MediaError) -> ServeError:
    return _bad(ref, str(e).replace(str(path), "the clip"))


def decode(video: tuple[MediaRef, Path] | None, audio: tuple[MediaRef, Path] | None, modal: str,
           num_frames: int, max_seconds: float) -> DecodedMedia:
    """The parts' files -> frames and samples as `omni-fast infer` decodes them: the reference's frame sampling;
    the audio of a separate part (a 400 when none of it decodes), else the video's own track (silence with a log
    line when it does not decode, as infer)."""
    frames = samples = None
    fallback = False
    if audio is not None:
        samples = decode_audio(audio[1])
        if samples is None:
            raise _bad(audio[0], "no audio could be decoded")
    elif modal == "video_audio":
        samples, fallback = load_audio(video[1])
    if samples is not None:
        check_clip_seconds(samples.size / SAMPLE_RATE, max_seconds, (audio or video)[0].where)
    if video is not None:
        try:
            frames, _, _ = sample_video(video[1], num_frames)
        except MediaError as e:
            raise _media_error(video[0], video[1], e) from None
    return DecodedMedia(frames=frames, samples=samples if modal != "video" else None, audio_fallback=fallback)


def preprocess(media: DecodedMedia, n_mels: int,
               device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> (frames (1, T, 3, 224, 224), mel (1, n_mels, 3000)) on `device`, None where the modality has none:
    omni_fast.media.pyav.preprocess_clip's steps with the inference aspect (ASPECT)."""
    frames = None if media.frames is None else preprocess_frames(media.frames, ASPECT, device=device)[None]
    mel = None if media.samples is None else log_mel(torch.from_numpy(media.samples).to(device), n_mels)[None]
    return frames, mel
