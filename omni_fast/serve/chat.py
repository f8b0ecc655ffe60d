"""A chat request's messages -> what the model is asked: the question, the system turn, the media parts.

R1-Omni answers one question about one clip, so a conversation is an optional system message followed by one
user message. The user's text parts, joined by newlines, are the question (the instruct `omni-fast infer`
takes, which also feeds the BERT gate); with no text, R1-Omni's demo instruct, as `omni-fast infer` without
--instruct. Its media parts give the clip: `video_url`, `audio_url` or `input_audio`, wherever they stand
among the text parts (the prompt puts the clip first, as the reference does). The modality follows from the
parts and the video's streams (`modal`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from omni_fast.task import DEFAULT_INSTRUCT
from omni_fast.serve.limits import check_media_parts
from omni_fast.serve.protocol import ChatRequest, ServeError

PART_TYPES = ("text", "video_url", "audio_url", "input_audio")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _URL(_Part):
    url: str


class _InputAudio(_Part):
    data: str  # base64
    format: str  # wav, mp3, ...


class TextPart(_Part):
    type: str
    text: str


class VideoURLPart(_Part):
    type: str
    video_url: _URL


class AudioURLPart(_Part):
    type: str
    audio_url: _URL


class InputAudioPart(_Part):
    type: str
    input_audio: _InputAudio


_PART_MODELS = {"text": TextPart, "video_url": VideoURLPart, "audio_url": AudioURLPart,
                "input_audio": InputAudioPart}


@dataclass(slots=True)
class MediaRef:
    kind: str  # "video" or "audio"
    where: str  # the part, as errors name it: messages[1].content[0]
    url: str | None = None  # video_url / audio_url: data:, file://, a path, or http(s)
    data: str | None = None  # input_audio: base64 bytes
    format: str | None = None  # input_audio: the container (wav, mp3, ...)


@dataclass(slots=True)
class ChatInput:
    question: str  # the instruct: the user's text, or R1-Omni's demo instruct when there is none
    system: str | None  # the system turn (None: the chat template's default)
    video: MediaRef | None  # the clip's video (with its own audio track, unless use_audio_in_video is False)
    audio: MediaRef | None  # a separate audio part
    use_audio_in_video: bool = True  # mm_processor_kwargs.use_audio_in_video

    def modal(self, video_has_audio: bool) -> str:
        """R1-Omni's modality: video + its own audio track (or a separate audio part) -> video_audio; a video
        without audio (or use_audio_in_video false) -> video; audio alone -> audio."""
        if self.video is None:
            return "audio"
        if self.audio is not None or (video_has_audio and self.use_audio_in_video):
            return "video_audio"
        return "video"


def _part(raw: Any, where: str) -> BaseModel:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in _PART_MODELS:
        shown = f"unknown part type {kind!r}" if isinstance(raw, dict) else "a part must be an object with a 'type'"
        raise ServeError(400, f"{where}: {shown}; expected one of {', '.join(PART_TYPES)}", where)
    try:
        return _PART_MODELS[kind].model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        reason = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise ServeError(400, f"{where}.{field}: {reason}", where) from None


def _content(content: Any, where: str) -> str | list:
    if not isinstance(content, (str, list)):
        raise ServeError(400, f"{where}: expected a string or a list of parts", where)
    return content


def _text_only(content: Any, where: str) -> str:
    if isinstance(_content(content, where), str):
        return content
    texts = []
    for j, raw in enumerate(content):
        part = _part(raw, f"{where}[{j}]")
        if not isinstance(part, TextPart):
            raise ServeError(400, f"{where}[{j}]: a system message takes text parts only", f"{where}[{j}]")
        texts.append(part.text)
    return "\n".join(texts)


def read_messages(request: ChatRequest) -> ChatInput:
    """The messages -> ChatInput, or a 400 naming the message or part that does not fit."""
    messages = request.messages
    roles = [m.role for m in messages]
    if roles not in (["user"], ["system", "user"]):
        raise ServeError(400, f"messages: roles {roles}; this model answers one question about one clip: give an "
                              "optional system message and then one user message", "messages")
    system = _text_only(messages[0].content, "messages[0].content") if len(messages) == 2 else None
    u = len(messages) - 1
    content = _content(messages[u].content, f"messages[{u}].content")
    texts, media = ([content], []) if isinstance(content, str) else ([], [])
    if not isinstance(content, str):
        for j, raw in enumerate(content):
            where = f"messages[{u}].content[{j}]"
            part = _part(raw, where)
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, VideoURLPart):
                media.append(MediaRef("video", where, url=part.video_url.url))
            elif isinstance(part, AudioURLPart):
                media.append(MediaRef("audio", where, url=part.audio_url.url))
            else:
                media.append(MediaRef("audio", where, data=part.input_audio.data, format=part.input_audio.format))
    check_media_parts({kind: sum(m.kind == kind for m in media) for kind in ("video", "audio")})
    if not media:
        raise ServeError(400, f"messages[{u}].content: no video_url, audio_url or input_audio part; this model "
                              "answers about a clip", f"messages[{u}].content")
    question = "\n".join(texts)
    kwargs = request.mm_processor_kwargs
    return ChatInput(question=question if question.strip() else DEFAULT_INSTRUCT, system=system,
                     video=next((m for m in media if m.kind == "video"), None),
                     audio=next((m for m in media if m.kind == "audio"), None),
                     use_audio_in_video=not (kwargs is not None and kwargs.use_audio_in_video is False))
