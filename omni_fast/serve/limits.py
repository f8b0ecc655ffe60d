"""The checks a request passes before anything of it is decoded; each refusal names the limit and its value.

Order in the server: body size (413, from Content-Length and again while the body is read), then the parsed
request's media parts and `n` (400), the queue (429 with Retry-After), then each clip's length from its
container header (400), all before a frame or sample is decoded. The decoded audio's length is checked again
(a header can understate it).
"""
from __future__ import annotations

from typing import AsyncIterator

from omni_fast.serve.protocol import ServeError

# Media parts one request may carry: R1-Omni takes one clip (its video, its audio, or both) per prompt.
MAX_MEDIA_PARTS = {"video": 1, "audio": 1}
RETRY_AFTER_S = 1  # what a 429 tells the client to wait


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes: from the declared
    Content-Length before reading, else while reading (a chunked body stops being read at the limit)."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise ServeError(400, f"Content-Length {content_length!r}: not a number") from None
        if declared > limit:
            raise ServeError(413, f"the request body is {declared} bytes; the limit is --max_request_bytes {limit}")
    body, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"the request body exceeds --max_request_bytes {limit}")
        body.append(chunk)
    return b"".join(body)


def check_media_parts(counts: dict[str, int]) -> None:
    for kind, count in counts.items():
        if count > MAX_MEDIA_PARTS[kind]:
            most = " and ".join(f"{v} {k}" for k, v in MAX_MEDIA_PARTS.items())
            raise ServeError(400, f"messages: {count} {kind} parts; a request takes at most {most} part "
                                  "(one clip per prompt)", "messages")


def check_n(n: int, max_num_seqs: int) -> None:
    if n > max_num_seqs:
        raise ServeError(400, f"n = {n} exceeds the server's --max_num_seqs {max_num_seqs}", "n")


def check_queue(waiting: int, max_queue: int) -> None:
    """429 when `waiting` requests already wait for their first token and the queue holds max_queue."""
    if waiting >= max_queue:
        raise ServeError(429, f"the server's queue is full (--max_queue {max_queue} requests waiting); retry later",
                         headers={"Retry-After": str(RETRY_AFTER_S)})


def check_clip_seconds(seconds: float, limit: float, where: str) -> None:
    if seconds > limit:
        raise ServeError(400, f"{where}: the clip is {seconds:.1f} s long; the limit is --max_clip_seconds {limit:g}",
                         where)
