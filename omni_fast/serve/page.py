"""What the page at /ui sends and what it shows, without Gradio: the chat request built from the page's fields, the
streamed answer read from the server's own API, and the lines the page shows (emotion against a label set, the n
answers' agreement, timings, one-line errors).

The page is an API client of its own server: `stream_answer` POSTs the request to /v1/chat/completions at the
server's own address (stream: true, the clip as a data: URL, the API key as the bearer), so a page request passes
the same body, part, n, clip-length and queue limits, the same metrics and the same engine loop as any client's.
"""
from __future__ import annotations

import base64
import json
import mimetypes
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from omni_fast.task import LABEL_SETS, parse_response

MODALITIES = {"video + audio": "video_audio", "video": "video", "audio": "audio"}  # the page's words -> R1-Omni's


class PageError(Exception):
    """A request the page could not make or the server refused: one line for the page."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


# --- the request ------------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class PageRequest:
    body: dict  # the /v1/chat/completions body
    parts: dict[str, str]  # the body's part locations (as the server's errors name them) -> the page's words


def data_url(path: str | Path) -> str:
    path = Path(path)
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def page_request(video: str | None, audio: str | None, modality: str, question: str, temperature: float, n: int,
                 max_tokens: int | None, seed: int | None, model: str) -> PageRequest:
    """The page's fields -> the streamed chat request an API client would send for them. modality is one of
    MODALITIES: "video + audio" sends the video (whose own audio track the server uses) and the separate audio
    when one is given; "video" sends the video with use_audio_in_video false; "audio" sends the separate audio,
    else the video's file as the audio part (its audio track). A seed of None or below 0 sends none (random)."""
    if modality not in MODALITIES:
        raise PageError(f"modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    media = []
    if modality != "audio":
        if not video:
            raise PageError(f"the {modality} modality needs a video: drop a clip or pick a sample clip")
        media.append(("video_url", video, "the video"))
        if audio and modality == "video + audio":
            media.append(("audio_url", audio, "the audio file"))
    else:
        if not (audio or video):
            raise PageError("the audio modality needs an audio file or a video with an audio track")
        media.append(("audio_url", audio or video, "the audio file" if audio else "the video's audio track"))
    content, parts = [], {}
    for kind, path, words in media:
        parts[f"messages[0].content[{len(content)}]"] = words
        content.append({"type": kind, kind: {"url": data_url(path)}})
    if question.strip():
        content.append({"type": "text", "text": question})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": float(temperature), "n": int(n)}
    if modality == "video":
        body["mm_processor_kwargs"] = {"use_audio_in_video": False}
    if max_tokens:
        body["max_tokens"] = int(max_tokens)
    if seed is not None and seed >= 0:
        body["seed"] = int(seed)
    return PageRequest(body, parts)


def error_line(status: int | None, message: str, parts: dict[str, str]) -> str:
    """The server's error -> one line for the page, the part locations named as the page names them."""
    for where, words in parts.items():
        message = message.replace(where, words)
    line = " ".join(message.split())
    return f"Error {status}: {line}" if status is not None else f"Error: {line}"


# --- the streamed answer ----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Answer:
    texts: list[str]  # each choice's text so far
    finish_reasons: list[str | None]  # set as each choice ends
    emotions: list[str | None] = field(default_factory=list)  # the server's parse of each final text
    reasonings: list[str | None] = field(default_factory=list)
    timings: dict | None = None  # the server's Timings, once the request has ended
    usage: dict | None = None  # the server's Usage (prompt positions, and those read from the prefix cache)
    first_token_s: float | None = None  # seconds from sending to the first text, as the page saw it

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)


async def stream_answer(base_url: str, api_key: str | None, request: PageRequest,
                        timeout: float) -> AsyncIterator[Answer]:
    """POST the request to the server's own API and yield the answer each time it grows, and once more at the end;
    a refusal, an error event or an unreachable server raises PageError with its one line."""
    import httpx

    n = request.body["n"]
    answer = Answer([""] * n, [None] * n, [None] * n, [None] * n)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sent = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False) as client:
            async with client.stream("POST", base_url + "/v1/chat/completions", json=request.body,
                                     headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise PageError(error_line(response.status_code, _error_message(response.text), request.parts))
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        err = event["error"]
                        raise PageError(error_line(err.get("code"), err.get("message", ""), request.parts))
                    if _add_chunk(answer, event, sent) and not answer.done:
                        yield answer
    except httpx.HTTPError as e:
        raise PageError(error_line(None, f"the server did not answer ({type(e).__name__}: {e})", {})) from None
    if not answer.done:
        raise PageError(error_line(None, "the server ended the answer early", {}))
    yield answer


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


def _add_chunk(answer: Answer, chunk: dict, sent: float) -> bool:
    """Add a chunk's text, finish reasons and timings -> whether any text came."""
    grew = False
    if chunk.get("timings"):
        answer.timings = chunk["timings"]
    if chunk.get("usage"):
        answer.usage = chunk["usage"]
    for choice in chunk.get("choices", []):
        i = choice["index"]
        delta = choice.get("delta", {}).get("content") or ""
        if delta and answer.first_token_s is None:
            answer.first_token_s = time.monotonic() - sent
        answer.texts[i] += delta
        grew = grew or bool(delta)
        if choice.get("finish_reason"):
            answer.finish_reasons[i] = choice["finish_reason"]
            answer.emotions[i], answer.reasonings[i] = choice.get("emotion"), choice.get("reasoning")
    return grew


# --- what the page shows ----------------------------------------------------------------------------------------------
NO_ANSWER = "(no answer)"  # what an answer without <answer></answer> shows as


def agreement(emotions: list[str | None]) -> dict[str, float]:
    """The n answers' emotions -> the share of the answers giving each (no answer counted as NO_ANSWER), largest
    first (what the page's emotion display draws)."""
    counts = Counter(e if e is not None else NO_ANSWER for e in emotions)
    return {label: count / len(emotions) for label, count in counts.most_common()}


def label_note(emotions: list[str | None], label_set: str) -> str:
    """One line placing the answers in a dataset's label set (omni_fast.task.LABEL_SETS)."""
    labels = LABEL_SETS[label_set]
    found = [e for e in emotions if e is not None]
    if not found:
        return f"No emotion: the response has no <answer></answer> tag. {label_set.upper()}'s labels: " + \
               ", ".join(labels) + "."
    outside = sorted({e for e in found if e not in labels})
    if not outside:
        return f"In {label_set.upper()}'s label set ({len(labels)} labels: {', '.join(labels)})."
    return (f"Outside {label_set.upper()}'s label set ({', '.join(labels)}): " + ", ".join(repr(e) for e in outside)
            + ".")


def agreement_line(emotions: list[str | None]) -> str:
    """For n > 1: how many of the n answers agree with the most common one."""
    (top, count), = Counter(emotions).most_common(1)
    shown = top if top is not None else "no answer"
    return f"{count} of {len(emotions)} answers agree on {shown}."


def answers_table(answer: Answer) -> list[list]:
    """One row per choice: index, emotion, finish reason, reasoning (parsed from the text when the server gave
    none yet)."""
    rows = []
    for i, text in enumerate(answer.texts):
        reasoning, emotion = parse_response(text)
        rows.append([i + 1, answer.emotions[i] or emotion or "", answer.finish_reasons[i] or "",
                     answer.reasonings[i] or reasoning or text])
    return rows


def timings_line(answer: Answer) -> str:
    """The server's timings of the request, the first token as the page saw it, and the share of the prompt the
    engine read from its prefix cache: one line."""
    t = answer.timings or {}
    parts = [f"{name} {t[key]:.3f} s" for name, key in (("media", "media_s"), ("towers", "encode_s"),
                                                        ("waiting", "wait_s"), ("generation", "generate_s"),
                                                        ("total", "total_s")) if key in t]
    if answer.first_token_s is not None:
        parts.append(f"first token after {answer.first_token_s:.3f} s")
    if answer.usage:
        cached = (answer.usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        parts.append(f"prefix cache: {cached} of {answer.usage['prompt_tokens']} prompt positions")
    return " · ".join(parts)
