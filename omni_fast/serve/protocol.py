"""The wire format of the OpenAI-compatible endpoints: request and response models, the error body, SSE framing.

Requests are parsed here into ChatRequest (unknown fields are refused by name, so a misspelt parameter is never
silently ignored); every refusal is a ServeError with the HTTP status and one line naming the field. Content
parts stay plain dicts in ChatRequest and are checked one by one in omni_fast.serve.chat, so an unknown part
type is a 400 naming the part rather than pydantic's list of union branches.
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ServeError(Exception):
    """A request refused or failed: HTTP status, one line saying why, the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
        return error_body(self.status, self.message, self.param)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
               504: "timeout_error"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


# --- requests ---------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: str
    content: Any  # a string or a list of parts, checked by omni_fast.serve.chat (which names the bad part)
    name: str | None = None  # OpenAI's participant name; not part of the prompt


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with `usage` and no choices


class MMProcessorKwargs(_Strict):
    use_audio_in_video: bool | None = None  # False: a video's own audio track is not used (modality `video`)


class ChatRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extra; 0 or -1: off
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extra
    ignore_eos: bool = False  # vLLM's extra: no stop at the EOS ids, every completion runs to max_tokens
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None
    presence_penalty: float = 0.0  # accepted for clients that always send it; only 0 is supported
    frequency_penalty: float = 0.0  # likewise
    user: str | None = None  # OpenAI's end-user id; not used


def _where(loc: tuple) -> str:
    """pydantic's error location -> messages[0].content style."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_request(body: bytes) -> ChatRequest:
    """The request body -> ChatRequest, or a 400 naming the first field that is wrong."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServeError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ServeError(400, "the request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = _where(err["loc"])
        if err["type"] == "extra_forbidden":
            raise ServeError(400, f"{where}: unknown field", where) from None
        raise ServeError(400, f"{where}: {err['msg']}", where) from None
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) != 0:
            raise ServeError(400, f"{name}: not supported (only 0)", name)
    if request.stream_options is not None and not request.stream:
        raise ServeError(400, "stream_options: only allowed with stream: true", "stream_options")
    return request


# --- responses --------------------------------------------------------------------------------------------------
class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class Choice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None
    emotion: str | None = None  # inside <answer></answer> (an extra field: clients ignore it)
    reasoning: str | None = None  # inside <think></think> (likewise)


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt positions read from the engine's prefix cache instead of prefilled


class Usage(BaseModel):
    prompt_tokens: int  # text tokens plus the spliced video and audio embeddings
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # OpenAI's field: the cached share of the prompt


class Timings(BaseModel):
    """Where a request's time went, in seconds (an extra field: clients ignore it). The stage names are those of
    `omni-fast infer --json`'s timings."""
    media_s: float  # fetching, writing, probing and decoding its media (the worker pool)
    wait_s: float  # waiting for the engine loop thread to take it up
    encode_s: float  # encoders, projectors, BERT gate and splicing (on the loop thread)
    generate_s: float  # from entering the engine to its last token (queueing for rows, prefill, decoding)
    total_s: float  # arrival to last token


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    timings: Timings | None = None  # an extra field (clients ignore it)


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None
    emotion: str | None = None  # set in the choice's last chunk
    reasoning: str | None = None  # likewise


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None  # set in each choice's last chunk (an extra field)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omni-fast"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- server-sent events -----------------------------------------------------------------------------------------
DONE = b"data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (the openai client splits on the blank line)."""
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + text.encode() + b"\n\n"
