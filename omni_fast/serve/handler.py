"""One POST /v1/chat/completions from arrival to its last byte.

    body (413) -> parsed (400/404) -> messages and sampling (400) -> n (400) -> queue (429)
      -> remote parts fetched (async) -> files written, probed (clip length), keyed, decoded unless the
         towers' caches hold the clip (worker pool)
      -> submitted to the engine loop (tower features + prompt on the loop thread) -> Started or Failed
      -> one JSON body, or server-sent events as the tokens come

Everything after the queue check runs against the request's deadline (--request_timeout from arrival) and a
watch on the connection: a timeout ends the request with a 504 (in a stream: an error event), a disconnect
ends it quietly; either aborts it in the engine before the next step, which frees its memory. A stream that
fails after it began sends `data: {"error": ...}` (which the openai client raises as an APIError), then
`data: [DONE]`. A finished request's response (in a stream: each choice's last chunk) carries its `timings`:
seconds in the media pool, waiting for the loop thread, in the encoders, generating, and in all.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from omni_fast.serve.chat import read_messages
from omni_fast.serve.inputs import is_remote, load_clip, prepare
from omni_fast.serve.limits import check_n, check_queue, read_body
from omni_fast.serve.loop import Failed, Started, one_line
from omni_fast.serve.media import fetch
from omni_fast.serve.protocol import DONE, ChatRequest, ServeError, Timings, error_body, parse_request, sse
from omni_fast.serve.response import Outputs
from omni_fast.serve.sampling import sampling_params
from omni_fast.serve.state import ServerState

log = logging.getLogger(__name__)
DISCONNECTED = 499  # the status metrics record for a client that went away (nginx's "client closed request")


class Disconnected(Exception):
    """The client closed the connection."""


class Call:
    """One request's bookkeeping: its deadline, its event queue from the engine loop, its phase in the counts."""

    def __init__(self, state: ServerState, request: Request, arrival: float, n: int):
        self.state, self.request, self.arrival, self.n = state, request, arrival, n
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.deadline = arrival + state.config.request_timeout
        self.events: asyncio.Queue = asyncio.Queue()
        self.gone = asyncio.Event()
        self.submitted = self.finished = False
        self.first_token: float | None = None
        self.media_s = self.wait_s = self.encode_s = 0.0  # the stages before the engine (Timings)
        self.entered: float | None = None  # when the request entered the engine
        self.phase = "waiting"
        self.clip = None  # the decoded clip (its temporary files), once the media pool is done with it
        state.waiting += 1
        self._aio = asyncio.get_running_loop()
        self._watch = asyncio.create_task(self._watch_disconnect())

    # --- the connection, the deadline, the engine loop ----------------------------------------------------------
    async def _watch_disconnect(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.gone.set()
        self.abort()

    def sink(self, event) -> None:
        """From the loop thread: hand an event to this request's queue on the event loop."""
        self._aio.call_soon_threadsafe(self.events.put_nowait, event)

    def abort(self) -> None:
        if self.submitted and not self.finished:
            self.state.loop.abort(self.id)
            self.finished = True

    async def guard(self, awaitable):
        """await `awaitable`, unless the client goes (Disconnected) or the deadline passes (504) first."""
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            done, _ = await asyncio.wait({task, gone}, timeout=max(0.0, self.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if task in done:
            return task.result()
        task.cancel()
        self.abort()
        if self.gone.is_set():
            raise Disconnected
        raise ServeError(504, f"the request took longer than --request_timeout {self.state.config.request_timeout:g} "
                              "s and was aborted")

    async def next_event(self):
        event = await self.guard(self.events.get())
        if isinstance(event, Failed):
            self.finished = True
            raise ServeError(event.status, event.message)
        return event

    def _media_done(self, work) -> None:
        """From the worker: the loaded clip belongs to this call (closed at once if the call is over by then)."""
        if work.cancelled() or work.exception() is not None:
            return
        try:
            self._aio.call_soon_threadsafe(self._own, work.result())
        except RuntimeError:  # the event loop is closed: the server is gone
            work.result().close()

    def _own(self, clip) -> None:
        self.clip = clip
        if self.phase == "done":
            clip.close()

    def _running(self) -> None:
        if self.phase == "waiting":
            self.first_token = time.monotonic()
            self.state.waiting -= 1
            self.state.running += 1
            self.state.rows += self.n
            self.phase = "running"

    def close(self, status: int) -> None:
        """The request is over (any way): counts, metrics, the watch; the engine's copy aborted if still there.
        Only the first call counts (a stream's generator and its response's background task both call it)."""
        if self.phase == "done":
            return
        self.abort()
        self._watch.cancel()
        if self.clip is not None:
            self.clip.close()
        if self.phase == "waiting":
            self.state.waiting -= 1
        elif self.phase == "running":
            self.state.running -= 1
            self.state.rows -= self.n
        self.phase = "done"
        self.state.metrics.finished(status)

    # --- phases --------------------------------------------------------------------------------------------------
    async def start(self, chat, params) -> None:
        """Media in the worker pool, then into the engine loop; returns once the request is in the engine."""
        state, model = self.state, self.state.model
        t0 = time.monotonic()
        fetched = {}
        for ref in (chat.video, chat.audio):
            if ref is not None and is_remote(ref):
                fetched[ref.kind] = await self.guard(fetch(ref, state.config, self.deadline))
        work = state.pool.submit(load_clip, model, chat, fetched, state.config, state.decoding)
        work.add_done_callback(self._media_done)  # the clip's files go with the call, however it ends
        self.clip = clip = await self.guard(asyncio.wrap_future(work))
        if clip.towers.lookup is not None:
            state.metrics.looked_up(clip.found is not None)
        submitted = time.monotonic()
        self.media_s = submitted - t0
        state.loop.submit(self.id, functools.partial(prepare, model, clip, chat, params, self.id), self.sink)
        self.submitted = True
        started = await self.next_event()
        assert isinstance(started, Started), started
        self.entered = time.monotonic()
        self.encode_s = started.prepare_s
        self.wait_s = max(0.0, self.entered - submitted - started.prepare_s)
        return started

    async def outputs(self, out: Outputs) -> AsyncIterator[tuple[dict[int, str], bool]]:
        """The engine's outputs as (text deltas per choice, whether the choices are now finished)."""
        keyed = self.clip is not None and self.clip.cache_key is not None
        while True:
            event = await self.next_event()
            if keyed:  # the first output: the request is in the batch, its prompt read from the cache or prefilled
                self.state.metrics.admitted(out.prompt_tokens, event.num_cached_tokens)
                keyed = False
            out.cached_tokens = max(out.cached_tokens, event.num_cached_tokens)
            if any(event.new_token_ids):
                self._running()
            deltas = out.add(event.new_token_ids)
            if not (event.finished or out.all_stopped):
                if deltas:
                    yield deltas, False
                continue
            self.finished = self.finished or event.finished
            self.abort()  # every choice hit a stop string: the rest of the samples is not needed
            last = out.finish(event.completions if event.finished else None)
            self._completed(out)
            yield {i: deltas.get(i, "") + last.get(i, "") for i in set(deltas) | set(last)}, True
            return

    def _completed(self, out: Outputs) -> None:
        now = time.monotonic()
        out.timings = Timings(media_s=self.media_s, wait_s=self.wait_s, encode_s=self.encode_s,
                              generate_s=now - (self.entered or now), total_s=now - self.arrival)
        usage = out.usage
        self.state.metrics.completed(ttft=(self.first_token or now) - self.arrival, e2e=now - self.arrival,
                                     longest=max(len(c.text.ids) for c in out.choices),
                                     prompt_tokens=usage.prompt_tokens, generated=usage.completion_tokens)


def _setup(state: ServerState, request: ChatRequest):
    config = state.config
    if request.model is not None and request.model != config.served_model_name:
        raise ServeError(404, f"model {request.model!r} does not exist; this server serves "
                              f"{config.served_model_name!r}", "model")
    chat = read_messages(request)
    params, stops = sampling_params(request, state.defaults)
    check_n(params.n, config.max_num_seqs)
    check_queue(state.waiting, config.max_queue)
    return chat, params, stops


async def chat_completion(state: ServerState, request: Request):
    arrival = time.monotonic()
    try:
        if state.draining:
            raise ServeError(503, "the server is shutting down")
        body = await read_body(request.stream(), request.headers.get("content-length"),
                               state.config.max_request_bytes)
        parsed = parse_request(body)
        chat, params, stops = _setup(state, parsed)
    except ServeError as e:
        state.metrics.finished(e.status)
        raise
    call = Call(state, request, arrival, params.n)
    out = Outputs(call.id, state.config.served_model_name, params.n, state.model.tokenizer, stops, parsed.logprobs)
    try:
        started = await call.start(chat, params)
        out.prompt_tokens = started.prompt_tokens
        if parsed.stream:
            include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
            # the background task closes a stream whose generator never started (the client went first)
            return StreamingResponse(_stream(call, out, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(call.close, DISCONNECTED))
        async for _ in call.outputs(out):
            pass
    except ServeError as e:
        call.close(e.status)
        raise
    except Disconnected:
        call.close(DISCONNECTED)
        return JSONResponse(error_body(DISCONNECTED, "the client closed the connection"), DISCONNECTED)
    except BaseException:
        call.close(500)
        raise
    call.close(200)
    return JSONResponse(out.completion().model_dump())


async def _stream(call: Call, out: Outputs, include_usage: bool) -> AsyncIterator[bytes]:
    status = DISCONNECTED  # unless it ends otherwise: the generator is cancelled when the client goes
    try:
        for chunk in out.role_chunks():
            yield sse(chunk)
        async for deltas, last in call.outputs(out):
            for chunk in out.final_chunks(deltas, include_usage) if last else out.delta_chunks(deltas):
                yield sse(chunk)
        status = 200
        yield DONE
    except ServeError as e:
        status = e.status
        yield sse(error_body(e.status, e.message))
        yield DONE
    except Disconnected:
        pass
    except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes to the client as an event
        log.exception("stream of %s failed", call.id)
        status = 500
        yield sse(error_body(500, one_line(e)))
        yield DONE
    finally:
        call.close(status)
